"""The user's own (eager) model with the compressed layers swapped in, returned by ``compile`` instead of the
GraphModule when that is the same computation.

Compression passes such as ``prune-channels`` and ``low-rank`` only replace layers: the graph calls the same
things in the same order, some of them now smaller (or, for ``low-rank``, ``name`` became the pair
``name.0 -> name.1`` of an ``nn.Sequential`` stored under ``name``). Running such a model as a
``torch.fx.GraphModule`` costs a fixed overhead per call that the eager model does not pay (measured: ~0.7 ms
per batch-1 call of regnet_x_400mf, 4-5% of its single-thread latency, whoever pruned it). When

- every pass that modified the graph declares ``swaps_modules = True`` (it only replaces submodules or
  attributes by qualified name, and any graph edit it makes is what calling the replacement does),
- the graph still has the same placeholders, functions, methods (with the same literal arguments) and output,
  and every ``call_module`` target is an original target or a child of one (the structure check below), and
- the eager copy gives the same outputs as the GraphModule on the example inputs,

``compile`` returns a deep copy of the user's model with each called submodule (every alias of it) and each
graph attribute replaced by the GraphModule's. The GraphModule's ``meta`` (pass records, per-layer notes,
example inputs) goes with it, with the graph: :func:`graph_form` rebuilds a GraphModule over the module's current
layers (sharing every parameter), which is what ``fxopt.save`` stores for ``.pt`` / ``.pt2`` files.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_flatten, tree_map

from fxopt import meta
from fxopt.graph_utils import get_attr_path, set_attr_path

__all__ = ["GraphShape", "graph_shape", "eager_model", "graph_form"]

logger = logging.getLogger(__name__)

_GRAPH_FORM = "fxopt.graph_form"


@dataclass(frozen=True)
class GraphShape:
    """What a graph calls, apart from which module object sits behind each name."""

    calls: tuple[str, ...]  # call_module targets, in order
    attrs: tuple[str, ...]  # get_attr targets, in order
    others: tuple[tuple[str, str, str], ...]  # (op, target, literal arguments) of every other node, in order


def graph_shape(gm: torch.fx.GraphModule) -> GraphShape:
    calls, attrs, others = [], [], []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.append(str(node.target))
        elif node.op == "get_attr":
            attrs.append(str(node.target))
        else:
            literals = map_aggregate((node.args, node.kwargs), lambda a: "%" if isinstance(a, torch.fx.Node) else a)
            others.append((node.op, str(getattr(node.target, "__qualname__", node.target)), repr(literals)))
    return GraphShape(tuple(calls), tuple(attrs), tuple(others))


def graph_form(module: torch.nn.Module) -> torch.fx.GraphModule | None:
    """The GraphModule an eager ``compile`` result stands for (``None`` for any other module).

    Built on each call from the graph ``compile`` kept and the module's *current* layers (the graph's targets are
    looked up in ``module``), so layers swapped later (``fp.ApplyMasks().apply(module)``) are the ones it holds;
    the two share every parameter."""
    info = meta._gm_meta(module)
    graph = info.get(_GRAPH_FORM)
    if not isinstance(graph, torch.fx.Graph):
        return None
    gm = torch.fx.GraphModule(module, copy.deepcopy(graph), class_name=type(module).__name__)
    gm.meta.update({k: v for k, v in info.items() if k != _GRAPH_FORM})
    return gm


def _structure_kept(before: GraphShape, after: GraphShape) -> str:
    if before.others != after.others or before.attrs != after.attrs:
        return "the passes changed the graph's functions, methods, their literal arguments or constants"
    old = set(before.calls)
    for target in after.calls:
        if target not in old and not any(target.startswith(t + ".") for t in old):
            return f"the graph calls {target}, which replaces no original layer"
    now = set(after.calls)
    for target in old - now:
        if not any(c.startswith(target + ".") for c in now):
            return f"the passes removed the call of {target}"
    return ""


def _same_outputs(a: Any, b: Any) -> bool:
    flat_a, spec_a = tree_flatten(a)
    flat_b, spec_b = tree_flatten(b)
    if spec_a != spec_b or len(flat_a) != len(flat_b):
        return False
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.allclose(x, y, rtol=1e-5, atol=1e-6,
                                                                                 equal_nan=True):
                return False
        elif x != y:
            return False
    return True


def _fresh(args: tuple) -> tuple:
    """Copies of the example tensors (a model that writes into its input must not change the other run's input)."""
    return tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)


class _eval:
    """Both models in eval mode for the comparison (no BatchNorm statistics update, no dropout); flags restored."""

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        self.flags = [(m, m.training) for root in modules for m in root.modules()]

    def __enter__(self) -> None:
        for m, _ in self.flags:
            m.training = False

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag


def eager_model(model: torch.nn.Module, gm: torch.fx.GraphModule, before: GraphShape, passes: list,
                records: list, args: tuple) -> tuple[torch.nn.Module | None, str]:
    """``(eager module, "")``, or ``(None, why not)`` (see the module docstring)."""
    modified = [r.name for r in records if r.modified]
    if not modified:
        return None, "no pass modified the model"
    swappers = {p.label() for p in passes if getattr(p, "swaps_modules", False) and callable(getattr(p, "label", None))}
    others = [name for name in modified if name not in swappers]
    if others:
        return None, f"pass {others[0]!r} rewrites the graph"
    if not args:
        return None, "no example inputs to check the eager model against the graph"
    if meta.untraced_root(gm) is not None:
        return None, "the model's root is untraced"
    own = getattr(model, "meta", None)
    if own is not None and not (isinstance(own, dict) and _GRAPH_FORM in own):  # ours: an earlier eager result
        return None, "the model has its own 'meta' attribute"
    why = _structure_kept(before, graph_shape(gm))
    if why:
        return None, why
    eager = copy.deepcopy(model)
    aliases: dict[int, list[str]] = {}
    for name, module in eager.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    try:
        for target in dict.fromkeys(before.calls):
            new = gm.get_submodule(target)
            for name in aliases.get(id(eager.get_submodule(target)), [target]):
                set_attr_path(eager, name, new)
        for target in dict.fromkeys(before.attrs):
            set_attr_path(eager, target, get_attr_path(gm, target))
    except (AttributeError, TypeError) as exc:  # a traced name the user's model does not have as such
        return None, f"the graph's layers cannot be placed into the model ({exc})"
    try:
        with torch.no_grad(), _eval([eager, gm]):
            same = _same_outputs(eager(*_fresh(args)), gm(*_fresh(args)))
    except Exception as exc:  # the eager forward reads something the passes changed
        return None, f"the eager model with the new layers fails ({type(exc).__name__}: {exc})"
    if not same:
        return None, "the eager model with the new layers does not match the graph on the example inputs"
    eager.meta = dict(gm.meta)
    eager.meta[_GRAPH_FORM] = gm.graph
    return eager, ""
