"""Modules of a quantization-aware-training graph (what ``fxopt.passes.PrepareQAT`` puts in).

* :class:`QATFakeQuantize` / :class:`QATLearnableFakeQuantize`: :mod:`fxopt.quant.fake_quant` plus what
  training needs: the observer freezes itself after ``freeze_after`` training forwards, and under
  ``torch.distributed`` every rank observes the min / max of the *global* batch (all-reduced), so the
  ranges, and therefore the scales, stay identical on all ranks.
* :class:`QATConv`: a conv with an optional BatchNorm and ReLU/ReLU6 folded in the standard way
  (Jacob et al. 2018, Krishnamoorthi 2018): the weights are fake-quantized *after* folding the BN's running
  statistics into them, ``w_fold = w * gamma / sqrt(running_var + eps)``. While BN is training the conv
  output is divided back by that factor and normalised with the batch statistics (which also updates the
  running ones); once BN is frozen (``freeze_bn_after`` training forwards, or :func:`freeze_bn`), and in
  eval mode, the output is exactly ``conv(x, fq(w_fold)) + b_fold``, which is what lowering deploys.
* :class:`QATLinear`: a linear (+ ReLU/ReLU6) with fake-quantized weights.

Lowering reads ``fxopt_lowering()``: a plain float conv / linear whose weights are the fake-quantized
(on-grid) folded weights, and the weight qparams the fake quantizer used, so the int8 weights are exactly
the grid values the QAT model trained with (also below 8 bits: ``grid_bits``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fake_quant import FakeQuantize, LearnableFakeQuantize, fake_quantize
from ..spec import QSpec
from .base import FusedModule

__all__ = ["QATFakeQuantize", "QATLearnableFakeQuantize", "SharedFakeQuantize", "FixedFakeQuantize", "QATConv",
           "QATLinear", "freeze_bn", "is_qat_module", "is_distributed"]


def is_distributed() -> bool:
    """A torch.distributed process group with more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_extremes(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A small tensor whose min / max (per channel along ``axis``) are those of ``x`` over all ranks."""
    dist = torch.distributed
    if axis is None:
        rows = x.detach().reshape(1, -1)
    else:
        rows = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)
    lo, hi = torch.aminmax(rows.float(), dim=1)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    both = torch.stack([lo, hi], dim=1)  # (channels, 2)
    if axis is None:
        return both.reshape(-1)
    shape = [1] * x.dim()
    shape[0], shape[-1] = both.shape[0], 2
    return both.reshape(shape).movedim(0, axis)


class _QATSchedule:
    """Mixin for FakeQuantize: freeze the observer after ``freeze_after`` training forwards; global ranges."""

    freeze_after: int | None = None

    def _setup_schedule(self, freeze_after: int | None) -> None:
        if freeze_after is not None and freeze_after < 0:
            raise ValueError(f"freeze_after must be >= 0, got {freeze_after}")
        self.freeze_after = freeze_after
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    def forward(self, x):
        if self.training and self.observer_enabled and self.freeze_after is not None:
            if int(self.steps) >= self.freeze_after and self.observer.calibrated:
                self.observer_enabled = False
            else:
                self.steps += 1
        return super().forward(x)

    def _observe(self, x: torch.Tensor) -> None:
        if is_distributed() and torch.is_grad_enabled() and self.training:
            x = _global_extremes(x, self.spec.axis)
        super()._observe(x)

    def initialise(self, x: torch.Tensor) -> None:
        """Take qparams from ``x`` now (weights at preparation time), without counting a step."""
        with torch.no_grad():
            self._observe(x.detach())


class QATFakeQuantize(_QATSchedule, FakeQuantize):
    """FakeQuantize whose observer freezes after ``freeze_after`` training forwards (None: never)."""

    def __init__(self, observer=None, *, freeze_after: int | None = None, **kwargs):
        super().__init__(observer, **kwargs)
        self._setup_schedule(freeze_after)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, freeze_after={self.freeze_after}"


class QATLearnableFakeQuantize(_QATSchedule, LearnableFakeQuantize):
    """LSQ fake quantization (learned scale) for QAT graphs; the observer only initialises the scale."""

    def __init__(self, observer=None, *, freeze_after: int | None = None, **kwargs):
        super().__init__(observer, **kwargs)
        self._setup_schedule(freeze_after)


class _GridRounding(nn.Module):
    """Rounding to a grid that no observer chooses; an identity once lowered (the int8 kernel rounds)."""

    fxopt_lowered_as_identity = True

    def __init__(self, spec: QSpec) -> None:
        super().__init__()
        self.spec = spec
        self.fake_quant_enabled = True

    def enable_fake_quant(self, enabled: bool = True) -> "_GridRounding":
        self.fake_quant_enabled = bool(enabled)
        return self


class SharedFakeQuantize(_GridRounding):
    """Rounds the output of a value-changing op that int8 runs with its input's qparams (average pooling).

    The int8 kernel of ``avg_pool`` rounds the mean onto the input's grid; this does the same in the QAT
    graph, with the scale / zero point of the input's fake quantizer passed in as graph inputs.
    """

    def forward(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled or not x.is_floating_point():
            return x
        return fake_quantize(x, scale.detach(), zero_point, self.spec)


class FixedFakeQuantize(_GridRounding):
    """Rounds onto the fixed output grid of an int8 kernel (sigmoid: scale 1/256, zero point 0)."""

    def __init__(self, spec: QSpec, scale: float, zero_point: int) -> None:
        super().__init__(spec)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled or not x.is_floating_point():
            return x
        return fake_quantize(x, self.scale, self.zero_point, self.spec)


def _grid_bits(fq: FakeQuantize) -> int:
    return max(1, math.ceil(math.log2(fq.spec.qmax - fq.spec.qmin + 1)))


class _QATWeighted(FusedModule):
    """Shared parts of QATConv / QATLinear: the weight fake quantizer and the lowering hand-off.

    A :class:`FusedModule` to backends: ``op_key`` is the conv / linear, ``inner`` that layer and
    ``activation_kind`` the fused ReLU / ReLU6 (``None`` without one).
    """

    weight_fake_quant: FakeQuantize | None
    activation: nn.Module | None

    @property
    def activation_kind(self) -> str | None:
        return None if self.activation is None else super().activation_kind

    def _fq(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.weight_fake_quant is None else self.weight_fake_quant(w)

    @property
    def grid_bits(self) -> int:
        """Bits of the weight grid (8 for int8; 4 when the spec asks for 4-bit weights)."""
        return 8 if self.weight_fake_quant is None else _grid_bits(self.weight_fake_quant)

    def _lowered(self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        fq = self.weight_fake_quant
        if fq is None:
            raise RuntimeError(f"{type(self).__name__} has no weight fake quantizer to lower with")
        with torch.no_grad():
            if not fq.calibrated:
                fq.initialise(weight)
            on_grid = fq._fake_quantize(weight.detach().float())
            scale, zero_point = fq.calculate_qparams()
        plain = copy.deepcopy(layer)
        plain.weight = nn.Parameter(on_grid.detach().clone(), requires_grad=False)
        plain.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return plain, (scale.reshape(-1), zero_point.reshape(-1))


class QATConv(_QATWeighted):
    """``activation(bn(conv(x)))`` with fake-quantized, BN-folded weights (``bn``/``activation`` optional)."""

    def __init__(self, conv: nn.Module, bn: nn.Module | None = None, activation: nn.Module | None = None,
                 weight_fake_quant: FakeQuantize | None = None, *, freeze_bn_after: int | None = None) -> None:
        super().__init__()
        if bn is not None and (bn.running_mean is None or bn.running_var is None):
            raise ValueError("QATConv folds only BatchNorms with running statistics (track_running_stats=True)")
        self.conv = conv
        self.bn = bn
        self.activation = activation
        self.weight_fake_quant = weight_fake_quant
        self.freeze_bn_after = freeze_bn_after
        self.bn_frozen = False
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    @property
    def op_key(self) -> str:
        return f"conv{self.conv.weight.dim() - 2}d"

    @property
    def inner(self) -> nn.Module:
        return self.conv

    def _bn_factor(self) -> torch.Tensor:
        bn = self.bn
        factor = torch.rsqrt(bn.running_var + bn.eps)
        return factor * bn.weight if bn.weight is not None else factor

    def _per_channel(self, v: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * like.dim()
        shape[dim] = -1
        return v.reshape(shape)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with the BN's running statistics folded in (the deployed float layer)."""
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            return w, b
        bn = self.bn
        factor = self._bn_factor()
        w = w * self._per_channel(factor, w, 0)
        b0 = b if b is not None else torch.zeros_like(bn.running_mean)
        b = (b0 - bn.running_mean) * factor
        if bn.bias is not None:
            b = b + bn.bias
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and self.training and not self.bn_frozen and self.freeze_bn_after is not None:
            if int(self.steps) >= self.freeze_bn_after:
                self.bn_frozen = True
            else:
                self.steps += 1
        w, b = self.folded()
        wq = self._fq(w)
        if self.bn is not None and self.training and not self.bn_frozen:
            y = self.conv._conv_forward(x, wq, None)
            y = y / self._per_channel(self._bn_factor(), y, 1)  # undo the folding: BN sees conv(x) ...
            if self.conv.bias is not None:
                y = y + self._per_channel(self.conv.bias, y, 1)
            y = self.bn(y)  # ... normalised with the batch statistics (and updating the running ones)
        else:
            y = self.conv._conv_forward(x, wq, b)
        return self.activation(y) if self.activation is not None else y

    def fxopt_lowering(self) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """A plain conv with the on-grid folded weights and folded bias, and the weight qparams."""
        w, b = self.folded()
        return self._lowered(self.conv, w, b)

    def extra_repr(self) -> str:
        return f"freeze_bn_after={self.freeze_bn_after}, bn_frozen={self.bn_frozen}"


class QATLinear(_QATWeighted):
    """``activation(linear(x))`` with fake-quantized weights (``activation`` optional)."""

    @property
    def op_key(self) -> str:
        return "linear"

    @property
    def inner(self) -> nn.Module:
        return self.linear

    def __init__(self, linear: nn.Linear, activation: nn.Module | None = None,
                 weight_fake_quant: FakeQuantize | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.activation = activation
        self.weight_fake_quant = weight_fake_quant

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.linear.weight, self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self._fq(self.linear.weight), self.linear.bias)
        return self.activation(y) if self.activation is not None else y

    def fxopt_lowering(self) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        return self._lowered(self.linear, self.linear.weight, self.linear.bias)


def is_qat_module(module: nn.Module) -> bool:
    return isinstance(module, (_QATWeighted, QATFakeQuantize, QATLearnableFakeQuantize))


def freeze_bn(module: nn.Module, frozen: bool = True) -> int:
    """Freeze (or unfreeze) the BatchNorm statistics of every QATConv in ``module``; returns how many."""
    found = [m for m in module.modules() if isinstance(m, QATConv) and m.bn is not None]
    for m in found:
        m.bn_frozen = bool(frozen)
    return len(found)
