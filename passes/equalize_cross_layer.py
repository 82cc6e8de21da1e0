"""``equalize-cross-layer``: rescale channels between consecutive convs so int8 loses less (CLE).

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction". For two
convs joined by a ReLU (or by nothing), ``relu(x / s) = relu(x) / s`` for ``s > 0``, so output channel
``i`` of the first conv can be divided by ``s_i`` and input channel ``i`` of the second multiplied by
``s_i`` without changing the function. With ``r1_i`` = max |weight| of the first conv's output channel
``i`` and ``r2_i`` = max |weight| of the second conv's input channel ``i``, ``s_i = sqrt(r1_i / r2_i)``
makes both ranges ``sqrt(r1_i * r2_i)``: channels whose weights (and activations) were orders of
magnitude apart end up alike, which is what a per-tensor int8 scale needs. Depthwise convs take part
on either side (their channel ``i`` is both input and output ``i``); chains of three or more convs
(conv → depthwise → conv) are equalized pair by pair, repeated until the scales settle.

Matched: ``nn.Conv2d`` (or a :class:`~fxopt.quant.nn.FusedConv` with a ReLU) whose only
user is an optional ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``) whose only user is an
``nn.Conv2d`` / ``FusedConv`` reading it as input, with ``groups == 1`` or depthwise (one input channel
per group, as many outputs). Not matched (notes say so): ReLU6 / Hardtanh / SiLU between the convs
(not positively homogeneous: ``relu6(x / s) != relu6(x) / s``), BatchNorm still between them (run
``fold-bn`` first), grouped convs that are not depthwise, a conv module called more than once.

Float numerics do not change (up to rounding). The equalized convs are new modules stored under the
old names: the original modules (possibly shared with the user's model) are not modified.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxopt import Pass, PassResult

from fxopt.graph_utils import call_sites, module_of, set_attr_path

__all__ = ["EqualizeCrossLayer"]

logger = logging.getLogger(__name__)

_RELU_FUNCTIONS = (F.relu, torch.relu)


def _conv(module: nn.Module | None) -> nn.Conv2d | None:
    """The Conv2d of a plain conv or of a conv fused with a ReLU (other fused activations do not commute)."""
    if type(module) is nn.Conv2d:
        return module
    conv, act = getattr(module, "conv", None), getattr(module, "activation", None)
    if type(conv) is nn.Conv2d and type(act) is nn.ReLU:
        return conv
    return None


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return type(module_of(gm, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


@dataclass(frozen=True)
class EqualizeCrossLayer(Pass):
    """Cross-layer equalization of conv → (ReLU) → conv pairs (see the module docstring).

    ``iterations`` caps the sweeps over all pairs; a sweep that changes no scale by more than
    ``tolerance`` (relative) ends the loop.
    """

    name: ClassVar[str] = "equalize-cross-layer"

    iterations: int = 20
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"EqualizeCrossLayer(iterations={self.iterations}) must be >= 1")

    def _pairs(self, gm: torch.fx.GraphModule, notes: list[str]) -> list[tuple[str, str]]:
        pairs = []
        for node in gm.graph.nodes:
            if node.op != "call_module" or _conv(module_of(gm, node)) is None or len(node.users) != 1:
                continue
            nxt = next(iter(node.users))
            if _is_relu(gm, nxt):
                if len(nxt.users) != 1 or nxt.args[0] is not node:
                    continue
                nxt = next(iter(nxt.users))
            elif nxt.op == "call_module" and type(module_of(gm, nxt)).__name__ in ("ReLU6", "Hardtanh", "SiLU"):
                notes.append(f"{node.target} -> {nxt.target}: {type(module_of(gm, nxt)).__name__} between convs is "
                             "not positively homogeneous, not equalized")
                continue
            if nxt.op != "call_module" or not nxt.args or nxt.args[0] not in (node, *node.users):
                continue
            first, second = _conv(module_of(gm, node)), _conv(module_of(gm, nxt))
            if second is None or first.out_channels != second.in_channels:
                continue
            if second.groups > 1 and not _is_depthwise(second):
                notes.append(f"{node.target} -> {nxt.target}: grouped (not depthwise) conv, not equalized")
                continue
            if first.groups > 1 and not _is_depthwise(first):
                notes.append(f"{node.target} -> {nxt.target}: grouped (not depthwise) conv, not equalized")
                continue
            if len(call_sites(gm, module_of(gm, node))) != 1 or len(call_sites(gm, module_of(gm, nxt))) != 1:
                notes.append(f"{node.target} -> {nxt.target}: a conv module is called more than once, not equalized")
                continue
            pairs.append((node.target, nxt.target))
        return pairs

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        notes: list[str] = []
        pairs = self._pairs(gm, notes)
        if not pairs:
            return PassResult(gm, False, {"pairs": 0}, notes or ["no conv -> (relu) -> conv pair to equalize"])
        # work on copies (float64) of every conv taking part; the originals stay untouched
        targets = sorted({t for pair in pairs for t in pair})
        weights = {t: _conv(gm.get_submodule(t)).weight.detach().double().clone() for t in targets}
        biases = {t: (None if _conv(gm.get_submodule(t)).bias is None
                      else _conv(gm.get_submodule(t)).bias.detach().double().clone()) for t in targets}
        depthwise = {t: _is_depthwise(_conv(gm.get_submodule(t))) for t in targets}
        sweeps, largest, first_sweep = 0, 0.0, 0.0
        for sweeps in range(1, self.iterations + 1):
            largest = 0.0
            for first, second in pairs:
                w1, w2 = weights[first], weights[second]
                r1 = w1.abs().flatten(1).amax(1)  # per output channel of the first conv
                r2 = (w2.abs().flatten(1).amax(1) if depthwise[second]
                      else w2.abs().transpose(0, 1).flatten(1).amax(1))  # per input channel of the second
                ok = (r1 > 0) & (r2 > 0)
                scale = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-300)), torch.ones_like(r1))
                largest = max(largest, float((scale - 1).abs().max()))
                view = (-1,) + (1,) * (w1.dim() - 1)
                weights[first] = w1 / scale.view(view)
                if biases[first] is not None:
                    biases[first] = biases[first] / scale
                weights[second] = w2 * (scale.view(view) if depthwise[second] else scale.view(1, -1, 1, 1))
            if sweeps == 1:
                first_sweep = largest
            if largest < self.tolerance:
                break
        if first_sweep < self.tolerance:
            notes.append(f"{len(pairs)} conv pairs are already equalized (largest rescale {first_sweep:.2g})")
            return PassResult(gm, False, {"pairs": len(pairs), "convs": 0, "sweeps": sweeps}, notes)
        for target in targets:
            old = gm.get_submodule(target)
            new = copy.deepcopy(old)
            conv = _conv(new)
            with torch.no_grad():
                conv.weight.copy_(weights[target].to(conv.weight.dtype))
                if conv.bias is not None:
                    conv.bias.copy_(biases[target].to(conv.bias.dtype))
            set_attr_path(gm, target, new)
        gm.recompile()
        logger.debug("equalize-cross-layer: %d pairs, %d sweeps", len(pairs), sweeps)
        notes.append(f"equalized {len(pairs)} conv pairs in {sweeps} sweeps (last largest change {largest:.2g})")
        return PassResult(gm, True, {"pairs": len(pairs), "convs": len(targets), "sweeps": sweeps}, notes)
