"""fxopt's self-contained file format for compiled models (``fxopt.save(module, "m.pt")`` / ``"m.pt2"``).

Everything ``fxopt.compile`` returns with a PyTorch backend -- a float or fused ``GraphModule``, fp16 and
dynamic int8 graphs, a lowered static-int8 :class:`fxopt.quant.nn.QuantizedModel` (x86 or qnnpack) -- is
written as plain data only (``.pt``: with ``torch.save``; ``.pt2``: the same bytes inside a PT2 archive)::

    {"format": "fxopt.graph.v1", "wrapper": "QuantizedModel" | "GraphModule", "engine": "x86",
     "backend": "x86" | None, "float_islands": [[node, op, reason], ...],
     "graph": [node entries],                  # fxopt.io.graph_format
     "modules": {target: {"class": name, "state": ...}},   # fxopt.io.module_format
     "attrs": {target: tensor or {"int_repr": ..., ...}},  # get_attr constants
     "pytree": None | {"orig_args": [...], "in_spec": ..., "out_spec": ...}}  # fxopt.io.pytree_format

``load`` reads it with ``torch.load(weights_only=True)`` (a pickled object is refused before anything is
built), rebuilds modules only from the allowlisted classes, packs the int8 weights again under the stored
engine and rebuilds the fx graph from allowlisted functions: it never runs code stored in the file.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from torch import nn

from .. import meta
from ..errors import FxoptError, UnsupportedError
from ..graph_utils import get_attr_path
from ..quant.nn import QuantizedModel, engine_scope, local_engine
from ..quant.nn.model import FREEZE_MODES
from ..quant.qstate import qtensor_from_state, qtensor_state
from .graph_format import decode_graph, encode_graph, is_module_path
from .module_format import check_entry, decode_module, encode_module
from .pytree_format import (decode_codegen, decode_input_checks, encode_codegen, encode_input_checks,
                            install_input_checks)

__all__ = ["FORMAT_TAG", "FORMAT_TAGS", "from_plain", "is_graph_model", "to_plain"]

logger = logging.getLogger(__name__)

FORMAT_TAG = "fxopt.graph.v1"
FORMAT_TAGS = (FORMAT_TAG, "fxopt.int8_graph.v1")  # the int8-only name of the same format, read too
_WRAPPERS = ("QuantizedModel", "GraphModule")


def is_graph_model(module: nn.Module) -> bool:
    """What this format stores: a GraphModule (what ``compile`` returns) or a lowered ``QuantizedModel``."""
    return isinstance(module, (QuantizedModel, torch.fx.GraphModule))


def to_plain(module: nn.Module) -> dict[str, Any]:
    """The file contents for ``module`` (see the module docstring); :class:`UnsupportedError` if it cannot be."""
    if isinstance(module, QuantizedModel):
        gm, engine, wrapper = module.graph_module, module.engine, "QuantizedModel"
    elif isinstance(module, torch.fx.GraphModule):
        gm, engine, wrapper = module, torch.backends.quantized.engine, "GraphModule"
    else:
        raise UnsupportedError(f"fxopt's graph format stores fx graphs; got a {type(module).__name__}")
    modules: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    graph = encode_graph(gm.graph)  # refuses non-allowlisted functions first
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in modules:
            modules[node.target] = encode_module(gm.get_submodule(node.target), node.target)
    for node in gm.graph.nodes:
        # a constant inside a stored module (e.g. a conv's weight read directly) travels with that module
        if node.op == "get_attr" and node.target not in attrs and not any(
                node.target.startswith(m + ".") for m in modules):
            attrs[node.target] = _encode_attr(get_attr_path(gm, node.target), node.target)
    islands = [[str(i.node), str(i.op), str(i.reason)] for i in meta.float_islands(gm)]
    return {
        "format": FORMAT_TAG, "wrapper": wrapper, "engine": engine, "backend": meta.backend_of(gm),
        "float_islands": islands, "graph": graph, "modules": modules, "attrs": attrs,
        "pytree": encode_codegen(gm.graph),  # a torch.export graph's input/output structure, else None
        "input_checks": encode_input_checks(gm),  # and the input shapes it accepts, if it checks them
        "torch_version": str(torch.__version__),
        "freeze": module.freeze if isinstance(module, QuantizedModel) else False,  # traced again after load
    }


def _encode_attr(value: Any, target: str) -> Any:
    if isinstance(value, torch.Tensor):
        return qtensor_state(value) if value.is_quantized else value.detach()
    raise UnsupportedError(f"graph constant {target!r} is a {type(value).__name__}; fxopt's int8 format stores "
                           f"only tensor constants")


def _decode_attr(value: Any, target: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return qtensor_from_state(value)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise FxoptError(f"graph constant {target!r} in the file is neither a tensor nor a quantized tensor: "
                         f"{exc}") from exc


def _place(root: nn.Module, target: str, value: nn.Module | torch.Tensor, where: str) -> None:
    try:
        _place_at(root, target, value)
    except (KeyError, TypeError, AttributeError) as exc:
        raise FxoptError(f"{where}: cannot place {target!r} in the rebuilt model: {exc}") from exc


def _place_at(root: nn.Module, target: str, value: nn.Module | torch.Tensor) -> None:
    *parents, last = target.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(value, nn.Module):
        owner.add_module(last, value)
    else:
        owner.register_buffer(last, value)


def _holds(root: nn.Module, target: str) -> bool:
    try:
        return isinstance(get_attr_path(root, target), torch.Tensor)
    except (AttributeError, KeyError, TypeError):
        return False


def from_plain(obj: dict[str, Any], where: str) -> nn.Module:
    """The module stored in ``obj`` (already read with ``weights_only=True``)."""
    wrapper, graph_data = obj.get("wrapper"), obj.get("graph")
    modules, attrs = obj.get("modules"), obj.get("attrs")
    if wrapper not in _WRAPPERS or not isinstance(modules, dict) or not isinstance(attrs, dict):
        raise FxoptError(f"{where} is not a valid fxopt model file (missing or malformed 'wrapper'/'modules'/'attrs')")
    engine = obj.get("engine")
    if not isinstance(engine, str):
        raise FxoptError(f"{where} is not a valid fxopt model file (no engine named)")
    # every check before anything is built: functions and methods of the graph, then every module class
    graph = decode_graph(graph_data)
    decode_codegen(obj.get("pytree"), graph)
    input_checks = decode_input_checks(obj.get("input_checks"), graph)
    for target, entry in modules.items():
        check_entry(entry, str(target)[:80])
    engine = local_engine(engine)
    root = nn.Module()
    with engine_scope(engine), torch.no_grad():
        for target in sorted(modules, key=lambda t: str(t).count(".")):
            if not is_module_path(target):
                raise FxoptError(f"module path {str(target)[:80]!r} in {where} is not a dotted identifier path")
            _place(root, target, decode_module(modules[target], target), where)
        for target, value in attrs.items():
            if not is_module_path(target):
                raise FxoptError(f"constant path {str(target)[:80]!r} in {where} is not a dotted identifier path")
            _place(root, target, _decode_attr(value, target), where)
    for node in graph.nodes:
        if node.op == "call_module" and node.target not in modules:
            raise FxoptError(f"node {node.name!r} of {where} uses {node.target!r}, which the file does not hold")
        if node.op == "get_attr" and node.target not in attrs and not _holds(root, node.target):
            raise FxoptError(f"node {node.name!r} of {where} reads {node.target!r}, which the file does not hold")
    gm = torch.fx.GraphModule(root, graph, class_name="Int8GraphModule" if wrapper == "QuantizedModel"
                              else "FxoptGraphModule")
    install_input_checks(input_checks, gm)
    backend = obj.get("backend")
    if isinstance(backend, str):
        meta.set_backend(gm, backend)
    islands = obj.get("float_islands") or []
    meta.set_float_islands(gm, [meta.FloatIsland(*map(str, i)) for i in islands if isinstance(i, list) and len(i) == 3])
    logger.debug("loaded %s: %d nodes, %d modules, engine %s", where, len(graph.nodes), len(modules), engine)
    if wrapper == "QuantizedModel":
        freeze = obj.get("freeze")
        return QuantizedModel(gm, engine, freeze=freeze if freeze in FREEZE_MODES else False).eval()
    return gm.eval()
