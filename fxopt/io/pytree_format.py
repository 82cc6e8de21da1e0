"""The input/output structure of a ``torch.export`` graph as plain data, rebuilt from allowlisted types only.

A graph from the export frontend (``fxopt.trace(..., mode="export")``, or auto mode falling back to it) takes
its inputs through a pytree spec and rebuilds the model's output type on return (a Hugging Face
``BaseModelOutputWithPoolingAndCrossAttentions``, a tuple, a dict...): its code generator is a
``torch.fx.graph._PyTreeCodeGen`` holding ``orig_args``, ``in_spec`` and ``out_spec``. This module stores
those as::

    {"orig_args": ["input_ids", "attention_mask"],
     "in_spec":  spec, "out_spec": spec or None}
    spec = {"leaf": True}
         | {"type": "tuple" | "list" | "dict" | "OrderedDict" | "None" | <output type name>,
            "context": None | [key, ...] | [[key, ...], [key left None, ...]], "children": [spec, ...]}
         | {"type": "namedtuple", "context": <registered class name>, "children": [spec, ...]}

Output types are resolved by name, never imported from a name in the file:

* the built-in containers above;
* Hugging Face ``transformers`` output classes (``ModelOutput`` dataclasses): those of
  ``transformers.modeling_outputs`` (a fixed module fxopt imports itself) and any ``ModelOutput`` subclass the
  loading process has already defined (e.g. by importing the model's module), found in torch's pytree registry;
* classes registered in this process with :func:`allow_output_type` (dataclasses, named tuples).

A type is rebuilt only with field names: for a ``ModelOutput`` or a registered dataclass, each stored key must
be one of its fields, so loading constructs a dataclass of tensors and nothing else.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import math
import re
import sys
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from ..errors import FxoptError, UnsupportedError
from .graph_format import is_identifier

__all__ = ["allow_output_type", "decode_codegen", "decode_input_checks", "encode_codegen", "encode_input_checks",
           "install_input_checks", "pytree_codegen"]

_BUILTIN: dict[str, type] = {"tuple": tuple, "list": list, "dict": dict, "OrderedDict": collections.OrderedDict,
                             "None": type(None)}
_KEYED = (dict, collections.OrderedDict)  # context: the list of keys
_HF_OUTPUTS_MODULE = "transformers.modeling_outputs"
_REGISTERED: dict[str, type] = {}  # allow_output_type(): stored name -> class


def allow_output_type(cls: type, name: str | None = None) -> str:
    """Let saved graphs return (or take) instances of ``cls``: a named tuple class, or a dataclass registered as
    a torch pytree node.

    ``torch.export`` keeps a model's output type through torch's pytree registry; fxopt stores the type by
    name. Hugging Face ``ModelOutput`` classes are known already; register your own (a
    ``torch.utils._pytree.register_dataclass`` class, a ``typing.NamedTuple``) in the process that saves
    **and** in the one that loads. ``name`` defaults to ``"<module>.<qualname>"``; returns the stored name.
    """
    named = isinstance(cls, type) and pytree.is_namedtuple_class(cls)
    if not isinstance(cls, type) or not (named or dataclasses.is_dataclass(cls)):
        raise TypeError(f"allow_output_type expects a dataclass or named tuple class, got {cls!r}")
    if not named and cls not in pytree.SUPPORTED_NODES:
        raise ValueError(f"allow_output_type: {cls.__qualname__} is not registered with torch's pytree; register it "
                         f"first (torch.utils._pytree.register_dataclass({cls.__qualname__}))")
    if name is None:
        name = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(name, str) or not all(is_identifier(p) for p in name.split(".")) or name in (*_BUILTIN, "namedtuple"):
        raise ValueError(f"allow_output_type: name {name!r} must be a dotted path of identifiers (pass name=...)")
    if _REGISTERED.get(name, cls) is not cls:
        raise ValueError(f"allow_output_type: {name!r} already names another class; pass name=...")
    _REGISTERED[name] = cls
    return name


def pytree_codegen(graph: torch.fx.Graph) -> _PyTreeInfo | None:
    """The pytree info of a graph from ``torch.export`` (``None`` for a plain fx graph)."""
    codegen = graph._codegen
    return codegen.pytree_info if isinstance(codegen, _PyTreeCodeGen) else None


def encode_codegen(graph: torch.fx.Graph) -> dict[str, Any] | None:
    info = pytree_codegen(graph)
    if info is None:
        return None
    return {"orig_args": list(info.orig_args), "in_spec": _encode_spec(info.in_spec, "input"),
            "out_spec": None if info.out_spec is None else _encode_spec(info.out_spec, "output")}


def decode_codegen(data: Any, graph: torch.fx.Graph) -> None:
    """Give ``graph`` the stored pytree code generator; checks names and types before anything is built."""
    if data is None:
        return
    if not isinstance(data, dict) or not isinstance(data.get("orig_args"), list):
        raise FxoptError("malformed input/output structure ('pytree') in the stored graph")
    orig_args = data["orig_args"]
    if not all(is_identifier(a) for a in orig_args):  # they become the generated forward's parameter names
        raise FxoptError(f"input names {str(orig_args)[:100]} in the stored graph are not all plain identifiers")
    in_spec = _decode_spec(data.get("in_spec"), "input")
    out = data.get("out_spec")
    out_spec = None if out is None else _decode_spec(out, "output")
    placeholders = sum(1 for n in graph.nodes if n.op == "placeholder")
    if in_spec.num_leaves != placeholders:
        raise FxoptError(f"the stored input structure has {in_spec.num_leaves} tensors, the graph {placeholders}")
    if in_spec.type is tuple and in_spec.num_children == 2 and in_spec.child(1).type is dict:
        keys = in_spec.child(1).context  # written into the generated forward as '{key}': identifiers only
        if not all(is_identifier(k) for k in keys):
            raise FxoptError(f"keyword input names {str(keys)[:100]} in the stored graph are not plain identifiers")
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(orig_args, in_spec, out_spec))


def _type_name(kind: type, where: str) -> str:
    for name, known in _BUILTIN.items():
        if kind is known:
            return name
    name = next((n for n, known in _REGISTERED.items() if known is kind), None)
    if name is not None:
        return name
    if _is_model_output(kind):
        return f"{kind.__module__}.{kind.__qualname__}"
    shown = f"{kind.__module__}.{kind.__qualname__}"
    raise UnsupportedError(
        f"the graph's {where} is a {shown}, a type fxopt cannot rebuild safely (known: tuple, list, dict, "
        f"OrderedDict, Hugging Face ModelOutput classes and types you registered). If it is a named tuple or a "
        f"dataclass registered with torch's pytree, register it before saving and before loading: "
        f"fxopt.io.allow_output_type({shown})")


def _is_model_output(kind: type) -> bool:
    base = _model_output_base()
    return base is not None and isinstance(kind, type) and issubclass(kind, base) and kind is not base


def _model_output_base() -> type | None:
    generic = sys.modules.get("transformers.utils.generic")  # only if transformers is in use already
    return getattr(generic, "ModelOutput", None)


def _resolve_type(name: str, where: str) -> type:
    if name in _BUILTIN:
        return _BUILTIN[name]
    if name in _REGISTERED:
        return _REGISTERED[name]
    parts = name.split(".")
    if name.startswith("transformers.") and all(is_identifier(p) for p in parts):
        kind = _hf_output_type(name)
        if kind is not None:
            return kind
    raise UnsupportedError(
        f"the stored {where} structure names the type {name[:100]!r}, which fxopt does not know in this process; "
        f"refusing to load it (fxopt.load never imports a name from a file). For a Hugging Face output class, "
        f"import the module that defines it first; for a type of yours, register it with "
        f"fxopt.io.allow_output_type(cls)")


def _hf_output_type(name: str) -> type | None:
    """A ``ModelOutput`` subclass by its qualified name: one of ``transformers.modeling_outputs`` (imported by
    fxopt itself) or one this process has defined already (it is then in torch's pytree registry)."""
    module_name, _, attr = name.rpartition(".")
    if module_name == _HF_OUTPUTS_MODULE:
        try:
            kind = getattr(importlib.import_module(_HF_OUTPUTS_MODULE), attr, None)
        except ImportError:
            kind = None
        if isinstance(kind, type) and _is_model_output(kind):
            return kind
    for kind in list(pytree.SUPPORTED_NODES):
        if f"{kind.__module__}.{kind.__qualname__}" == name and _is_model_output(kind):
            return kind
    return None


def _encode_spec(spec: pytree.TreeSpec, where: str) -> dict[str, Any]:
    if spec.is_leaf():
        return {"leaf": True}
    kind = spec.type
    if kind is collections.namedtuple:  # torch's pytree: the node type is namedtuple, the context the class
        return {"type": "namedtuple", "context": _type_name(spec.context, where),
                "children": [_encode_spec(c, where) for c in spec.children()]}
    name = _type_name(kind, where)
    context = spec.context
    if context is not None:
        if not (_str_list(context) or (isinstance(context, list) and len(context) == 2
                                       and all(_str_list(c) for c in context))):
            raise UnsupportedError(f"the graph's {where} structure ({name}) has keys that are not strings "
                                   f"({str(context)[:80]}); fxopt stores string keys only")
        context = [list(c) if isinstance(c, list) else c for c in context]
    return {"type": name, "context": context,
            "children": [_encode_spec(c, where) for c in spec.children()]}


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(k, str) for k in value)


