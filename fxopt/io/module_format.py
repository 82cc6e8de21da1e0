"""Modules as plain data, rebuilt only from an allowlist of classes (for fxopt's int8 file format).

Two kinds of classes can be stored:

* fxopt's int8 / dynamic modules (:data:`fxopt.quant.nn.STORABLE`): each gives its constructor state with
  ``fxopt_state()`` (int8 weights as integer values + qparams, plain numbers) and is rebuilt with
  ``cls.fxopt_from_state(state)``, which packs the weights again under the module's engine;
* standard ``torch.nn`` modules (``torch.nn.<Name>`` defined in ``torch.nn.modules``): their plain attributes
  (numbers, strings, tuples...), parameters, buffers and children. They are rebuilt with ``nn.Module.__init__``
  and those attributes, without running the class's ``__init__``.

Any other class, in ``save`` or in a file, raises :class:`fxopt.UnsupportedError` naming it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..errors import FxoptError, UnsupportedError
from ..quant.nn import STORABLE
from .graph_format import decode_value, encode_value, is_identifier, is_module_path

__all__ = ["decode_module", "encode_module", "fxopt_classes", "is_fxopt_module"]

_FXOPT_PREFIX = "fxopt."
_TORCH_PREFIX = "torch.nn."


@functools.lru_cache(maxsize=1)
def fxopt_classes() -> dict[str, type]:
    """fxopt's storable int8/dynamic module classes (:data:`fxopt.quant.nn.STORABLE`) by stored name."""
    return {_FXOPT_PREFIX + cls.__name__: cls for cls in STORABLE}


def is_fxopt_module(module: nn.Module) -> bool:
    return type(module) in fxopt_classes().values()


def _torch_class(name: str) -> type | None:
    cls = getattr(nn, name, None) if name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.modules."):
        return cls
    return None


_MODULE_BASE_KEYS = frozenset(nn.Module().__dict__)


def encode_module(module: nn.Module, where: str) -> dict[str, Any]:
    """``{"class": stored name, "state": plain data}``; :class:`UnsupportedError` for other classes."""
    cls = type(module)
    for name, known in fxopt_classes().items():
        if cls is known:
            return {"class": name, "state": module.fxopt_state()}
    if _torch_class(cls.__name__) is cls:
        attrs = {k: encode_value(v, f"{where}.{k}") for k, v in vars(module).items() if k not in _MODULE_BASE_KEYS}
        return {"class": _TORCH_PREFIX + cls.__name__, "state": {
            "attrs": attrs,
            "parameters": {k: None if p is None else p.detach() for k, p in module._parameters.items()},
            "buffers": {k: b for k, b in module._buffers.items()},
            "non_persistent": sorted(module._non_persistent_buffers_set),
            "children": {k: encode_module(m, f"{where}.{k}") for k, m in module._modules.items() if m is not None},
        }}
    raise UnsupportedError(
        f"module {where!r} is a {cls.__module__}.{cls.__qualname__}, which fxopt cannot store safely: an int8 file "
        f"holds only fxopt's int8/dynamic modules and standard torch.nn modules. Keep custom modules out of the "
        f"quantized model (e.g. make them traceable) or save the weights only")


def decode_module(entry: Any, where: str) -> nn.Module:
    """Rebuild a module from :func:`encode_module`'s output, only from the allowlisted classes."""
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str) or not isinstance(
            entry.get("state"), dict):
        raise FxoptError(f"malformed module entry for {where!r}")
    name, state = entry["class"], entry["state"]
    cls = fxopt_classes().get(name)
    if cls is None and name.startswith(_TORCH_PREFIX):
        cls = _torch_class(name[len(_TORCH_PREFIX):])
        if cls is not None:
            try:
                return _rebuild_torch(cls, state, where)
            except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
                raise FxoptError(f"the stored state of {where!r} ({name}) is invalid: {exc}") from exc
    if cls is None:
        raise UnsupportedError(f"module {where!r} has class {name[:100]!r}, which is not in fxopt's allowlist of "
                               f"storable modules; refusing to load it (fxopt.load never runs code from a file)")
    try:
        module = cls.fxopt_from_state(state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise FxoptError(f"the stored state of {where!r} ({name}) is invalid: {type(exc).__name__}: {exc}") from exc
    return module


def _tensor_or_none(value: Any, what: str) -> torch.Tensor | None:
    if value is not None and not isinstance(value, torch.Tensor):
        raise FxoptError(f"{what} must be a tensor, got {type(value).__name__}")
    return value


def _rebuild_torch(cls: type, state: dict, where: str) -> nn.Module:
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    attrs = state.get("attrs", {})
    if not isinstance(attrs, dict):
        raise FxoptError(f"malformed attributes for {where!r}")
    for key, value in attrs.items():
        if not is_identifier(key) or key in _MODULE_BASE_KEYS or key.startswith("__"):
            raise FxoptError(f"module {where!r}: attribute {str(key)[:60]!r} cannot be set from a file")
        setattr(module, key, decode_value(value, {}))
    names = [*dict(state.get("parameters", {})), *dict(state.get("buffers", {})), *dict(state.get("children", {}))]
    if not all(isinstance(k, str) and is_module_path(k) and "." not in k for k in names):
        raise FxoptError(f"module {where!r}: parameter, buffer and child names must be plain identifiers")
    for key, value in dict(state.get("parameters", {})).items():
        value = _tensor_or_none(value, f"{where}.{key}")
        module.register_parameter(key, None if value is None else nn.Parameter(value, requires_grad=False))
    non_persistent = set(state.get("non_persistent", []))
    for key, value in dict(state.get("buffers", {})).items():
        module.register_buffer(key, _tensor_or_none(value, f"{where}.{key}"), persistent=key not in non_persistent)
    for key, child in dict(state.get("children", {})).items():
        module.add_module(key, decode_module(child, f"{where}.{key}"))
    return module.eval()
