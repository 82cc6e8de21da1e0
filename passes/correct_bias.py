"""``correct-bias``: undo the mean output shift that int8 weight rounding causes (bias correction).

Nagel et al. 2019, section 4.2. Rounding a layer's weights changes its output by ``ΔW x`` with
``ΔW = W_int8 - W``; over the data that error has mean ``ΔW E[x]``, a per-output-channel shift that the
next layers see as a bias error (large for depthwise convs, whose few weights per channel round
coherently). The pass measures ``E[x]`` per input channel of every int8 conv / linear on the
calibration data (float model, observers off) and subtracts ``ΔW E[x]`` from the layer's bias (a zero
bias is created where there was none). ``ΔW`` uses the weight qparams lowering will use (weight observer
and per-channel choice recorded by ``PlaceObservers``).

``mode="analytical"`` is the data-free variant of the same paper (section 4.2, eq. 8-10): ``E[x]`` comes
from the BatchNorm folded into the layer that produces ``x`` (``FoldBatchNorm`` records its output
statistics, ``meta.batchnorm_output``): the pre-activation is modelled per channel as ``N(beta, gamma²)``
and pushed through the fused activation in closed form, ``E[relu(z)] = μ Φ(μ/σ) + σ φ(μ/σ)`` (ReLU6:
``E[relu(z)] - E[relu(z - 6)]``; none: ``μ``). Layers whose input has no such statistics (the model
input, an add, a pooling, another activation) are left alone, with a note. It needs no data.

Run it on a prepared graph after ``PlaceObservers`` (it needs the quantization config), before or after
``Calibrate``; ``fxopt.recipes.static_int8(data, bias_correction=True)`` does. Convs are corrected as if
zero padding were absent (the border positions see a slightly different mean). The corrected layers are
new modules stored under the old names; the originals are not modified.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn

from fxopt import Pass, PassResult, meta
from fxopt.errors import CalibrationError, UnsupportedError
from fxopt.quant.weight_sim import fake_quantize_weight, is_depthwise

from fxopt.graph_utils import call_sites, set_attr_path
from .calibrate import as_call

__all__ = ["CorrectBias"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _layer(module: nn.Module | None) -> nn.Module | None:
    for candidate in (module, getattr(module, "conv", None), getattr(module, "linear", None)):
        if type(candidate) in _LAYERS:
            return candidate
    return None


def expected_shift(layer: nn.Module, delta: torch.Tensor, mean_in: torch.Tensor) -> torch.Tensor:
    """``ΔW E[x]`` per output channel (``mean_in``: per input channel of the layer)."""
    delta = delta.double()
    if isinstance(layer, nn.Linear):
        return delta @ mean_in.double()
    groups = layer.groups
    d = delta.flatten(2).sum(2)  # [out, in/groups]
    d = d.reshape(groups, -1, d.shape[1])  # [groups, out/groups, in/groups]
    m = mean_in.double().reshape(groups, -1)  # [groups, in/groups]
    return torch.einsum("goi,gi->go", d, m).reshape(-1)


@dataclass(frozen=True)
class CorrectBias(Pass):
    name: ClassVar[str] = "correct-bias"

    data: Any = field(default=None, compare=False, repr=False)
    num_batches: int | None = None
    mode: str = "empirical"

    def __post_init__(self) -> None:
        if self.mode not in ("empirical", "analytical"):
            raise ValueError(f"CorrectBias(mode={self.mode!r}) must be 'empirical' or 'analytical'")

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if meta.quant_config(gm) is None:
            raise UnsupportedError("CorrectBias needs the weight quantization config: run InsertQuantStubs and "
                                   "PlaceObservers first (fxopt.recipes.static_int8(data, bias_correction=True))")
        if self.data is None and self.mode == "empirical":
            raise CalibrationError("CorrectBias needs data= (calibration batches) to measure the layer inputs")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from fxopt import backends  # noqa: PLC0415 - passes may read a backend's spec
        from fxopt.backends.spec import op_key  # noqa: PLC0415
        from fxopt.quant.simulation import Simulation  # noqa: PLC0415

        spec = backends.get(meta.backend_of(gm)).spec
        config = meta.quant_config(gm)
        targets: dict[str, tuple[nn.Module, bool]] = {}
        for node in gm.graph.nodes:
            if node.op != "call_module" or meta.quant_region(node) is None:
                continue
            layer = _layer(gm.get_submodule(node.target))
            rule = spec.rule(op_key(node, gm))
            if layer is None or rule is None or rule.kind != "compute":
                continue
            if len(call_sites(gm, gm.get_submodule(node.target))) != 1:
                continue
            targets[node.target] = (layer, bool(rule.per_channel and config.per_channel))
        if not targets:
            return PassResult(gm, False, {"corrected": 0}, ["no int8 conv/linear layer to correct"])

        notes: list[str] = []
        if self.mode == "analytical":
            means = {}
            for node in gm.graph.nodes:
                if node.op == "call_module" and node.target in targets:
                    mean, why = _analytical_mean(gm, node)
                    layer = targets[node.target][0]
                    expected = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
                    if mean is not None and mean.numel() != expected:
                        mean, why = None, f"its input statistics have {mean.numel()} channels, not {expected}"
                    if mean is None:
                        notes.append(f"{node.name}: not corrected, {why}")
                    else:
                        means[node.target] = mean
            return self._apply(gm, targets, means, config, notes)
        # mean input per channel, on the float model (a copy with observers as identities)
        sim = Simulation(gm, lambda n: False, lambda n: False)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(target):
            def record(module, args):
                x = args[0].detach().double()
                if isinstance(_layer(module), nn.Linear):
                    flat = x.reshape(-1, x.shape[-1])
                else:
                    flat = x.movedim(1, -1).reshape(-1, x.shape[1])
                sums[target] = sums.get(target, 0) + flat.sum(0)
                counts[target] = counts.get(target, 0) + flat.shape[0]
            return record

        handles = [sim.gm.get_submodule(t).register_forward_pre_hook(hook(t)) for t in targets]
        batches = [as_call(item, i) for i, item in enumerate(self.data)]
        if self.num_batches is not None:
            batches = batches[: self.num_batches]
        if not batches:
            raise CalibrationError("CorrectBias got empty data: give at least one batch")
        try:
            sim.configure([])
            sim.run(batches)
        finally:
            for h in handles:
                h.remove()

        means = {t: sums[t] / counts[t] for t in targets if t in sums}
        return self._apply(gm, targets, means, config, notes)

    def _apply(self, gm, targets, means, config, notes) -> PassResult:
        corrected, largest = 0, 0.0
        for target, (layer, per_channel) in targets.items():
            if target not in means:
                continue
            mean_in = means[target]
            delta = fake_quantize_weight(layer.weight, config, per_channel,
                                         is_depthwise(layer.weight, getattr(layer, "groups", 1))).double() - layer.weight.detach().double()
            shift = expected_shift(layer, delta, mean_in)
            if float(shift.abs().max()) == 0.0:
                continue
            new = copy.deepcopy(gm.get_submodule(target))
            new_layer = _layer(new)
            with torch.no_grad():
                if new_layer.bias is None:
                    new_layer.bias = nn.Parameter(torch.zeros(new_layer.weight.shape[0], dtype=new_layer.weight.dtype))
                new_layer.bias.sub_(shift.to(new_layer.bias.dtype))
            set_attr_path(gm, target, new)
            corrected += 1
            largest = max(largest, float(shift.abs().max()))
        gm.recompile()
        notes.insert(0, f"{self.mode}: corrected the bias of {corrected} layers (largest shift {largest:.3g})")
        return PassResult(gm, corrected > 0, {"corrected": corrected, "largest_shift": largest}, notes)


def _producer(node: torch.fx.Node) -> torch.fx.Node | None:
    """The op whose value ``node`` reads, looking through observers."""
    from fxopt.quant.observers import Observer  # noqa: PLC0415

    value = node.args[0] if node.args else None
    while isinstance(value, torch.fx.Node) and value.op == "call_module" and \
            isinstance(value.graph.owning_module.get_submodule(value.target), Observer):
        value = value.args[0]
    return value if isinstance(value, torch.fx.Node) else None


def _relu_mean(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``E[max(z, 0)]`` for ``z ~ N(mu, sigma²)``."""
    normal = torch.distributions.Normal(0.0, 1.0)
    safe = sigma.clamp(min=1e-12)
    t = mu / safe
    value = mu * normal.cdf(t) + safe * normal.log_prob(t).exp()
    return torch.where(sigma > 0, value, mu.clamp(min=0))


def _analytical_mean(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[torch.Tensor | None, str]:
    """Per-channel ``E[x]`` of the input of ``node`` from the BatchNorm statistics of its producer."""
    producer = _producer(node)
    if producer is None:
        return None, "its input is not produced by an op"
    stats = meta.batchnorm_output(producer)
    if stats is None:
        return None, f"its input {producer.name} has no folded BatchNorm statistics"
    mu, sigma = (t.double() for t in stats)
    activation = meta.fused_activation(producer)
    if activation is None:
        return mu, ""
    if activation == "relu":
        return _relu_mean(mu, sigma), ""
    if activation == "relu6":
        return _relu_mean(mu, sigma) - _relu_mean(mu - 6.0, sigma), ""
    return None, f"its input goes through {activation}, which has no closed-form mean here"