def _decode_spec(data: Any, where: str) -> pytree.TreeSpec:
    if not isinstance(data, dict):
        raise FxoptError(f"malformed {where} structure in the stored graph: {str(data)[:80]!r}")
    if data.get("leaf") is True and len(data) == 1:
        return pytree.treespec_leaf()
    name, context, children = data.get("type"), data.get("context"), data.get("children")
    if not isinstance(name, str) or not isinstance(children, list):
        raise FxoptError(f"malformed {where} structure in the stored graph: {str(data)[:80]!r}")
    specs = [_decode_spec(c, where) for c in children]
    if name == "namedtuple":
        cls = _REGISTERED.get(context) if isinstance(context, str) else None
        if cls is None or not pytree.is_namedtuple_class(cls):
            raise UnsupportedError(
                f"the stored {where} structure holds a named tuple {str(context)[:100]!r}, which is not registered "
                f"in this process; refusing to load it. Register the class first: fxopt.io.allow_output_type(cls)")
        if len(cls._fields) != len(specs):
            raise FxoptError(f"the stored {where} structure gives {context} {len(specs)} values for "
                             f"{len(cls._fields)} fields")
        return pytree.TreeSpec(collections.namedtuple, cls, specs)
    kind = _resolve_type(name, where)
    if kind in (tuple, list, type(None)):
        if context is not None:
            raise FxoptError(f"a stored {name} in the {where} structure carries keys")
    else:
        # dict / OrderedDict / ModelOutput: [key, ...]; a torch.utils._pytree.register_dataclass class:
        # [[field set, ...], [field left None, ...]]
        split = kind not in _KEYED and isinstance(context, list) and len(context) == 2 and all(
            _str_list(c) for c in context)
        keys = context[0] if split else context
        if not _str_list(keys):
            raise FxoptError(f"the stored {name} in the {where} structure needs a list of string keys")
        names = [*keys, *(context[1] if split else [])]
        if len(keys) != len(specs) or len(set(names)) != len(names):
            raise FxoptError(f"the stored {name} in the {where} structure has {len(keys)} keys for "
                             f"{len(specs)} values")
        if kind not in _KEYED:
            fields = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else set()
            unknown = [k for k in names if k not in fields]
            if unknown:
                raise FxoptError(f"the stored {where} structure gives {name} the fields {unknown[:5]}, which it "
                                 f"does not have")
    if kind is type(None) and specs:
        raise FxoptError(f"a stored None in the {where} structure has children")
    return pytree.TreeSpec(kind, context, specs)


