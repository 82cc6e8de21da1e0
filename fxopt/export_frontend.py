"""The ``torch.export`` frontend: an aten-level graph that fxopt's module passes can still work on.

``torch.export`` traces models whose Python ``torch.fx`` cannot run on proxies (Hugging Face
transformers' output and keyword handling, for one). Its graph is aten-level: a ``nn.Linear`` is an
``aten.linear`` call on two ``get_attr`` weights, not a module call. fxopt *lifts* the calls of
Linear, Conv1d/Conv2d and Embedding modules back to ``call_module`` nodes (the module keeps its
qualified name in the model, e.g. ``encoder.layer.0.attention.self.query``), so module-level passes
(dynamic quantization, fp16) and the static int8 passes find them as in a symbolic graph. transformers'
``Conv1D`` (GPT-2's Linear with a transposed weight: ``view → addmm → view``) is lifted the same way.

A call is lifted only when it is exactly what the module's ``forward`` computes (same stride,
padding, groups, bias...) and the module's weights are read by nothing else (a tied weight stays
aten-level).

Every tensor dimension of the example inputs is exported as ``Dim.AUTO``: torch.export keeps a
dimension dynamic unless the model's code fixes it, so a graph exported with a batch of 2 sequences of
16 tokens runs on other batch sizes and sequence lengths. The output keeps its type
(``BaseModelOutputWithPoolingAndCrossAttentions``...) through torch's pytree registry.

torch.export's ``_guards_fn`` submodule (input-shape assertions) is left out: the graph stays plain
(savable, no opaque module in reports) and inputs outside what the model accepts fail in the op that
cannot take them, as in the model.

Limit: train/eval behaviour is fixed in the graph at export time (``aten.dropout(x, p, False)`` in eval
mode); ``gm.train()`` flips the modules' flags (lifted modules follow them) but not those aten calls.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

from .graph_utils import set_attr_path

__all__ = ["conv1d_as_linear", "export", "is_conv1d", "lift_module_calls"]

log = logging.getLogger(__name__)

aten = torch.ops.aten


def export(model: torch.nn.Module, args: tuple) -> torch.fx.GraphModule:
    """``torch.export`` of ``model`` on ``args`` with dynamic dims, then module calls lifted.

    ``model`` must be a copy the caller owns (its parameters end up in the returned module).
    Raises whatever ``torch.export`` raises.
    """
    dims = torch.utils._pytree.tree_map(
        lambda a: {i: torch.export.Dim.AUTO for i in range(a.dim())} if isinstance(a, torch.Tensor) else None, args
    )
    exported = torch.export.export(model, args, dynamic_shapes=dims)
    gm = exported.module(check_guards=False)  # no _guards_fn submodule (see above)
    for refused in ("train", "eval"):  # torch.export's module refuses both; passes and users call them
        gm.__dict__.pop(refused, None)
    lifted = lift_module_calls(gm, model)
    log.info("torch.export of %s: %d module calls lifted", type(model).__name__, lifted)
    return gm


# ----------------------------------------------------------------------------------------------
# lifting aten calls back to module calls


def _linear(module: torch.nn.Module, kw: dict[str, Any]) -> bool:
    return type(module) is torch.nn.Linear


def _conv(module: torch.nn.Module, kw: dict[str, Any]) -> bool:
    return (
        module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and _same_ints(kw.get("stride", 1), module.stride)
        and _same_ints(kw.get("padding", 0), module.padding)
        and _same_ints(kw.get("dilation", 1), module.dilation)
        and kw.get("groups", 1) == module.groups
    )


def _same_ints(value: Any, expected: tuple[int, ...]) -> bool:
    """An aten int list (or one int, broadcast) equals the module's tuple."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * len(expected)
    if len(values) == 1:
        values = values * len(expected)
    return tuple(values) == tuple(expected)


def _embedding(module: torch.nn.Module, kw: dict[str, Any]) -> bool:
    padding_idx = -1 if module.padding_idx is None else module.padding_idx
    return (
        module.max_norm is None  # renormalisation is a separate aten op before the lookup
        and kw.get("padding_idx", -1) == padding_idx
        and kw.get("scale_grad_by_freq", False) == module.scale_grad_by_freq
        and kw.get("sparse", False) == module.sparse
    )


# aten op → (module type, name of its input argument, name of its weight argument, extra check)
_LIFTABLE: dict[Any, tuple[type, str, str, Callable[[torch.nn.Module, dict[str, Any]], bool]]] = {
    aten.linear.default: (torch.nn.Linear, "input", "weight", _linear),
    aten.conv1d.default: (torch.nn.Conv1d, "input", "weight", _conv),
    aten.conv2d.default: (torch.nn.Conv2d, "input", "weight", _conv),
    aten.embedding.default: (torch.nn.Embedding, "indices", "weight", _embedding),
}


def _normalized(node: torch.fx.Node) -> dict[str, Any] | None:
    pair = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    return None if pair is None else dict(pair.kwargs)


