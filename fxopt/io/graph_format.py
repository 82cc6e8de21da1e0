"""An fx Graph as plain data (lists, dicts, strings, numbers), rebuilt only from allowlisted functions.

Used by fxopt's model file format (:mod:`fxopt.io.envelope`). A node is stored as::

    {"op": "call_function", "name": "erf", "target": "torch.erf", "args": [...], "kwargs": [...]}

* ``call_function`` targets are stored by name and resolved through :func:`function_table`: tensor ops of
  ``torch`` (native ops and ``torch.functional``), ``torch.nn.functional``, ``torch.Tensor`` methods,
  arithmetic ``operator``\\ s, ``math`` and ``getattr``/``len``. Anything else (``torch.load``,
  ``torch.from_file``, ``os.system``, private functions) is refused with :class:`fxopt.UnsupportedError`.
  Two more sources: :data:`KNOWN_FUNCTIONS` (pure tensor functions of torchvision that traced models call,
  imported by fxopt itself, never by a name from the file) and the functions the user registered in this
  process with :func:`allow_function`.
* Operators (what graphs from ``torch.export`` call: ``torch.ops.aten.relu.default``...) are stored by their
  qualified name ``"torch.ops.<namespace>.<op>.<overload>"`` and resolved on load through ``torch.ops`` (the
  dispatcher's registry; nothing is imported but torchvision, for its own namespace), only for the
  namespaces in :data:`OP_NAMESPACES` and never for
  :data:`REFUSED_OPS` or operators taking storages, futures or opaque objects (:func:`resolve_op`).
  Higher-order operators (``torch.cond``, wrapped subgraphs) are refused at save time.
* ``call_method`` names must be public ``torch.Tensor`` methods; those that take callables, expose storage or
  run autograd (:data:`REFUSED_METHODS`) are refused. ``getattr`` reads only :data:`SAFE_ATTRIBUTES`.
* Arguments are encoded by :func:`encode_value`: every dict in the encoding is a one-key tag
  (``{"node": name}``, ``{"tuple": [...]}``, ``{"dtype": "torch.float32"}``...), lists stay lists.

Since the file holds data only and a node can call only those functions on values made of that data, loading
runs no code from the file.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import keyword
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..errors import FxoptError, UnsupportedError

__all__ = [
    "KNOWN_FUNCTIONS",
    "OP_NAMESPACES",
    "REFUSED_METHODS",
    "REFUSED_OPS",
    "allow_function",
    "SAFE_ATTRIBUTES",
    "check_method",
    "decode_graph",
    "decode_value",
    "encode_graph",
    "encode_value",
    "function_name",
    "is_module_path",
    "op_name",
    "resolve_function",
    "resolve_op",
]

REFUSED_METHODS = frozenset({
    "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "backward", "storage",
    "untyped_storage", "share_memory_", "numpy", "tolist", "pin_memory", "cuda", "to_dlpack", "from_file",
    "data_ptr", "storage_offset", "set_", "resize_", "retain_grad", "storage_type", "module_load", "is_set_to",
})
SAFE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "is_quantized", "requires_grad"})
_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "matmul", "getitem",
              "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert", "not_", "lshift", "rshift",
              "iadd", "isub", "imul", "itruediv", "ifloordiv", "contains", "truth")
_REFUSED_TORCH = frozenset({"from_file"})
# pure tensor functions outside torch that traced torchvision models call (fx-wrapped, so they stay calls):
# stored name -> (module fxopt imports, attribute). Only these fixed modules are ever imported.
KNOWN_FUNCTIONS: dict[str, tuple[str, str]] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": ("torchvision.ops.stochastic_depth", "stochastic_depth"),
}
_REGISTERED: dict[str, Callable] = {}  # allow_function()
_F_MODULES = ("torch.nn.functional", "torch._C._nn", "torch")
# symbolic-size helpers torch.export graphs call on SymInts (pure arithmetic; not native ops of torch)
_SYM_FUNCTIONS = ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "sym_sqrt")

# --- operator overloads (torch.ops.<namespace>.<op>.<overload>), what aten-level graphs call -----------------
# Namespaces whose operators a stored graph may call. aten and prims are PyTorch's tensor operator sets (what
# torch.export emits); quantized holds PyTorch's int8 kernels (fxopt's int8 modules call them); fxopt is the
# namespace fxopt's own operators would be registered under. Their operators are registered by torch's C++
# library (or fxopt) with a fixed schema: a file picks an operator and its data arguments, never code. They
# are resolved through the dispatcher's registry (torch.ops), which imports no module. torchvision (a core
# dependency of fxopt) holds the detection kernels traced detectors call (nms, roi_align, roi_pool,
# deform_conv2d...), all tensor math; its C++ library registers them when fxopt imports torchvision by that
# fixed name (its image-file readers live in another namespace, "image", which stays refused). Other namespaces
# are refused: an extension library's operators are whatever its authors wrote, and "prim" (TorchScript) ops
# drive the interpreter itself.
OP_NAMESPACES = frozenset({"aten", "prims", "quantized", "fxopt", "torchvision"})
_NAMESPACE_LIBRARIES = {"torchvision": "torchvision"}  # namespace -> the module that registers its operators
# operators of those namespaces that reach beyond tensor math: files (from_file, save), raw storage (set_),
# process-wide state (seeds, grad mode), printing and futures. Also refused: any operator whose schema takes a
# Storage, Future, Capsule, Await or RRef argument.
REFUSED_OPS = frozenset({
    "from_file", "save", "set_", "set", "set_data", "set_grad_enabled", "manual_seed", "seed", "_print", "warn",
    "wait", "record_stream", "pin_memory", "_pin_memory", "_test_warn_in_autograd",
})
_REFUSED_ARG_TYPES = ("Storage", "Future", "Capsule", "Await", "RRef")
_OP_PREFIX = "torch.ops."
_OP_NAME = re.compile(r"^torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?$")


@functools.lru_cache(maxsize=1)
def function_table() -> dict[str, Callable]:
    """Every function a stored graph may call, by the name it is stored under."""
    table: dict[str, Callable] = {}
    natives = [n for n in dir(torch._C._VariableFunctions) if not n.startswith("_")]
    for name in natives + list(torch.functional.__all__):
        fn = getattr(torch, name, None)
        if callable(fn) and name not in _REFUSED_TORCH:
            table[f"torch.{name}"] = fn
    for name in dir(F):
        fn = getattr(F, name)
        if (not name.startswith("_") and callable(fn) and not isinstance(fn, type)
                and getattr(fn, "__module__", None) in _F_MODULES):
            table[f"torch.nn.functional.{name}"] = fn
    for name in dir(torch.Tensor):
        if _public_method(name):
            table[f"torch.Tensor.{name}"] = getattr(torch.Tensor, name)
    table.update({f"operator.{n}": getattr(operator, n) for n in _OPERATORS})
    table.update({f"math.{n}": getattr(math, n) for n in dir(math)
                  if not n.startswith("_") and callable(getattr(math, n))})
    table.update({"builtins.getattr": builtins.getattr, "builtins.len": builtins.len})
    table.update({f"torch.{n}": getattr(torch, n) for n in _SYM_FUNCTIONS if callable(getattr(torch, n, None))})
    for name, (module_name, attr) in KNOWN_FUNCTIONS.items():
        try:
            table[name] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):  # that library is not installed: its functions are simply unknown
            pass
    return table


def allow_function(fn: Callable, name: str | None = None) -> str:
    """Let saved graphs call ``fn`` (a function of yours, or of a library, that a traced model calls).

    Register it in the process that saves **and** in the one that loads (``fxopt.load`` looks stored names up
    in this process's registry only; it never imports or evaluates a name from the file). ``name`` defaults to
    ``"<module>.<qualname>"`` of ``fn``; returns the name the file stores. Only register functions that are
    safe to call with any tensor/number arguments: a file can call them with arguments of its choice.
    """
    if not callable(fn) or isinstance(fn, type):
        raise TypeError(f"allow_function expects a function, got {type(fn).__name__}")
    if name is None and isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = op_name(fn)  # an operator of another library: stored under its torch.ops name
    if name is None:
        name = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', None)}"
    if not isinstance(name, str) or not all(is_identifier(p) for p in name.split(".")):
        raise ValueError(f"allow_function: name {name!r} must be a dotted path of identifiers (pass name=...)")
    taken = function_table().get(name) or _REGISTERED.get(name)
    if taken is not None and taken is not fn:
        raise ValueError(f"allow_function: {name!r} already names another function; pass name=...")
    _REGISTERED[name] = fn
    return name


@functools.lru_cache(maxsize=1)
def _names_by_id() -> dict[int, str]:
    names: dict[int, str] = {}
    for name, fn in function_table().items():
        names.setdefault(id(fn), name)  # first spelling wins (torch.X before torch.Tensor.X)
    return names


def _public_method(name: str) -> bool:
    return (not name.startswith("_") and name not in REFUSED_METHODS
            and callable(getattr(torch.Tensor, name, None)))


def op_name(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> str:
    """``"torch.ops.<namespace>.<op>.<overload>"`` (or ``"torch.ops.<namespace>.<op>"`` for a packet)."""
    if isinstance(op, torch._ops.OpOverload):
        return f"{_OP_PREFIX}{op.namespace}.{op._schema.name.split('::', 1)[1]}.{op._overloadname}"
    namespace, name = op._qualified_op_name.split("::", 1)
    return f"{_OP_PREFIX}{namespace}.{name}"


def resolve_op(name: str) -> torch._ops.OpOverload | torch._ops.OpOverloadPacket:
    """The operator a stored ``torch.ops`` name refers to, looked up in the dispatcher's registry only.

    :class:`UnsupportedError` for a namespace outside :data:`OP_NAMESPACES`, an operator in :data:`REFUSED_OPS`
    or with a refused argument type, or a name that no registered operator has.
    """
    match = _OP_NAME.match(name)
    if match is None:
        raise UnsupportedError(f"{name[:100]!r} is not an operator name of the form torch.ops.<namespace>.<op>"
                               f".<overload>")
    namespace, op, overload = match.groups()
    if namespace not in OP_NAMESPACES:
        raise UnsupportedError(
            f"operator {name[:100]!r} is in namespace {namespace!r}; a saved graph may call operators of "
            f"{', '.join(sorted(OP_NAMESPACES))} only (custom operator libraries are not loaded from files). "
            f"If you trust it, register it before saving and before loading: fxopt.io.allow_function({name})")
    if op in REFUSED_OPS:
        raise UnsupportedError(f"operator {name[:100]!r} reaches beyond tensor math (files, storage or "
                               f"process-wide state); fxopt does not store or load graphs that call it")
    if namespace in _NAMESPACE_LIBRARIES:  # a fixed module name, never one from the file
        importlib.import_module(_NAMESPACE_LIBRARIES[namespace])
    try:  # _OpNamespace.__getattr__ asks the dispatcher for "<namespace>::<op>"; it imports nothing
        packet = getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        packet = None
    if not isinstance(packet, torch._ops.OpOverloadPacket) or packet._qualified_op_name != f"{namespace}::{op}":
        raise UnsupportedError(f"operator {name[:100]!r} is not registered in this PyTorch ({torch.__version__}); "
                               f"the file was written by another version or names an operator that does not exist")
    resolved: Any = packet
    schemas = [getattr(packet, o)._schema for o in packet.overloads()]  # a packet may dispatch to any of them
    if overload is not None:
        try:
            resolved = getattr(packet, overload)
        except (AttributeError, RuntimeError):
            resolved = None
        if not isinstance(resolved, torch._ops.OpOverload):
            raise UnsupportedError(f"operator {name[:100]!r}: {namespace}::{op} has no overload {overload!r} in "
                                   f"this PyTorch ({torch.__version__})")
        schemas = [resolved._schema]
    for schema in schemas:
        if any(t in str(a.type) for a in schema.arguments for t in _REFUSED_ARG_TYPES):
            raise UnsupportedError(f"operator {name[:100]!r} takes a storage, future or opaque object; fxopt does "
                                   f"not store or load graphs that call it")
    return resolved


def function_name(target: Callable) -> str:
    """The stored name of a ``call_function`` target; :class:`UnsupportedError` if it is not allowlisted."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = next((n for n, fn in _REGISTERED.items() if fn is target), None)
        if name is not None:
            return name
        name = op_name(target)
        resolve_op(name)  # the same policy as load: refuse at save time, before the file is written
        return name
    if isinstance(target, torch._ops.HigherOrderOperator):
        raise UnsupportedError(
            f"the graph calls the higher-order operator torch.ops.higher_order.{target.name()} (control flow or a "
            f"wrapped subgraph from torch.export); fxopt's file format stores flat graphs only. Export the model "
            f"without it (e.g. outside torch.no_grad / torch.cond), or save it with torch.export.save")
    name = _names_by_id().get(id(target))
    if name is None:
        name = next((n for n, fn in _REGISTERED.items() if fn is target), None)
    if name is None and isinstance(target, type):
        shown = f"{target.__module__}.{target.__qualname__}"
        raise UnsupportedError(
            f"the graph builds a {shown} object; fxopt's file format stores tensor computations and rebuilds no "
            f"library objects (Faster R-CNN's ImageList feeds its float rpn/roi_heads islands). Save the int8 part "
            f"that takes and returns tensors (e.g. fxopt.compile(model.backbone, ...)), or, for a file you will "
            f"only load yourself, torch.save(model, path)")
    if name is None:
        shown = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
        raise UnsupportedError(
            f"function {shown} is not in fxopt's allowlist of functions a saved graph may call (tensor ops of "
            f"torch, torch.nn.functional, torch.Tensor methods, operator, math). If it is a pure tensor function "
            f"you trust, register it before saving and before loading: fxopt.io.allow_function({shown}); or keep "
            f"it out of the traced graph (e.g. as a leaf module registered with fxopt.io.allow_module)")
    return name


def resolve_function(name: Any) -> Callable:
    fn = None
    if isinstance(name, str):
        fn = function_table().get(name) or _REGISTERED.get(name)
        if fn is None and name.startswith(_OP_PREFIX):
            return resolve_op(name)
    if fn is None:
        raise UnsupportedError(f"the file calls function {str(name)[:100]!r}, which is not in fxopt's allowlist; "
                               f"refusing to load it (fxopt.load never runs code from a file). If you trust that "
                               f"function, register it first with fxopt.io.allow_function(fn)")
    return fn


def check_method(name: Any) -> str:
    if not isinstance(name, str) or not _public_method(name):
        raise UnsupportedError(f"the graph calls method {str(name)[:100]!r}, which is not an allowlisted public "
                               f"torch.Tensor method; fxopt does not store or load it")
    return name


def encode_value(value: Any, where: str = "") -> Any:
    """``value`` (an fx argument) as plain data; nodes become ``{"node": name}``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, list):
        return [encode_value(v, where) for v in value]
    if isinstance(value, tuple):  # torch.Size too
        return {"tuple": [encode_value(v, where) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UnsupportedError(f"{where}: dict arguments with non-string keys cannot be stored")
        return {"dict": [[k, encode_value(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [encode_value(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (torch.memory_format, torch.layout)):
        return {type(value).__name__: str(value).removeprefix("torch.")}
    if callable(value) and not isinstance(value, (type, torch.nn.Module)):  # e.g. an activation attribute
        return {"function": function_name(value)}
    raise UnsupportedError(f"{where}: a value of type {type(value).__name__} cannot be stored in an fxopt file "
                           f"(only numbers, strings, tuples/lists/dicts, slices, dtypes and devices)")


_TAGS = {
    "tuple": lambda v, d: tuple(d(x) for x in _list(v)),
    "dict": lambda v, d: {_str(k): d(x) for k, x in (_pair(p) for p in _list(v))},
    "slice": lambda v, d: slice(*(d(x) for x in _list(v, 3))),
    "ellipsis": lambda v, d: Ellipsis,
    "dtype": lambda v, d: _typed(torch, _str(v).removeprefix("torch."), torch.dtype),
    "device": lambda v, d: torch.device(_str(v)),
    "memory_format": lambda v, d: _typed(torch, _str(v), torch.memory_format),
    "layout": lambda v, d: _typed(torch, _str(v), torch.layout),
    "function": lambda v, d: resolve_function(_str(v)),
}


def decode_value(data: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    """Inverse of :func:`encode_value`; ``{"node": name}`` must name a node defined earlier."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode_value(v, nodes) for v in data]
    if isinstance(data, dict) and len(data) == 1:
        (tag, inner), = data.items()
        if tag == "node":
            if not isinstance(inner, str) or inner not in nodes:
                raise FxoptError(f"the graph refers to node {str(inner)[:80]!r} before defining it")
            return nodes[inner]
        if tag in _TAGS:
            return _TAGS[tag](inner, lambda v: decode_value(v, nodes))
    raise FxoptError(f"unexpected value in the stored graph: {str(data)[:80]!r}")


def _list(v: Any, length: int | None = None) -> list:
    if not isinstance(v, list) or (length is not None and len(v) != length):
        raise FxoptError(f"malformed stored value {str(v)[:80]!r}")
    return v


def _pair(v: Any) -> list:
    return _list(v, 2)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise FxoptError(f"expected a string in the stored graph, got {type(v).__name__}")
    return v


def _typed(namespace: Any, name: str, kind: type) -> Any:
    found = getattr(namespace, name, None) if name.isidentifier() else None
    if not isinstance(found, kind):
        raise FxoptError(f"unknown {kind.__name__} {name!r} in the stored graph")
    return found


def encode_graph(graph: torch.fx.Graph) -> list[dict[str, Any]]:
    """The nodes of ``graph`` as plain data (call_function targets checked against the allowlist)."""
    out = []
    for node in graph.nodes:
        where = f"node {node.name!r} ({node.op})"
        target: Any = node.target
        if node.op == "call_function":
            target = function_name(node.target)
            _check_getattr(target, node.args)
        elif node.op == "call_method":
            check_method(node.target)
        out.append({"op": node.op, "name": node.name, "target": target,
                    "args": encode_value(node.args, where), "kwargs": encode_value(node.kwargs, where)})
    return out


_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
# fx generates Python source from names and targets: only plain identifiers may come from a file.
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# a path part: an identifier, an index, or a name with hyphens (regnet's "block1-0"). fx writes parts that are
# not identifiers as getattr(obj, "part") -- inside double quotes, which letters, digits, "_" and "-" cannot leave
_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def is_identifier(name: Any) -> bool:
    return isinstance(name, str) and bool(_IDENTIFIER.match(name)) and not keyword.iskeyword(name)


def is_module_path(target: Any) -> bool:
    """``"layer1.0.conv1"``, ``"block1-0.proj"``: dot-separated identifiers, indices or hyphenated names only."""
    return isinstance(target, str) and all(
        _PATH_PART.match(p) and not keyword.iskeyword(p) for p in target.split("."))


def _check_names(entry: dict) -> None:
    op, name, target = entry["op"], entry["name"], entry.get("target")
    if not is_identifier(name):
        raise FxoptError(f"node name {str(name)[:80]!r} in the stored graph is not a plain identifier")
    if op == "placeholder" and not is_identifier(str(target).lstrip("*")):
        raise FxoptError(f"input name {str(target)[:80]!r} in the stored graph is not a plain identifier")
    if op in ("get_attr", "call_module") and not is_module_path(target):
        raise FxoptError(f"attribute path {str(target)[:80]!r} in the stored graph is not a dotted identifier path")


def decode_graph(data: Any) -> torch.fx.Graph:
    """An fx Graph from :func:`encode_graph`'s output; refuses anything outside the allowlists."""
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for entry in _list(data):
        if not isinstance(entry, dict) or entry.get("op") not in _OPS or not isinstance(entry.get("name"), str):
            raise FxoptError(f"malformed node entry in the stored graph: {str(entry)[:120]!r}")
        _check_names(entry)
        op, target = entry["op"], entry.get("target")
        if op == "call_function":
            target = resolve_function(target)
        elif op == "call_method":
            check_method(target)
        elif not isinstance(target, str):
            raise FxoptError(f"node {entry['name']!r} ({op}) needs a string target")
        args = decode_value(entry.get("args"), nodes)
        kwargs = decode_value(entry.get("kwargs"), nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise FxoptError(f"node {entry['name']!r}: args must be a tuple and kwargs a dict")
        if not all(is_identifier(k) for k in kwargs):
            raise FxoptError(f"node {entry['name']!r}: keyword argument names must be plain identifiers")
        if op == "placeholder" and not all(a is None or isinstance(a, (bool, int, float, str)) for a in args):
            raise FxoptError(f"input {entry['name']!r}: a default value must be a number, a string or None")
        if op == "call_function":
            _check_getattr(entry["target"], args)
        nodes[entry["name"]] = graph.create_node(op, target, args, kwargs, name=entry["name"])
    graph.lint()
    return graph


def _check_getattr(name: str, args: tuple) -> None:
    if name == "builtins.getattr" and (len(args) != 2 or args[1] not in SAFE_ATTRIBUTES):
        attr = args[1] if len(args) == 2 else "?"
        raise UnsupportedError(f"getattr of {str(attr)[:80]!r} is not allowed in a stored graph "
                               f"(allowed attributes: {', '.join(sorted(SAFE_ATTRIBUTES))})")
