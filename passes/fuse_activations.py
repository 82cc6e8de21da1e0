"""``fuse-activations``: pair conv/linear/add with the ReLU/ReLU6 that follows, for fused kernels.

Float numerics do not change: the fused modules compute exactly ``activation(producer(x))``.

What the graph looks like afterwards (quantization lowering relies on this):

* ``nn.Conv1d/2d/3d`` followed by an activation becomes one ``call_module`` node whose target (the
  conv's old qualified name) is now a :class:`fxopt.quant.nn.FusedConv`; ``.conv`` is the original conv module and
  ``.activation`` an ``nn.ReLU()`` or ``nn.ReLU6()``. Likewise ``nn.Linear`` → :class:`FusedLinear`
  (``.linear``, ``.activation``).
* ``a + b`` (``operator.add``/``torch.add`` of two graph values, no ``alpha``) followed by an activation
  becomes one ``call_module`` node calling a new :class:`FusedAdd` (``.activation``) with ``(a, b)``.
  Its inputs may broadcast; lowering must check shapes before picking an ``add_relu`` kernel.
* ``F.conv1d/2d/3d`` and ``F.linear`` calls followed by an activation are not rewritten, only tagged:
  the producer node gets ``fxopt.meta.fused_activation(node) == "relu"``, and both nodes get
  ``fxopt.meta.fusion_group(node) == "linear+relu"``; the activation's first argument is the producer.
* Every fused ``call_module`` node also carries ``fused_activation`` (``"relu"``/``"relu6"``) and
  ``fusion_group`` (``"conv+relu"``, ``"linear+relu6"``, ``"add+relu"``...).

Activations recognised: ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()`` (and the in-place
forms) → ``"relu"``; ``nn.ReLU6``, ``F.relu6``, ``nn.Hardtanh(0, 6)``, ``F.hardtanh(x, 0, 6)`` →
``"relu6"``. Other hardtanh bounds are left alone with a note.

Fusion happens only when the producer's output has a single user (the activation), the producer module
is called once in the graph and the graph does not read its parameters directly. Run ``fold-bn`` first:
a BatchNorm between conv and activation prevents fusion.
"""

from __future__ import annotations

import inspect
import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxopt import Pass, PassResult
from fxopt import meta
from fxopt.graph_utils import call_sites, delete_if_unreferenced, module_of, referenced_targets, unique_attr_name
from fxopt.quant.nn.fused import FusedAdd, FusedConv, FusedLinear

__all__ = ["FuseActivations"]

logger = logging.getLogger(__name__)

def _hardtanh_kind(min_val, max_val) -> str | None:
    return "relu6" if (min_val, max_val) == (0.0, 6.0) else None


def _activation(gm: torch.fx.GraphModule, node: torch.fx.Node, notes: list[str]) -> str | None:
    """``"relu"``/``"relu6"`` when ``node`` is such an activation of its first argument."""
    if node.op == "call_module":
        module = module_of(gm, node)
        if type(module) is nn.ReLU:
            return "relu"
        if type(module) is nn.ReLU6:
            return "relu6"
        if type(module) is nn.Hardtanh:
            kind = _hardtanh_kind(module.min_val, module.max_val)
            if kind is None:
                notes.append(f"{node.name}: Hardtanh({module.min_val}, {module.max_val}) not fused, only (0, 6)")
            return kind
        return None
    if node.op == "call_method":
        return "relu" if node.target in ("relu", "relu_") else None
    if node.op != "call_function":
        return None
    if node.target in (F.relu, torch.relu, torch.relu_):
        return "relu"
    if node.target is F.relu6:
        return "relu6"
    if node.target is F.hardtanh:
        try:
            bound = inspect.signature(F.hardtanh).bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        kind = _hardtanh_kind(bound.arguments["min_val"], bound.arguments["max_val"])
        if kind is None:
            notes.append(f"{node.name}: hardtanh{tuple(bound.arguments.values())[1:3]} not fused, only (0, 6)")
        return kind
    return None


def _producer_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    if node.op == "call_module":
        module = module_of(gm, node)
        if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return "conv"
        if type(module) is nn.Linear:
            return "linear"
        return None
    if node.op != "call_function":
        return None
    if node.target in (operator.add, torch.add):
        tensors = len(node.args) == 2 and all(isinstance(a, torch.fx.Node) for a in node.args)
        return "add" if tensors and not node.kwargs else None
    if node.target in (F.conv1d, F.conv2d, F.conv3d):
        return "conv-functional"
    if node.target is F.linear:
        return "linear-functional"
    return None


@dataclass(frozen=True)
class FuseActivations(Pass):
    """Fuse conv/linear/add with a following ReLU/ReLU6 (see the module docstring for the result)."""

    name = "fuse-activations"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        notes: list[str] = []
        stats: dict[str, int] = {}
        for act in list(gm.graph.nodes):
            kind = _activation(gm, act, notes)
            producer = act.args[0] if kind and act.args else None
            if not isinstance(producer, torch.fx.Node):
                continue
            what = _producer_kind(gm, producer)
            if what is None or meta.fused_activation(producer) is not None:
                continue
            pattern = f"{what.split('-')[0]}+{kind}"
            why = _why_not(gm, producer, act)
            if why:
                notes.append(f"{producer.name}: not fused with {act.name}, {why}")
                continue
            if what.endswith("-functional"):
                meta.set_fused_activation(producer, kind)
                meta.set_fusion_group(producer, pattern)
                meta.set_fusion_group(act, pattern)
            else:
                _fuse(gm, producer, act, what, kind, pattern)
            stats[pattern] = stats.get(pattern, 0) + 1
        modified = bool(stats)
        if modified:
            gm.graph.lint()
            gm.recompile()
        logger.debug("fuse-activations: %s", stats)
        return PassResult(gm, modified, stats, notes)


def _why_not(gm: torch.fx.GraphModule, producer: torch.fx.Node, act: torch.fx.Node) -> str:
    if len(producer.users) != 1:
        others = ", ".join(u.name for u in producer.users if u is not act)
        return f"its output is also used by {others}"
    if producer.op == "call_module":
        module = module_of(gm, producer)
        if len(call_sites(gm, module)) != 1:
            return f"{producer.target} is called more than once (shared module)"
        if any(t.startswith(producer.target + ".") for t in referenced_targets(gm)):
            return f"the graph also reads {producer.target}'s parameters directly"
    return ""


def _fuse(gm: torch.fx.GraphModule, producer: torch.fx.Node, act: torch.fx.Node, what: str, kind: str,
          pattern: str) -> None:
    activation = FusedAdd.activation_for(kind)
    if what == "add":
        name = unique_attr_name(gm, f"{producer.name}_{kind}")
        gm.add_submodule(name, FusedAdd(activation))
        with gm.graph.inserting_before(act):
            fused = gm.graph.call_module(name, tuple(producer.args))
    else:
        inner = module_of(gm, producer)
        wrapper = FusedConv(inner, activation) if what == "conv" else FusedLinear(inner, activation)
        parent_path, _, attr = producer.target.rpartition(".")
        setattr(gm.get_submodule(parent_path) if parent_path else gm, attr, wrapper)
        fused = producer
    fused.meta.update({k: v for k, v in act.meta.items() if k in ("tensor_meta", "val", "stack_trace")})
    meta.set_fused_activation(fused, kind)
    meta.set_fusion_group(fused, pattern)
    act.replace_all_uses_with(fused)
    act_target = act.target if act.op == "call_module" else None
    gm.graph.erase_node(act)
    if fused is not producer:
        gm.graph.erase_node(producer)
    if act_target is not None:
        delete_if_unreferenced(gm, act_target)