# --- input shape checks -----------------------------------------------------------------------------------------
# A module from torch.export checks its inputs before running (a forward pre-hook reading each placeholder's
# example shape and the exported dims' ranges): a dimension fixed at export time must match, a dynamic one must
# lie in its range and equal the other dimensions that share its symbol. The file keeps that as data:
#     [None | [dim, ...] per input], dim = int | [symbol, min, max or None] | None (an expression: not checked)
# and load installs fxopt's own check (:func:`_check_inputs`) on the rebuilt module.

_SYMBOL = re.compile(r"^[A-Za-z_]\w{0,30}$")


def _has_torch_input_check(gm: torch.nn.Module) -> bool:
    return any(getattr(h, "__name__", "") == "_check_input_constraints_pre_hook" for h in gm._forward_pre_hooks.values())


def encode_input_checks(gm: torch.fx.GraphModule) -> list | None:
    """The input checks of a module from torch.export (``None`` when it has none: a symbolic graph, or a graph
    that fxopt rebuilt after export, which does not check its inputs either)."""
    ranges = getattr(gm, "range_constraints", None)
    if pytree_codegen(gm.graph) is None or not isinstance(ranges, dict) or not _has_torch_input_check(gm):
        return None
    checks: list = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            checks.append(None)
            continue
        dims: list = []
        for dim in val.shape:
            if not isinstance(dim, torch.SymInt):
                dims.append(int(dim))
                continue
            expr = dim.node.expr
            if expr.is_number:
                dims.append(int(expr))
            elif expr.is_Symbol and expr in ranges:
                low, high = ranges[expr].lower, ranges[expr].upper
                dims.append([str(expr), _bound(low) or 0, _bound(high)])
            else:
                dims.append(None)
        checks.append(dims)
    return checks


