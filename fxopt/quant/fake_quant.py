"""Fake quantization: quantize→dequantize in float, with a straight-through gradient.

``fake_quantize(x, scale, zero_point, spec)`` returns ``scale * (clamp(round(x / scale) + zp) - zp)``,
exactly :func:`fxopt.quant.spec.dequantize` of :func:`fxopt.quant.spec.quantize`, so a fake-quant graph
computes what the lowered int8 graph will. Its gradient is the clipped straight-through estimator:
1 where ``round(x / scale) + zp`` falls inside ``[qmin, qmax]``, 0 where it is clamped.

``FakeQuantize`` wraps an observer for QAT: in training mode it observes each batch, refreshes its
qparams and fake-quantizes; ``LearnableFakeQuantize`` learns the scale instead (LSQ, Esser et al. 2020).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from ..errors import CalibrationError
from .observers import Observer, make_observer
from .spec import QSpec

log = logging.getLogger(__name__)

__all__ = ["fake_quantize", "FakeQuantize", "LearnableFakeQuantize", "set_observers", "set_fake_quant"]


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        q = torch.round(x / scale) + zero_point
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return (q.clamp(qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def _qparams_for(x: torch.Tensor, scale, zero_point, spec: QSpec):
    """``scale`` / ``zero_point`` as float32 tensors shaped to broadcast against ``x``."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zero_point = torch.as_tensor(zero_point, device=x.device).to(torch.float32)
    if not spec.per_channel or scale.dim() == 0:
        if scale.numel() != 1:
            raise CalibrationError(f"per-tensor fake quantization needs one scale, got {scale.numel()}")
        return scale.reshape(()), zero_point.reshape(())
    axis = spec.axis
    if not -x.dim() <= axis < x.dim() or scale.numel() != x.shape[axis] or zero_point.numel() != scale.numel():
        raise CalibrationError(
            f"per-channel fake quantization along axis {axis} of a tensor of shape {tuple(x.shape)} needs "
            f"one scale and zero point per channel, got {scale.numel()} and {zero_point.numel()}"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape), zero_point.reshape(shape)


def fake_quantize(x: torch.Tensor, scale, zero_point, spec: QSpec) -> torch.Tensor:
    """Quantize→dequantize ``x`` with ``(scale, zero_point)`` (per channel along ``spec.axis``).

    Differentiable with respect to ``x`` (clipped straight-through estimator); the result has
    ``x``'s dtype.
    """
    scale, zero_point = _qparams_for(x, scale, zero_point, spec)
    out = _FakeQuantizeSTE.apply(x.float(), scale, zero_point, spec.qmin, spec.qmax)
    return out.to(x.dtype)


