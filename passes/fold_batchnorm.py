"""``fold-bn``: fold an eval-mode BatchNorm into the Conv / ConvTranspose / Linear right before it.

In eval mode ``bn(y) = (y - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per channel (dim 1),
so ``bn(conv(x))`` equals a conv whose output channel ``o`` has weights ``W[o] * s[o]`` and bias
``(b[o] - mean[o]) * s[o] + beta[o]``. The arithmetic is done in float64 and cast back.

Handled: ``nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) modules and ``F.batch_norm(x, running_mean,
running_var, weight, bias, training=False, ...)`` whose tensors are ``get_attr`` nodes, after an
``nn.Conv1d/2d/3d``, an ``nn.ConvTranspose1d/2d/3d`` (weights ``[in, out/groups, k...]``: the output
channel is dim 1 within each group) or an ``nn.Linear`` whose output is 2-D (BatchNorm1d on a 3-D
``[N, L, features]`` Linear output normalizes dim 1 = L, which is not foldable; the rank comes from
shape metadata or from an obvious producer such as ``flatten(x, 1)``).

The folded layer is a NEW module stored under the producer's name (the old one may be shared with user
code); the BatchNorm node is removed and its module deleted once nothing refers to it. Skipped, with a
note saying why: BN in training mode or without running stats, a producer that is not directly before
the BN (e.g. a ReLU between them), a producer whose output has other users, a producer module called
more than once, with hooks or parametrizations, or whose parameters the graph also reads, a
channel-count mismatch, and Linear outputs of
unknown or non-2-D rank.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fxopt import Pass, PassResult
from fxopt import meta
from fxopt.graph_utils import (bypass_node, call_sites, delete_if_unreferenced, get_attr_path, module_of,
                               referenced_targets, set_attr_path)

__all__ = ["FoldBatchNorm", "fold_bn_into"]

logger = logging.getLogger(__name__)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class _BNStats:
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def fold_bn_into(layer: nn.Module, bn: _BNStats) -> nn.Module:
    """A new Conv/ConvTranspose/Linear equal to ``bn(layer(x))`` in eval mode (``layer`` is untouched)."""
    w = layer.weight.detach().double()
    scale = bn.var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    if isinstance(layer, _CONVT_TYPES):
        groups = layer.groups
        grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        per_out = scale.reshape(groups, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (grouped * per_out).reshape(w.shape)
    else:  # Conv: [out, in/groups, k...]; Linear: [out, in]
        new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    old_b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    new_b = old_b * scale + shift

    folded = copy.deepcopy(layer)
    dtype = layer.weight.dtype
    folded.weight = nn.Parameter(new_w.to(dtype), requires_grad=layer.weight.requires_grad)
    folded.bias = nn.Parameter(new_b.to(dtype), requires_grad=layer.weight.requires_grad)
    return folded


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, _CONVT_TYPES):
        return layer.weight.shape[1] * layer.groups
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels


def _bn_stats(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[torch.fx.Node | None, _BNStats | str]:
    """(input node, stats) of a foldable BN node, or (None, why not) / (None, "") when not a BN at all."""
    if node.op == "call_module":
        bn = module_of(gm, node)
        if type(bn) not in _BN_TYPES:
            return None, ""
        if bn.training:
            return None, "in training mode (call model.eval() first)"
        if bn.running_mean is None or bn.running_var is None:
            return None, "it has no running statistics (track_running_stats=False uses batch statistics)"
        return (node.args[0] if node.args else None), _BNStats(bn.running_mean, bn.running_var, bn.weight,
                                                               bn.bias, bn.eps)
    if node.op == "call_function" and node.target is F.batch_norm:
        try:
            bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
        except TypeError:
            return None, ""
        bound.apply_defaults()
        a = bound.arguments
        if a["training"] is not False:
            return None, f"called with training={a['training']!r}"
        tensors = {}
        for key in ("running_mean", "running_var", "weight", "bias"):
            value = a[key]
            if value is None and key in ("weight", "bias"):
                tensors[key] = None
            elif isinstance(value, torch.fx.Node) and value.op == "get_attr":
                tensors[key] = get_attr_path(gm, value.target)
            else:
                return None, f"its {key} is not a constant attribute of the model"
        if not isinstance(a["eps"], (int, float)):
            return None, "its eps is not a constant"
        return a["input"], _BNStats(tensors["running_mean"], tensors["running_var"], tensors["weight"],
                                    tensors["bias"], float(a["eps"]))
    return None, ""


def _rank(node: Any, depth: int = 0) -> int | None:
    """Rank of ``node``'s value: from metadata, or from a producer that fixes it."""
    if not isinstance(node, torch.fx.Node) or depth > 8:
        return None
    shape = meta.shape_of(node)
    if shape is not None:
        return len(shape)
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if end == -1 and isinstance(start, int) and start >= 0:
            return start + 1
    if node.op == "call_method" and node.target in ("view", "reshape", "flatten"):
        if node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return start + 1 if end == -1 and isinstance(start, int) and start >= 0 else None
        shape_args = node.args[1:]
        if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
            shape_args = shape_args[0]
        return len(shape_args) if shape_args else None
    if node.op == "call_module":
        module = module_of(node.graph.owning_module, node)
        if isinstance(module, nn.Flatten) and module.end_dim == -1 and module.start_dim >= 0:
            return module.start_dim + 1
        if isinstance(module, (nn.Linear, nn.ReLU, nn.ReLU6, nn.Dropout, nn.Identity, nn.BatchNorm1d)):
            return _rank(node.args[0] if node.args else None, depth + 1)
    if node.op == "call_function" and node.target in (F.relu, torch.relu, F.dropout, F.linear):
        return _rank(node.args[0] if node.args else None, depth + 1)
    return None


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding Conv/ConvTranspose/Linear where that is exact."""

    name = "fold-bn"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        notes: list[str] = []
        folded = 0
        dropped: list[str] = []
        for node in list(gm.graph.nodes):
            source, stats = _bn_stats(gm, node)
            if isinstance(stats, str):
                if stats:
                    notes.append(f"{node.name}: not folded, {stats}")
                continue
            why = self._why_not(gm, node, source, stats)
            if why:
                notes.append(f"{node.name}: not folded, {why}")
                continue
            layer = module_of(gm, source)
            set_attr_path(gm, source.target, fold_bn_into(layer, stats))
            channels = stats.mean.shape[0]
            meta.set_batchnorm_output(source, (
                stats.bias.detach().float() if stats.bias is not None else torch.zeros(channels),
                stats.weight.detach().float().abs() if stats.weight is not None else torch.ones(channels)))
            dropped += bypass_node(gm, node, source)
            folded += 1
        for target in dict.fromkeys(dropped):
            delete_if_unreferenced(gm, target)
        if folded:
            gm.graph.lint()
            gm.recompile()
        logger.debug("fold-bn: folded %d, skipped %d", folded, len(notes))
        return PassResult(gm, folded > 0, {"folded": folded, "skipped": len(notes)}, notes)

    @staticmethod
    def _why_not(gm: torch.fx.GraphModule, bn_node: torch.fx.Node, source: Any, stats: _BNStats) -> str:
        layer = module_of(gm, source) if isinstance(source, torch.fx.Node) else None
        if not isinstance(layer, _CONV_TYPES + _CONVT_TYPES + (nn.Linear,)):
            what = source.name if isinstance(source, torch.fx.Node) else repr(source)
            return f"its input {what} is not a Conv/ConvTranspose/Linear module call"
        if len(source.users) != 1:
            others = ", ".join(u.name for u in source.users if u is not bn_node)
            return f"{source.target}'s output is also used by {others}"
        if len(call_sites(gm, layer)) != 1:
            return f"{source.target} is called more than once (shared module)"
        if any(t.startswith(source.target + ".") for t in referenced_targets(gm)):
            return f"the graph also reads {source.target}'s parameters directly"
        if parametrize.is_parametrized(layer) or layer._forward_hooks or layer._forward_pre_hooks:
            return f"{source.target} has parametrizations or forward hooks that would see the folded weights"
        if layer.weight is None or layer.weight.is_meta or not layer.weight.is_floating_point():
            return f"{source.target} has no floating-point weight"
        channels = _out_channels(layer)
        if stats.mean.numel() != channels or stats.var.numel() != channels:
            return f"channel mismatch ({source.target} has {channels} outputs, BN has {stats.mean.numel()})"
        if isinstance(layer, nn.Linear):
            rank = _rank(source)
            if rank is None:
                return (f"the rank of {source.target}'s output is unknown (pass example_inputs so shapes are "
                        "recorded); BatchNorm1d after a Linear folds only on 2-D outputs")
            if rank != 2:
                return f"{source.target}'s output is {rank}-D: BatchNorm1d normalizes dim 1, not the features"
        return ""

