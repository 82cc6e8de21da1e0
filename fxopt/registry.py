"""Backends by name: what every backend object provides, and the registry that finds them lazily.

A backend is found by name through a small table (name -> ``"module:Class"``), imported on first use, so
the core (save/load, compile) reaches a backend without importing ``fxopt.backends`` itself.
``fxopt.backends`` re-exports ``available``/``get``/``register``/``Backend``/``Support`` (the public API).
Third-party backends register through the ``fxopt.backends`` entry-point group
(``name = "package.module:BackendClass"``) or :func:`register`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.fx

from .errors import UnsupportedError

__all__ = ["Backend", "Support", "available", "get", "register", "same", "accepts"]


@dataclass(frozen=True)
class Support:
    """Whether a backend runs a node, and why (always a reason, yes or no)."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class Backend:
    """Base class of backend objects returned by ``fxopt.backends.get(name)``."""

    name: str = ""
    spec: Any = None  # the int8 support table (fxopt.backends.spec.BackendSpec) of backends that run int8 graphs

    def supports(self, node: torch.fx.Node) -> Support:  # pragma: no cover - overridden
        return Support(False, f"backend {self.name!r} declares no support table")

    def lower(self, gm: torch.fx.GraphModule) -> torch.nn.Module:  # pragma: no cover - overridden
        raise UnsupportedError(f"backend {self.name!r} cannot lower graphs")

    def save(self, module: torch.nn.Module, path: str | Path) -> None:
        raise UnsupportedError(f"backend {self.name!r} has no saver")

    @property
    def has_saver(self) -> bool:
        """Whether this backend writes its own artifacts (overrides :meth:`save`)."""
        return type(self).save is not Backend.save

    def __repr__(self) -> str:
        return f"<fxopt backend {self.name!r}>"


# name -> "module:attribute"; aliases map to another name.
_BUILTIN: dict[str, str] = {
    "x86": "fxopt.backends.x86:X86Backend",
    "qnnpack": "fxopt.backends.qnnpack:QnnpackBackend",
    "onnx": "fxopt.backends.onnx:OnnxBackend",
    "openvino": "fxopt.backends.openvino:OpenVinoBackend",
    "edgetpu": "fxopt.backends.edgetpu:EdgeTpuBackend",
    "tflite": "fxopt.backends.tflite:TFLiteBackend",
    "reference": "fxopt.backends.reference:ReferenceBackend",
    "x86-inductor": "fxopt.backends.x86_inductor:X86InductorBackend",
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


def same(a: str | Backend, b: str | Backend) -> bool:
    """Whether two names / backend objects are the same backend (aliases included; two instances of one
    backend class with different options, e.g. ``OnnxBackend(threads=2)`` and ``"onnx"``, are the same)."""
    ga, gb = get(a), get(b)
    return ga is gb or (ga.name == gb.name and type(ga) is type(gb))


def accepts(prepared_for: str | Backend, target: str | Backend) -> bool:
    """Whether a graph prepared for ``prepared_for`` can be lowered to ``target``: the same backend, or a
    target that takes other backends' prepared graphs (``accepts_prepared_for``, e.g. onnx takes x86's)."""
    if same(prepared_for, target):
        return True
    hook = getattr(get(target), "accepts_prepared_for", None)
    return bool(callable(hook) and hook(get(prepared_for).name))


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