class FakeQuantize(nn.Module):
    """Observer + fake quantization, the QAT building block.

    In training mode (and with the observer enabled) every batch is observed and the qparams are
    recomputed from the observer; in eval mode the last qparams are used (a module that never saw
    data observes its first batch even in eval mode). Histogram-based observers recompute their
    search on every training batch: prefer ``minmax`` / ``moving_average`` (the default) here.
    """

    def __init__(self, observer: Observer | None = None, *, spec: QSpec | None = None,
                 kind: str = "moving_average", name: str | None = None):
        super().__init__()
        if observer is None:
            if spec is None:
                raise ValueError("FakeQuantize needs an observer or a spec (and an observer kind)")
            observer = make_observer(kind, spec, name=name)
        self.observer = observer
        self.spec = observer.spec
        self.observer_enabled = True
        self.fake_quant_enabled = True
        shape = (0,) if self.spec.per_channel else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int64))

    # toggles (return self so they chain) -----------------------------------------------------
    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        self.observer_enabled = bool(enabled)
        return self

    def disable_observer(self) -> "FakeQuantize":
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        self.fake_quant_enabled = bool(enabled)
        return self

    def disable_fake_quant(self) -> "FakeQuantize":
        return self.enable_fake_quant(False)

    @property
    def calibrated(self) -> bool:
        return self.observer.calibrated

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The qparams in use (what lowering should quantize with)."""
        self._check_calibrated()
        return self.scale.detach().clone(), self.zero_point.clone()

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        if self.observer_enabled and (self.training or not self.observer.calibrated):
            self._observe(x)
        if not self.fake_quant_enabled:
            return x
        self._check_calibrated()
        return self._fake_quantize(x)

    def _observe(self, x: torch.Tensor) -> None:
        self.observer(x.detach())
        scale, zero_point = self.observer.calculate_qparams()
        self.scale, self.zero_point = scale.to(x.device), zero_point.to(x.device)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.scale, self.zero_point, self.spec)

    def _check_calibrated(self) -> None:
        if not self.observer.calibrated:
            raise CalibrationError(
                f"{self.observer._label()} inside FakeQuantize has no qparams: enable its observer and run "
                "data through the model (training, or fxopt.passes.Calibrate) before using fake quantization"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.shape != getattr(self, name).shape:
                self._resize(name, saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _resize(self, name: str, shape) -> None:
        setattr(self, name, torch.empty(shape, dtype=getattr(self, name).dtype))

    def extra_repr(self) -> str:
        return f"observer_enabled={self.observer_enabled}, fake_quant_enabled={self.fake_quant_enabled}"


class LearnableFakeQuantize(FakeQuantize):
    """Fake quantization with a learned scale (LSQ): the observer only initialises it.

    The first observed batch sets ``scale`` (an ``nn.Parameter``) and turns the observer off; after that
    gradients flow to ``scale`` as ``round(v) - v`` inside the range and ``qmin/qmax - zp`` outside
    (``v = x / scale + zp``), multiplied by ``1 / sqrt(numel * qmax)`` per the LSQ paper; ``x`` gets
    gradient 1 where ``v`` (before rounding) lies in ``[qmin, qmax]``, as in the paper. For
    per-channel specs the parameter takes its shape on that first batch: create the optimizer after it.
    """

    def __init__(self, observer: Observer | None = None, **kwargs):
        super().__init__(observer, **kwargs)
        scale = self.scale
        del self.scale
        self.scale = nn.Parameter(scale)

    def _observe(self, x: torch.Tensor) -> None:
        self.observer(x.detach())
        scale, zero_point = self.observer.calculate_qparams()
        with torch.no_grad():
            if self.scale.shape == scale.shape:
                self.scale.copy_(scale)
            else:
                self.scale = nn.Parameter(scale.to(x.device))
        self.zero_point = zero_point.to(x.device)
        self.observer_enabled = False  # from now on the scale is learned

    def _resize(self, name: str, shape) -> None:
        if name == "scale":
            self.scale = nn.Parameter(torch.empty(shape))
        else:
            super()._resize(name, shape)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = _qparams_for(x, self.scale, self.zero_point, self.spec)  # keeps the autograd link
        per_scale = x.numel() / max(1, self.scale.numel())
        g = 1.0 / math.sqrt(per_scale * max(abs(self.spec.qmax), 1))
        scale = scale.clamp(min=torch.finfo(torch.float32).eps)
        scale = scale * g + (scale - scale * g).detach()  # same value, gradient scaled by g
        v = (x.float() / scale + zero_point).clamp(self.spec.qmin, self.spec.qmax)
        q = v + (torch.round(v) - v).detach()  # straight-through rounding
        return ((q - zero_point) * scale).to(x.dtype)


def set_observers(module: nn.Module, enabled: bool) -> int:
    """Enable or disable the observers of every FakeQuantize in ``module``; returns how many."""
    found = [m.enable_observer(enabled) for m in module.modules() if isinstance(m, FakeQuantize)]
    return len(found)


def set_fake_quant(module: nn.Module, enabled: bool) -> int:
    """Enable or disable fake quantization in every FakeQuantize (and QAT grid rounding) of ``module``;
    returns how many."""
    found = [m.enable_fake_quant(enabled) for m in module.modules()
             if isinstance(m, FakeQuantize) or callable(getattr(m, "enable_fake_quant", None))]
    return len(found)