def _bound(value: Any) -> int | None:
    """A range bound as an int; ``None`` for an infinite one."""
    return int(value) if isinstance(value, int) or getattr(value, "is_Integer", False) else None


def decode_input_checks(data: Any, graph: torch.fx.Graph) -> list | None:
    """The stored input checks, validated against ``graph`` (numbers and short symbol names only)."""
    if data is None:
        return None
    placeholders = len(graph.find_nodes(op="placeholder"))
    if pytree_codegen(graph) is None or not isinstance(data, list) or len(data) != placeholders:
        raise FxoptError("malformed input checks in the stored graph")
    for dims in data:
        if dims is not None and not (isinstance(dims, list) and all(_valid_dim(d) for d in dims)):
            raise FxoptError(f"malformed input check {str(dims)[:80]!r} in the stored graph")
    return data


def install_input_checks(checks: list | None, gm: torch.fx.GraphModule) -> None:
    """Check inputs as the exported module did before every call of ``gm`` (fxopt's own hook, not the file's)."""
    info = pytree_codegen(gm.graph)
    if checks is not None and info is not None:
        gm.register_forward_pre_hook(functools.partial(_check_inputs, checks, list(info.orig_args)),
                                     with_kwargs=True)


def _valid_dim(dim: Any) -> bool:
    if dim is None or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0):
        return True
    return (isinstance(dim, list) and len(dim) == 3 and isinstance(dim[0], str) and bool(_SYMBOL.match(dim[0]))
            and isinstance(dim[1], int) and (dim[2] is None or isinstance(dim[2], int)))


def _check_inputs(checks: list, names: list[str], module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    values = [*args, *(kwargs[n] for n in names[len(args):] if n in kwargs)]
    leaves = [leaf for v in values for leaf in pytree.tree_leaves(v)]
    if len(leaves) != len(checks):
        raise FxoptError(f"the model takes {len(checks)} inputs ({', '.join(names)}), got {len(leaves)}")
    seen: dict[str, int] = {}
    for i, (leaf, dims) in enumerate(zip(leaves, checks)):
        if dims is None:
            continue
        where = f"input {i} ({names[i]})" if len(names) == len(checks) else f"input {i}"
        if not isinstance(leaf, torch.Tensor) or leaf.dim() != len(dims):
            shown = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise FxoptError(f"{where}: expected a tensor with {len(dims)} dimensions, got {shown}")
        for j, (size, dim) in enumerate(zip(leaf.shape, dims)):
            if isinstance(dim, int) and size != dim:
                raise FxoptError(f"{where}: dimension {j} must be {dim} (fixed when the model was exported), got "
                                 f"{size}; export with an example input that varies it to make it dynamic")
            if isinstance(dim, list):
                symbol, low, high = dim
                if (low > 2 and size < low) or (high is not None and size > high):
                    raise FxoptError(f"{where}: dimension {j} must lie in [{low}, {high if high is not None else math.inf}]"
                                     f", got {size}")
                if seen.setdefault(symbol, size) != size:
                    raise FxoptError(f"{where}: dimension {j} must equal the other input dimensions exported as "
                                     f"{symbol} ({seen[symbol]}), got {size}")