def _candidate(node: torch.fx.Node, model: torch.nn.Module) -> tuple[str, torch.fx.Node] | None:
    """(module path, input node) when ``node`` is exactly the forward of a module of ``model``."""
    if node.op != "call_function" or node.target not in _LIFTABLE:
        return None
    kind, input_name, weight_name, check = _LIFTABLE[node.target]
    kw = _normalized(node)
    if kw is None:
        return None
    weight = kw.get(weight_name)
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
        return None
    path = weight.target[: -len(".weight")]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if type(module) is not kind or not check(module, kw):
        return None
    bias = kw.get("bias")
    has_bias = getattr(module, "bias", None) is not None
    if has_bias != (bias is not None):
        return None
    if bias is not None and not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr" and bias.target == f"{path}.bias"):
        return None
    source = kw.get(input_name)
    return (path, source) if isinstance(source, torch.fx.Node) else None


def is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear with its weight stored transposed, ``(nx, nf)``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
        and getattr(module, "bias", None) is not None
    )


def conv1d_as_linear(module: torch.nn.Module) -> torch.nn.Linear:
    """The ``torch.nn.Linear`` computing what transformers' ``Conv1D`` does (its weight is ``(in, out)``)."""
    linear = torch.nn.Linear(module.nx, module.nf, device="meta")
    linear.weight = torch.nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    linear.bias = torch.nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return linear.train(module.training)


def _innermost_module(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _conv1d_candidate(node: torch.fx.Node, model: torch.nn.Module) -> tuple[str, torch.fx.Node, list] | None:
    """``view(addmm(bias, view(x, [-1, nx]), weight), size)`` from a ``Conv1D.forward``: (path, x, its nodes)."""
    if node.op != "call_function" or node.target is not aten.addmm.default or len(node.args) != 3 or node.kwargs:
        return None
    bias, flat, weight = node.args
    if not all(isinstance(a, torch.fx.Node) for a in (bias, flat, weight)):
        return None
    if weight.op != "get_attr" or not weight.target.endswith(".weight"):
        return None
    path = weight.target[: -len(".weight")]
    if bias.op != "get_attr" or bias.target != f"{path}.bias":
        return None
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if not is_conv1d(module) or flat.target is not aten.view.default or len(flat.users) != 1 or len(node.users) != 1:
        return None
    out = next(iter(node.users))
    if out.op != "call_function" or out.target is not aten.view.default:
        return None
    if any(_innermost_module(n) != path for n in (flat, node, out)):  # all three from that module's forward
        return None
    return path, flat.args[0], [out, node, flat]


def lift_module_calls(gm: torch.fx.GraphModule, model: torch.nn.Module) -> int:
    """Turn the aten calls that are exactly a Linear/Conv/Embedding (or transformers' Conv1D) of ``model``
    into ``call_module``.

    The module installed at the path is a copy of ``model``'s module sharing the parameters ``gm``
    already holds. Returns the number of module calls lifted.
    """
    found: dict[str, list[tuple[torch.fx.Node, torch.fx.Node, list[torch.fx.Node]]]] = {}
    for node in gm.graph.nodes:
        hit = _candidate(node, model)
        if hit is not None:
            found.setdefault(hit[0], []).append((node, hit[1], [node]))
            continue
        chain = _conv1d_candidate(node, model)
        if chain is not None:
            found.setdefault(chain[0], []).append((chain[2][0], chain[1], chain[2]))
    lifted = 0
    for path, calls in found.items():
        absorbed = {n for _, _, nodes in calls for n in nodes}
        params = [n for n in gm.graph.find_nodes(op="get_attr") if n.target.startswith(path + ".")]
        if any(user not in absorbed for p in params for user in p.users):
            log.debug("not lifting %s: its weights are also read elsewhere", path)
            continue
        container = gm.get_submodule(path)
        original = model.get_submodule(path)
        own = dict(container.named_parameters())
        if set(own) != {n for n, _ in original.named_parameters()} or list(container.buffers()):
            continue
        memo = {id(p): own[name] for name, p in original.named_parameters()}
        set_attr_path(gm, path, copy.deepcopy(original, memo))
        for output, source, nodes in calls:
            with gm.graph.inserting_before(output):
                call = gm.graph.call_module(path, (source,))
            call.meta.update(output.meta)
            output.replace_all_uses_with(call)
            for node in nodes:  # the output first: each one's users are gone before it
                inputs = node.all_input_nodes
                gm.graph.erase_node(node)
                _erase_unused_sizes(gm.graph, inputs)
            lifted += 1
        for p in params:
            gm.graph.erase_node(p)
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted


def _erase_unused_sizes(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Drop the ``sym_size`` reads that only the erased nodes used."""
    for node in nodes:
        if not node.users and node.op == "call_function" and node.target is aten.sym_size.int:
            graph.erase_node(node)
