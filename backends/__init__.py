"""Backend lowerers, found by name through a small registry (imported lazily).

``available()`` lists the names; ``get(name)`` returns the backend object. Third-party backends
register through the ``fxopt.backends`` entry-point group (``name = "package.module:BackendClass"``).
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib import metadata

from .base import Backend, Support

__all__ = ["Backend", "Support", "available", "get", "register", "OnnxBackend", "OpenVinoBackend", "EdgeTpuBackend"]

# backend classes with options, imported on first use: fxopt.backends.OpenVinoBackend(threads=2)
_LAZY_CLASSES = {"OnnxBackend": "fxopt.backends.onnx", "OpenVinoBackend": "fxopt.backends.openvino",
                 "EdgeTpuBackend": "fxopt.backends.edgetpu"}


def __getattr__(name: str):
    if name in _LAZY_CLASSES:
        return getattr(importlib.import_module(_LAZY_CLASSES[name]), name)
    raise AttributeError(f"module 'fxopt.backends' has no attribute {name!r}")

# name -> "module:attribute"; aliases map to another name.
_BUILTIN: dict[str, str] = {
    "x86": "fxopt.backends.x86:X86Backend",
    "qnnpack": "fxopt.backends.qnnpack:QnnpackBackend",
    "onnx": "fxopt.backends.onnx:OnnxBackend",
    "openvino": "fxopt.backends.openvino:OpenVinoBackend",
    "edgetpu": "fxopt.backends.edgetpu:EdgeTpuBackend",
}
_ALIASES: dict[str, str] = {"fbgemm": "x86"}
_REGISTERED: dict[str, str | type] = {}
_CACHE: dict[str, Backend] = {}


def register(name: str, backend: str | type) -> None:
    """Register a backend class (or ``"module:Class"`` path) under ``name``."""
    _REGISTERED[name] = backend
    _CACHE.pop(name, None)


def _module_exists(path: str) -> bool:
    module = path.split(":", 1)[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _entry_points() -> dict[str, str]:
    try:
        eps = metadata.entry_points(group="fxopt.backends")
    except Exception:  # broken metadata must not break fxopt
        return {}
    return {ep.name: ep.value for ep in eps}


def _table() -> dict[str, str | type]:
    table: dict[str, str | type] = {k: v for k, v in _BUILTIN.items() if _module_exists(v)}
    table.update(_entry_points())
    table.update(_REGISTERED)
    return table


def available() -> list[str]:
    """Names ``get`` accepts (aliases included)."""
    table = _table()
    names = set(table)
    names.update(alias for alias, target in _ALIASES.items() if target in table)
    return sorted(names)


def get(name: str | Backend) -> Backend:
    """The backend object for ``name``; ``ValueError`` listing the available names otherwise."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name (str), got {type(name).__name__}; choose from {available()}")
    canonical = _ALIASES.get(name, name)
    if canonical in _CACHE:
        return _CACHE[canonical]
    table = _table()
    if canonical not in table:
        raise ValueError(f"unknown backend {name!r}; available backends: {', '.join(available()) or 'none'}")
    target = table[canonical]
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
    backend = target() if isinstance(target, type) else target
    _CACHE[canonical] = backend
    return backend
