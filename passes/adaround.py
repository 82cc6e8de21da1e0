"""``adaround``: learn whether each weight rounds up or down (AdaRound, Nagel et al. 2020).

Rounding every weight to its nearest grid point minimises each weight's own error, not the layer's
output error: ``E[(ΔW x)²]`` depends on how the rounding errors of weights that see correlated inputs
combine. AdaRound ("Up or Down? Adaptive Rounding for Post-Training Quantization") optimises, layer by
layer on calibration data, the choice ``floor`` or ``ceil`` of every weight:

* soft weights ``W~ = s · clamp(floor(W / s) + h(V), q_min, q_max)`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) · (ζ - γ) + γ, 0, 1)``, ``ζ = 1.1``, ``γ = -0.1``; ``V`` starts where
  ``h(V)`` equals the fractional part of ``W / s`` (so ``W~ = W`` at the start);
* loss ``‖f(W~ x~ + b) - f(W x + b)‖²`` (summed over output channels, averaged over samples) plus
  ``λ Σ (1 - |2 h(V) - 1|^β)``, which pushes every ``h`` to 0 or 1. ``x~`` is the layer's input in the
  model quantized so far (activation fake-quant on, earlier layers already AdaRounded), ``x`` and the
  target are from the float model, ``f`` the layer's fused ReLU / ReLU6 (identity otherwise). The
  regulariser is off for the first ``warmup`` share of the iterations, then ``β`` decays from
  ``beta[0]`` to ``beta[1]`` (cosine);
* at the end each weight takes ``floor + (h(V) >= 0.5)``.

Each step uses ``rows_per_step`` output positions sampled from ``samples`` positions drawn once per
layer (conv inputs are unfolded at those positions into patches), so a step is one small matmul per
group whatever the image size.

The result is the layer's weight on its grid, stored as float (a new module under the old name; the
user's model is untouched). With ``weight_bits=None`` (default) the grid is the one lowering uses (the
backend's int8 grid, x86's [-63, 63] for depthwise convs), and the element that fixes each channel's
range keeps its value, so lowering recomputes the same scale and reproduces the learned integers
exactly (checked: layers where it would not are left as they were, with a note). ``weight_bits=2..7``
rounds onto a narrower symmetric grid instead (for studying low-bit weights; int8 lowering then rounds
those values once more onto its own grid). ``iters=0`` is plain round-to-nearest on the same grid, the
baseline AdaRound is measured against.

Runs on a prepared, calibrated static-int8 graph (after ``Calibrate``: it needs the activation qparams
for ``x~``): ``fxopt.recipes.static_int8(data, adaround=True)``. Conv2d (any groups) and Linear layers;
others are left alone with a note.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxopt import Pass, PassResult, meta
from fxopt.errors import CalibrationError, UnsupportedError
from fxopt.graph_utils import call_sites, set_attr_path
from fxopt.quant.observers import make_observer
from fxopt.quant.spec import QSpec
from fxopt.quant.weight_sim import fake_quantize_weight, is_depthwise

from .calibrate import as_call

__all__ = ["AdaRound", "adaround_weight", "rectified_sigmoid"]

logger = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) (ζ - γ) + γ, 0, 1)``: reaches exactly 0 and 1, with gradient inside."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _inverse_h(rest: torch.Tensor) -> torch.Tensor:
    rest = rest.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def adaround_weight(weight: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, inputs: torch.Tensor,
                    target: torch.Tensor, bias: torch.Tensor | None = None, *, groups: int = 1,
                    activation: str | None = None, iters: int = 500, rows_per_step: int = 256,
                    reg_weight: float = 0.01, beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                    lr: float = 1e-2, seed: int = 0, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (same shape as ``weight``) chosen by AdaRound for one layer.

    The layer is seen as a matrix per group: ``weight`` ``[out, K]`` (conv weights flattened),
    ``inputs`` ``[K * groups, N]`` columns (unfolded patches or linear rows, possibly quantized),
    ``target`` ``[out, N]`` the float layer's output at the same positions (before ``activation``, which
    is applied to both sides: ``"relu"``, ``"relu6"`` or ``None``). ``scale`` is per output channel
    (``[out]``) or a scalar. ``fixed`` marks weights whose rounding is not learned (kept nearest).
    ``iters=0`` returns round-to-nearest.
    """
    out = weight.shape[0]
    w = weight.detach().reshape(out, -1).float()
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1).expand(out, 1)
    nearest = torch.clamp(torch.round(w / s), qmin, qmax)
    if iters <= 0:
        return nearest.reshape(weight.shape)
    floor = torch.floor(w / s)
    # on a signed grid learned codes stay in [-qmax, qmax]: rounding a weight down to qmin (-128 s) would
    # put it outside the channel's range [-127.5 s, 127.5 s] and change the scale lowering computes
    qmin = max(qmin, -qmax) if qmin < 0 else qmin
    v = _inverse_h(w / s - floor).requires_grad_(True)
    keep = torch.zeros_like(w, dtype=torch.bool) if fixed is None else fixed.reshape(out, -1)
    x = inputs.float()
    y = target.float()
    act = {"relu": F.relu, "relu6": F.relu6}.get(activation or "", lambda t: t)
    y = act(y)
    k = w.shape[1]
    out_g = out // groups
    b = None if bias is None else bias.detach().float().reshape(groups, out_g, 1)
    xg = x.reshape(groups, k, -1)
    yg = y.reshape(groups, out_g, -1)
    n = xg.shape[2]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([v], lr=lr)
    start = int(warmup * iters)
    for step in range(iters):
        cols = torch.randint(n, (min(rows_per_step, n),), generator=gen)
        h = rectified_sigmoid(v)
        soft = s * torch.where(keep, nearest, torch.clamp(floor + h, qmin, qmax))
        pred = torch.bmm(soft.reshape(groups, out_g, k), xg[:, :, cols])
        if b is not None:
            pred = pred + b
        rec = (act(pred) - yg[:, :, cols]).pow(2).sum(dim=(0, 1)).mean()
        loss = rec
        if step >= start:
            progress = (step - start) / max(1, iters - start)
            bt = beta[1] + 0.5 * (beta[0] - beta[1]) * (1 + math.cos(math.pi * progress))
            loss = rec + reg_weight * (1 - (2 * h[~keep] - 1).abs().pow(bt)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = (rectified_sigmoid(v) >= 0.5).float()
        codes = torch.where(keep, nearest, torch.clamp(floor + hard, qmin, qmax))
    return codes.reshape(weight.shape)


def _layer(module: nn.Module | None) -> nn.Module | None:
    for candidate in (module, getattr(module, "conv", None), getattr(module, "linear", None)):
        if type(candidate) in (nn.Conv2d, nn.Linear):
            return candidate
    return None


class _Stop(Exception):
    """Raised by a capture hook once the layer's input is recorded: the rest of the forward is not needed."""


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``[K * groups, positions]`` columns (positions ordered as the output's)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [C*k*k, B*L]


def _outputs(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1]).t()
    return y.flatten(2).transpose(0, 1).reshape(y.shape[1], -1)  # [out, B*L]


def _supported(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}"
        if isinstance(layer.padding, str):
            return f"padding={layer.padding!r}"
    return ""


@dataclass(frozen=True)
class AdaRound(Pass):
    name: ClassVar[str] = "adaround"

    data: Any = field(default=None, compare=False, repr=False)
    iters: int = 500
    weight_bits: int | None = None
    num_batches: int | None = None
    samples: int = 2048
    rows_per_step: int = 256
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data is None:
            raise CalibrationError("AdaRound needs data= (calibration batches) to learn the rounding")
        if self.iters < 0:
            raise ValueError(f"AdaRound(iters={self.iters}) must be >= 0 (0: round to nearest)")
        if self.weight_bits is not None and not 2 <= self.weight_bits <= 8:
            raise ValueError(f"AdaRound(weight_bits={self.weight_bits}) must be in 2..8 (None: the backend's grid)")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"AdaRound(warmup={self.warmup}) must be in [0, 1)")

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if meta.quant_config(gm) is None:
            raise UnsupportedError("AdaRound runs on a prepared static-int8 graph: run InsertQuantStubs, "
                                   "PlaceObservers and Calibrate first (fxopt.recipes.static_int8(data, adaround=True))")
        if not meta.quant_config(gm).symmetric_weights:
            raise UnsupportedError("AdaRound needs symmetric weights (zero point 0): PlaceObservers(symmetric_weights=True)")
        if meta.quant_config(gm).weight != "minmax" and self.weight_bits is None:
            raise UnsupportedError(f"AdaRound needs min/max weight ranges (the weight observer is "
                                   f"{meta.quant_config(gm).weight!r}): use PlaceObservers(weight='minmax')")

    def _grid(self, config, per_channel: bool, depthwise: bool) -> QSpec:
        if self.weight_bits is not None and self.weight_bits < 8:
            return QSpec(torch.qint8, bits=self.weight_bits, symmetric=True, axis=0 if per_channel else None)
        base = config.depthwise_weight_spec if depthwise and config.depthwise_weight_spec is not None \
            else config.weight_spec
        return base.with_axis(0 if per_channel else None)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from fxopt import backends  # noqa: PLC0415 - passes may read a backend's spec
        from fxopt.backends.spec import op_key  # noqa: PLC0415
        from fxopt.quant.simulation import Simulation  # noqa: PLC0415

        spec = backends.get(meta.backend_of(gm)).spec
        config = meta.quant_config(gm)
        notes: list[str] = []
        targets: list[tuple[torch.fx.Node, bool]] = []
        for node in gm.graph.nodes:
            if node.op != "call_module" or meta.quant_region(node) is None:
                continue
            rule = spec.rule(op_key(node, gm))
            if rule is None or rule.kind != "compute":
                continue
            module = gm.get_submodule(node.target)
            layer = _layer(module)
            if layer is None:
                if isinstance(getattr(module, "conv", module), (nn.Conv1d, nn.Conv3d)):
                    notes.append(f"{node.name}: only Conv2d and Linear are AdaRounded")
                continue
            why = _supported(layer)
            if why or len(call_sites(gm, module)) != 1:
                notes.append(f"{node.name}: skipped ({why or 'module called more than once'})")
                continue
            targets.append((node, bool(rule.per_channel and config.per_channel)))
        if not targets:
            return PassResult(gm, False, {"rounded": 0}, notes + ["no int8 Conv2d/Linear layer to round"])
        batches = [as_call(item, i) for i, item in enumerate(self.data)]
        if self.num_batches is not None:
            batches = batches[: self.num_batches]
        if not batches:
            raise CalibrationError("AdaRound got empty data: give at least one batch")

        sim = Simulation(gm, lambda n: False, lambda n: False)  # float copy, observers as switchable fake-quant
        gen = torch.Generator().manual_seed(self.seed)
        per_batch = max(1, self.samples // len(batches))
        positions: dict[str, list[torch.Tensor]] = {}
        targets_out: dict[str, torch.Tensor] = {}
        # 1. float outputs of every target layer at sampled positions (one float pass, observers off)
        captured: dict[str, list[torch.Tensor]] = {n.name: [] for n, _ in targets}

        def float_hook(name):
            def record(module, args, output):
                cols = _outputs(module, output.detach())
                pos = torch.randint(cols.shape[1], (min(per_batch, cols.shape[1]),), generator=gen)
                positions.setdefault(name, []).append(pos)
                captured[name].append(cols[:, pos])
            return record

        handles = [_layer(sim.gm.get_submodule(n.target)).register_forward_hook(float_hook(n.name))
                   for n, _ in targets]
        try:
            for sim_obs in sim.sims.values():
                sim_obs.enabled = False
            sim.run(batches)
        finally:
            for h in handles:
                h.remove()
        for name, parts in captured.items():
            targets_out[name] = torch.cat(parts, dim=1)
        # 2. layer by layer: quantized input (activation fake-quant on, earlier layers rounded), optimise
        for sim_obs in sim.sims.values():
            sim_obs.enabled = True
        rounded, changed = 0, 0
        for node, per_channel in targets:
            layer = _layer(sim.gm.get_submodule(node.target))
            if node.name not in positions:
                notes.append(f"{node.name}: not reached by the data")
                continue
            depthwise = is_depthwise(layer.weight, getattr(layer, "groups", 1))
            grid = self._grid(config, per_channel, depthwise)
            observer = make_observer("minmax", grid)
            observer(layer.weight.detach().float())
            scale, _ = observer.calculate_qparams()
            inputs = self._inputs(sim, layer, batches, positions[node.name])
            w = layer.weight.detach().float()
            bound = w.abs().flatten(1).amax(1) if per_channel else w.abs().max().expand(w.shape[0])
            extreme = w.abs() == bound.reshape(-1, *([1] * (w.dim() - 1)))
            activation = meta.fused_activation(node)
            codes = adaround_weight(
                w, scale.reshape(-1) if per_channel else scale, grid.qmin, grid.qmax, inputs,
                targets_out[node.name], layer.bias, groups=getattr(layer, "groups", 1),
                activation=activation if activation in ("relu", "relu6") else None, iters=self.iters,
                rows_per_step=self.rows_per_step, reg_weight=self.reg_weight, beta=self.beta,
                warmup=self.warmup, lr=self.lr, seed=self.seed, fixed=extreme)
            s = scale.reshape(-1, *([1] * (w.dim() - 1))) if per_channel else scale
            new_w = torch.where(extreme, w, codes * s).to(layer.weight.dtype)
            if self.weight_bits is None or self.weight_bits == 8:
                lowered = fake_quantize_weight(new_w, config, per_channel, depthwise)
                if not torch.equal(lowered, (codes * s).to(lowered.dtype)):
                    notes.append(f"{node.name}: lowering would not reproduce the learned rounding; left as is")
                    continue
            else:
                new_w = (codes * s).to(layer.weight.dtype)
            nearest = torch.clamp(torch.round(w / s), grid.qmin, grid.qmax)
            changed += int((codes != nearest).sum())
            with torch.no_grad():
                layer.weight.copy_(new_w)  # the simulation continues with this layer rounded
            new = copy.deepcopy(gm.get_submodule(node.target))
            with torch.no_grad():
                _layer(new).weight.copy_(new_w)
            set_attr_path(gm, node.target, new)
            rounded += 1
        gm.recompile()
        grid_text = f"{self.weight_bits}-bit" if self.weight_bits is not None else "the backend's int8"
        notes.insert(0, f"rounded {rounded} layers onto {grid_text} grid with {self.iters} AdaRound iterations "
                        f"({changed} weights round away from nearest)")
        return PassResult(gm, rounded > 0, {"rounded": rounded, "flipped": changed}, notes)

    def _inputs(self, sim, layer: nn.Module, batches, positions: list[torch.Tensor]) -> torch.Tensor:
        """The layer's input columns at the sampled positions, in the quantized simulation."""
        parts: list[torch.Tensor] = []

        def capture(module, args):
            parts.append(_columns(module, args[0].detach())[:, positions[len(parts)]])
            raise _Stop

        handle = layer.register_forward_pre_hook(capture)
        try:
            with torch.inference_mode():
                for args, kwargs in batches:
                    try:
                        sim.gm(*args, **kwargs)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        return torch.cat(parts, dim=1)
