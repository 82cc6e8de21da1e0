"""``prune-channels``: structured pruning that physically removes channels (fewer FLOPs, faster model).

The dependency analysis (``passes/_channel_groups.py``) labels every output channel of every Conv/Linear,
runs the graph once on example tensors shaped like the recorded inputs, and couples the channels that
must go together: residual adds, squeeze-excitation multiplies, concatenation offsets, depthwise and
grouped convolutions, BatchNorm, GroupNorm (whole groups), LayerNorm over the last dimension (channels-last
blocks, ``Linear -> LayerNorm -> Linear``), flatten -> linear feature blocks, channel shuffles. Connected components
of that coupling graph (networkx) are the pruning *units*; units linked through one layer form a
*group*. Each group loses ``ratio`` of its units (``n - int(n * (1 - ratio))``, at least one unit kept),
those with the smallest importance:

- ``"l1"`` / ``"l2"``: the L1 / L2 norm of the producing layers' output-channel weights, summed over a unit;
- ``"bn_scale"``: ``|gamma|`` of the BatchNorms on the unit's channels (network slimming); groups without a
  BatchNorm fall back to L1, with a note.

Groups that reach a graph output, a float island (untraced leaf), a model constant, an op the analysis
does not understand, or a protected layer are left alone; the notes (and ``fxopt.report``) say why.
By default the first conv and the classifier (the last Linear called, else the last Conv) are protected (``protect_ends``);
``protect`` names more layers, ``layer_ratios`` sets another ratio for the groups containing the named
layers (``{"layer4": 0.5}`` matches ``layer4`` and everything under it; the smallest match wins).

Pruned layers are new modules stored under the old names (the user's modules are not touched). Needs
the input shapes: compile with ``example_inputs``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxopt import Pass, PassResult, meta
from fxopt.errors import FxoptError

from ._channel_groups import ChannelGraph, Use, analyse, example_inputs_of
from ._compress import as_tuple, check_fraction
from fxopt.graph_utils import get_attr_path, set_attr_path

__all__ = ["PruneChannels", "IMPORTANCES"]

logger = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "bn_scale")


def _check_ratio(value: Any, what: str) -> None:
    check_fraction(value, what, "the fraction of channels removed")


@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove the least important channels of every prunable dependency group."""

    name = "prune-channels"
    swaps_modules: ClassVar[bool] = True  # only replaces layers: compile may return the eager model (fxopt.compress.eager)

    ratio: float = 0.3
    importance: str = "l1"
    layer_ratios: Any = ()  # {"layer4": 0.5} or (("layer4", 0.5),)
    protect: tuple = ()
    protect_ends: bool = True

    def __post_init__(self) -> None:
        _check_ratio(self.ratio, "ratio")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        pairs = tuple(self.layer_ratios.items()) if isinstance(self.layer_ratios, Mapping) else tuple(
            tuple(p) for p in self.layer_ratios)
        for key, value in pairs:
            if not isinstance(key, str):
                raise TypeError(f"layer_ratios keys must be layer names, got {key!r}")
            _check_ratio(value, f"layer_ratios[{key!r}]")
        object.__setattr__(self, "layer_ratios", pairs)
        object.__setattr__(self, "protect", as_tuple(self.protect))

    # ---- the pass ------------------------------------------------------------------------------
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        inputs = example_inputs_of(gm)
        protected = self._protected(gm)
        graph = analyse(gm, protected, inputs)
        if not graph.producers:
            return PassResult(gm, False, {"groups": 0}, ["nothing to prune: no Conv/Linear layer called in the graph"])
        unit, n_units = graph.units()
        groups = graph.groups(unit)
        keep, stats, notes, left_alone = self._decide(gm, graph, unit, n_units, groups)
        for layer, why in left_alone.items():
            meta.add_module_note(gm, layer, f"channels kept: {why}")
        if bool(keep.all()):
            notes.append("no channel removed")
            return PassResult(gm, False, stats, notes)
        params_before = sum(p.numel() for p in gm.parameters())
        self._rewrite(gm, graph, keep, inputs)
        stats["params_before"] = params_before
        stats["params_after"] = sum(p.numel() for p in gm.parameters())
        logger.debug("prune-channels: %s", stats)
        return PassResult(gm, True, stats, notes)

    def _protected(self, gm: torch.fx.GraphModule) -> dict[str, str]:
        layers = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
                  and isinstance(gm.get_submodule(n.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
        protected: dict[str, str] = {}
        if self.protect_ends and layers:
            # the classifier: the last Linear called, or the last layer when there is no Linear
            linears = [n for n in layers if isinstance(gm.get_submodule(n), nn.Linear)]
            last = (linears or layers)[-1]
            protected[layers[0]] = f"it contains the first layer {layers[0]} (protected; protect_ends=False to prune it)"
            protected[last] = f"it contains the classifier {last} (protected; protect_ends=False to prune it)"
        for name in layers:
            if any(name == p or name.startswith(p + ".") for p in self.protect):
                protected[name] = f"it contains {name}, protected by protect={self.protect!r}"
        return protected

    def _ratio_for(self, layers: list[str]) -> float:
        found = [r for key, r in self.layer_ratios for layer in layers if layer == key or layer.startswith(key + ".")]
        return min(found) if found else self.ratio

    def _decide(self, gm: torch.fx.GraphModule, graph: ChannelGraph, unit: torch.Tensor, n_units: int,
                groups: list[list[int]]):
        unit_reason: dict[int, str] = {}
        for label, reason in graph.fixed.items():
            unit_reason.setdefault(int(unit[label]), reason)
        group_of = torch.empty(n_units, dtype=torch.long)
        for g, members in enumerate(groups):
            group_of[members] = g
        layers_of: dict[int, list[str]] = {}
        for name, labels in graph.producers.items():
            for g in torch.unique(group_of[unit[labels]]).tolist():
                layers_of.setdefault(g, []).append(name)
        l1, l2, bn = self._importances(gm, graph, unit, n_units)
        keep = torch.ones(graph.n_labels, dtype=torch.bool)
        notes: list[str] = []
        left_alone: dict[str, str] = {}
        pruned_groups = removed_units = 0
        for g, members in enumerate(groups):
            layers = layers_of.get(g)
            if not layers:
                continue  # only graph inputs / constants
            reasons = list(dict.fromkeys(unit_reason[u] for u in members if u in unit_reason))
            if reasons:
                why = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
                notes.append(f"group {_names(layers)}: left alone, {why}")
                for layer in layers:
                    left_alone[layer] = why
                continue
            ratio = self._ratio_for(layers)
            n = len(members)
            n_prune = n - max(1, int(n * (1.0 - ratio) + 1e-9))
            if n_prune <= 0:
                notes.append(f"group {_names(layers)}: left alone, its channels are coupled into {n} unit(s); "
                             f"ratio {ratio} removes none")
                for layer in layers:
                    left_alone[layer] = f"coupled into {n} unit(s), ratio {ratio} removes none"
                continue
            scores = l1
            if self.importance == "l2":
                scores = l2
            elif self.importance == "bn_scale":
                if bool((bn[members] > 0).any()):
                    scores = bn
                else:
                    notes.append(f"group {_names(layers)}: no BatchNorm, ranked by L1 instead of bn_scale")
            members_t = torch.tensor(members)
            drop = members_t[scores[members_t].argsort(stable=True)[:n_prune]]
            keep[torch.isin(unit, drop)] = False
            pruned_groups += 1
            removed_units += n_prune
        # a layer must keep at least one input and one output channel
        for name, use in graph.uses.items():
            for labels in (use.inputs, use.outputs):
                if labels is not None and labels.numel() and not bool(keep[labels].any()):
                    keep[labels] = True
                    notes.append(f"{name}: would lose every channel; its group kept")
        stats = {"groups": sum(1 for g in range(len(groups)) if g in layers_of), "pruned_groups": pruned_groups,
                 "units_removed": removed_units, "channels_removed": int((~keep).sum())}
        return keep, stats, notes, left_alone

    def _importances(self, gm: torch.fx.GraphModule, graph: ChannelGraph, unit: torch.Tensor, n_units: int):
        l1 = torch.zeros(n_units, dtype=torch.float64)
        l2 = torch.zeros(n_units, dtype=torch.float64)
        bn = torch.zeros(n_units, dtype=torch.float64)
        for name, use in graph.uses.items():
            module = gm.get_submodule(name)
            if use.kind == "bn":
                if module.weight is not None:
                    bn.index_add_(0, unit[use.inputs], module.weight.detach().abs().double().cpu())
                continue
            if use.outputs is None or use.kind == "depthwise":
                continue
            rows = module.weight.detach().float().cpu().reshape(module.weight.shape[0], -1)
            l1.index_add_(0, unit[use.outputs], rows.abs().sum(1).double())
            l2.index_add_(0, unit[use.outputs], rows.pow(2).sum(1).double())
        return l1, l2.sqrt(), bn

    def _rewrite(self, gm: torch.fx.GraphModule, graph: ChannelGraph, keep: torch.Tensor, inputs: list) -> None:
        old: dict[str, nn.Module] = {}
        for name, use in graph.uses.items():
            kin = keep[use.inputs]
            kout = keep[use.outputs] if use.outputs is not None else None
            if bool(kin.all()) and (kout is None or bool(kout.all())):
                continue
            module = gm.get_submodule(name)
            old[name] = module
            set_attr_path(gm, name, _shrunk(module, use, kin, kout))
        for target, ids in graph.attrs.items():  # per-channel vectors read with get_attr
            kept = keep[ids]
            if bool(kept.all()):
                continue
            value = get_attr_path(gm, target)
            old[target] = value
            dim = next(d for d, size in enumerate(value.shape) if size > 1)
            sliced = value.detach().index_select(dim, kept.reshape(-1).nonzero().reshape(-1)).clone()
            set_attr_path(gm, target, _param(sliced, value) if isinstance(value, nn.Parameter) else sliced)
        old_args = {}
        for node in gm.graph.nodes:  # F.layer_norm: the literal normalized_shape follows the channels kept
            if node.name in graph.norm_shapes:
                old_args[node] = (node.args, dict(node.kwargs))
                size = (int(keep[graph.norm_shapes[node.name]].sum()),)
                if len(node.args) > 1:
                    node.args = (node.args[0], size, *node.args[2:])
                else:
                    node.update_kwarg("normalized_shape", size)
        if old_args:
            gm.recompile()
        try:
            ShapeProp(gm).propagate(*inputs)  # checks the pruned model runs, refreshes the shape metadata
        except Exception as exc:
            for name, module in old.items():
                set_attr_path(gm, name, module)
            for node, (args, kwargs) in old_args.items():
                node.args, node.kwargs = args, kwargs
            gm.recompile()
            raise FxoptError(f"prune-channels built a model that does not run ({type(exc).__name__}: {exc}); "
                             "the graph was restored. Please report this model; protect=... the layers "
                             "involved works around it") from exc


def _names(layers: list[str]) -> str:
    return ", ".join(layers[:4]) + (f" (+{len(layers) - 4})" if len(layers) > 4 else "")


def _param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad)


def _shrunk(module: nn.Module, use: Use, kin: torch.Tensor, kout: torch.Tensor | None) -> nn.Module:
    """A copy of ``module`` without the dropped input/output channels."""
    new = copy.deepcopy(module)
    if use.kind == "bn":
        if module.weight is not None:
            new.weight = _param(module.weight[kin], module.weight)
            new.bias = _param(module.bias[kin], module.bias)
        if module.running_mean is not None:
            new.running_mean = module.running_mean[kin].clone()
            new.running_var = module.running_var[kin].clone()
        new.num_features = int(kin.sum())
        return new
    if use.kind in ("groupnorm", "layernorm"):
        return _shrunk_norm(module, use, kin)
    weight = module.weight
    if use.kind == "depthwise":
        kout = kin.repeat_interleave(module.out_channels // module.in_channels)
        w = weight[kout]
        new.groups = int(kin.sum())
    elif use.kind == "grouped":
        local = kin.reshape(module.groups, -1)
        if not bool((local == local[0]).all()):
            raise FxoptError(f"prune-channels: grouped conv {module} lost different channels in different groups")
        w = weight[kout][:, local[0]]
    else:
        w = weight[kout][:, kin]
    new.weight = _param(w, weight)
    if module.bias is not None:
        new.bias = _param(module.bias[kout], module.bias)
    if isinstance(module, nn.Linear):
        new.in_features, new.out_features = int(kin.sum()), int(kout.sum())
    else:
        new.in_channels, new.out_channels = int(kin.sum()), int(kout.sum())
    return new


def _shrunk_norm(module: nn.Module, use: Use, kin: torch.Tensor) -> nn.Module:
    """GroupNorm without the dropped groups, or LayerNorm (over the last dimension) without the dropped channels."""
    new = copy.deepcopy(module)
    kept = int(kin.sum())
    if use.kind == "groupnorm":
        local = kin.reshape(module.num_groups, -1)
        if not bool((local == local[:, :1]).all()):
            raise FxoptError(f"prune-channels: GroupNorm {module} lost part of a group")
        new.num_groups, new.num_channels = int(local[:, 0].sum()), kept
    else:
        new.normalized_shape = (kept,)
    if module.weight is not None:
        new.weight = _param(module.weight[kin], module.weight)
    if getattr(module, "bias", None) is not None:
        new.bias = _param(module.bias[kin], module.bias)
    return new
