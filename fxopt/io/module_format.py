"""Modules as plain data, rebuilt only from an allowlist of classes (for fxopt's graph file format).

Three kinds of classes can be stored:

* fxopt's int8 / dynamic modules (:data:`fxopt.quant.nn.STORABLE`): each gives its constructor state with
  ``fxopt_state()`` (int8 weights as integer values + qparams, plain numbers) and is rebuilt with
  ``cls.fxopt_from_state(state)``, which packs the weights again under the module's engine;
* standard ``torch.nn`` modules (``torch.nn.<Name>`` defined in ``torch.nn.modules``): their plain attributes
  (numbers, strings, tuples...), parameters, buffers and children. They are rebuilt with ``nn.Module.__init__``
  and those attributes, without running the class's ``__init__``. fxopt's float modules
  (:data:`fxopt.quant.nn.PLAIN_STORABLE`: fused conv/linear/add, fp16 storage) are stored the same way;
* classes the user registered in this process with :func:`allow_module` (stored the same way too);
* :data:`KNOWN_MODULES`: library classes fxopt's own frontends put in graphs (the export frontend lifts Hugging
  Face transformers' ``Conv1D``, GPT-2's linear layer, back to a module call), stored the same way and looked up
  in a fixed module fxopt imports itself, never in a module named by the file.

Any other class, in ``save`` or in a file, raises :class:`fxopt.UnsupportedError` naming it and saying how to
register it. :func:`check_entry` validates every class name of a stored module tree before anything is built.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
from torch import nn

from ..errors import FxoptError, UnsupportedError
from ..quant.nn import PLAIN_STORABLE, STORABLE
from .graph_format import decode_value, encode_value, is_identifier, is_module_path

__all__ = ["KNOWN_MODULES", "allow_module", "check_entry", "decode_module", "encode_module", "fxopt_classes", "is_fxopt_module"]

_FXOPT_PREFIX = "fxopt."
_TORCH_PREFIX = "torch.nn."
_USER_PREFIX = "user:"
_REGISTERED: dict[str, type] = {}  # allow_module(): stored name (without the prefix) -> class
_LIBRARY_PREFIX = "library:"
# stored name -> (module fxopt imports, class name); only these fixed modules are ever imported. Each class's
# forward needs only its attributes (numbers), parameters, buffers and children.
KNOWN_MODULES: dict[str, tuple[str, str]] = {
    "transformers.pytorch_utils.Conv1D": ("transformers.pytorch_utils", "Conv1D"),
}


def _known_class(name: str) -> type | None:
    """A :data:`KNOWN_MODULES` class, or ``None`` (unknown name, or the library is not installed)."""
    where = KNOWN_MODULES.get(name)
    if where is None:
        return None
    try:
        cls = getattr(importlib.import_module(where[0]), where[1], None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def allow_module(cls: type, name: str | None = None) -> str:
    """Let ``fxopt.save``/``fxopt.load`` store modules of class ``cls`` (e.g. a leaf the tracer kept).

    Such a module is stored like a ``torch.nn`` module: its plain attributes (numbers, strings, tuples,
    dtypes, allowlisted functions), parameters, buffers and child modules; ``load`` rebuilds it without
    running ``cls.__init__``, so its ``forward`` must need nothing else. Register the class in the process that
    saves **and** in the one that loads: ``fxopt.load`` looks the stored name up in this registry only, it never
    imports a name from the file. ``name`` defaults to ``"<module>.<qualname>"``; returns the stored name.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"allow_module expects an nn.Module subclass, got {cls!r}")
    if name is None:
        name = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(name, str) or not all(is_identifier(p) for p in name.split(".")):
        raise ValueError(f"allow_module: name {name!r} must be a dotted path of identifiers (pass name=...)")
    if _REGISTERED.get(name, cls) is not cls:
        raise ValueError(f"allow_module: {name!r} already names another class; pass name=...")
    _REGISTERED[name] = cls
    return name


def _plain_name(cls: type) -> str | None:
    """The stored name of a class stored as attributes/parameters/buffers/children, or ``None``."""
    if _torch_class(cls.__name__) is cls:
        return _TORCH_PREFIX + cls.__name__
    if cls in PLAIN_STORABLE:
        return _FXOPT_PREFIX + cls.__name__
    name = next((n for n, known in _REGISTERED.items() if known is cls), None)
    if name is not None:
        return _USER_PREFIX + name
    name = f"{cls.__module__}.{cls.__qualname__}"
    return _LIBRARY_PREFIX + name if name in KNOWN_MODULES and _known_class(name) is cls else None


def _plain_class(name: str) -> type | None:
    if name.startswith(_TORCH_PREFIX):
        return _torch_class(name[len(_TORCH_PREFIX):])
    if name.startswith(_USER_PREFIX):
        return _REGISTERED.get(name[len(_USER_PREFIX):])
    if name.startswith(_LIBRARY_PREFIX):
        return _known_class(name[len(_LIBRARY_PREFIX):])
    return next((c for c in PLAIN_STORABLE if _FXOPT_PREFIX + c.__name__ == name), None)


@functools.lru_cache(maxsize=1)
def fxopt_classes() -> dict[str, type]:
    """fxopt's storable int8/dynamic module classes (:data:`fxopt.quant.nn.STORABLE`) by stored name."""
    return {_FXOPT_PREFIX + cls.__name__: cls for cls in STORABLE}


def is_fxopt_module(module: nn.Module) -> bool:
    return type(module) in fxopt_classes().values()


# torch.nn module classes that torch.nn does not export by name but its own modules build
_TORCH_INTERNAL = {"NonDynamicallyQuantizableLinear": nn.modules.linear.NonDynamicallyQuantizableLinear}


def _torch_class(name: str) -> type | None:
    cls = (getattr(nn, name, None) or _TORCH_INTERNAL.get(name)) if name.isidentifier() else None
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
    plain = _plain_name(cls)
    if plain is not None:
        attrs = {k: encode_value(v, f"{where}.{k}") for k, v in vars(module).items() if k not in _MODULE_BASE_KEYS}
        return {"class": plain, "state": {
            "attrs": attrs,
            "parameters": {k: None if p is None else p.detach() for k, p in module._parameters.items()},
            "buffers": {k: b for k, b in module._buffers.items()},
            "non_persistent": sorted(module._non_persistent_buffers_set),
            "children": {k: encode_module(m, f"{where}.{k}") for k, m in module._modules.items() if m is not None},
        }}
    shown = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__.startswith("fxopt."):  # stubs, observers, fake quant, QAT modules of a prepared graph
        raise UnsupportedError(
            f"module {where!r} is a {shown}: a prepared (observed or QAT) graph cannot be saved as a model file; "
            f"lower it first (fxopt.lower(module, 'x86'), then fxopt.save) or keep its weights with "
            f"torch.save(module.state_dict(), path)")
    raise UnsupportedError(
        f"module {where!r} is a {shown}, which fxopt cannot store safely: a saved graph holds only fxopt's "
        f"modules, standard torch.nn modules and classes you registered. If its forward needs only its "
        f"attributes, parameters, buffers and children, register it before saving and before loading: "
        f"fxopt.io.allow_module({shown}); otherwise make it traceable, or save the weights only")


def check_entry(entry: Any, where: str) -> None:
    """Refuse a stored module tree naming any class outside the allowlist (nothing is built)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str) or not isinstance(
            entry.get("state"), dict):
        raise FxoptError(f"malformed module entry for {where!r}")
    name = entry["class"]
    if fxopt_classes().get(name) is not None:
        return
    if _plain_class(name) is None:
        raise UnsupportedError(f"module {where!r} has class {name[:100]!r}, which is not in fxopt's allowlist of "
                               f"storable modules; refusing to load it (fxopt.load never runs code from a file). "
                               f"If it is a class of yours, register it first with fxopt.io.allow_module(cls)")
    children = entry["state"].get("children", {})
    if not isinstance(children, dict):
        raise FxoptError(f"malformed children for {where!r}")
    for key, child in children.items():
        check_entry(child, f"{where}.{key}")


def decode_module(entry: Any, where: str) -> nn.Module:
    """Rebuild a module from :func:`encode_module`'s output, only from the allowlisted classes."""
    check_entry(entry, where)
    name, state = entry["class"], entry["state"]
    cls = fxopt_classes().get(name)
    if cls is None:
        try:
            return _rebuild_plain(_plain_class(name), state, where)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise FxoptError(f"the stored state of {where!r} ({name}) is invalid: {exc}") from exc
    try:
        module = cls.fxopt_from_state(state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise FxoptError(f"the stored state of {where!r} ({name}) is invalid: {type(exc).__name__}: {exc}") from exc
    return module


def _tensor_or_none(value: Any, what: str) -> torch.Tensor | None:
    if value is not None and not isinstance(value, torch.Tensor):
        raise FxoptError(f"{what} must be a tensor, got {type(value).__name__}")
    return value


def _rebuild_plain(cls: type, state: dict, where: str) -> nn.Module:
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
