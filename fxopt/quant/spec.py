"""Quantization specs and the seeds' scale / zero-point math.

``scale = (max_f - min_f) / (q_max - q_min)``, ``zero_point = q_min - round(min_f / scale)`` (clamped),
``q = clamp(round(x / scale) + zero_point, q_min, q_max)``, ``x ≈ scale * (q - zero_point)``.
The float range is always widened to include 0 so that zero is exactly representable (padding,
ReLU outputs). Symmetric specs use ``max(|min_f|, |max_f|)`` on both sides and a fixed zero point.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["QSpec", "qparams_from_range", "fused_activation_qparams", "quantize", "dequantize", "EPS"]

EPS = torch.finfo(torch.float32).eps

_RANGES = {
    torch.quint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.qint32: (-(2**31), 2**31 - 1),
}


@dataclass(frozen=True)
class QSpec:
    """How a tensor is quantized: dtype, bits, symmetry, granularity and range.

    ``axis`` is ``None`` for per-tensor and the channel axis for per-channel. ``quant_min`` /
    ``quant_max`` default to the full range of ``dtype`` narrowed to ``bits`` (and halved with
    ``reduce_range``, for CPUs without VNNI where fbgemm's 16-bit accumulation could overflow).
    """

    dtype: torch.dtype = torch.quint8
    bits: int = 8
    symmetric: bool = False
    axis: int | None = None
    reduce_range: bool = False
    quant_min: int | None = None
    quant_max: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _RANGES:
            raise ValueError(f"QSpec dtype must be one of {list(_RANGES)}, got {self.dtype}")
        if not 2 <= self.bits <= (32 if self.dtype == torch.qint32 else 8):
            raise ValueError(f"QSpec bits={self.bits} is out of range for {self.dtype}")
        lo, hi = self.qrange
        if lo >= hi:
            raise ValueError(f"QSpec range [{lo}, {hi}] is empty")

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def qrange(self) -> tuple[int, int]:
        if self.quant_min is not None and self.quant_max is not None:
            return self.quant_min, self.quant_max
        lo, hi = _RANGES[self.dtype]
        if self.dtype != torch.qint32:
            bits = self.bits - (1 if self.reduce_range else 0)
            if lo < 0:
                lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            else:
                lo, hi = 0, 2**bits - 1
        lo = self.quant_min if self.quant_min is not None else lo
        hi = self.quant_max if self.quant_max is not None else hi
        return lo, hi

    @property
    def qmin(self) -> int:
        return self.qrange[0]

    @property
    def qmax(self) -> int:
        return self.qrange[1]

    def with_axis(self, axis: int | None) -> "QSpec":
        return replace(self, axis=axis)


def qparams_from_range(spec: QSpec, min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int64) for the float range ``[min_val, max_val]``.

    Works elementwise, so per-channel ranges give per-channel qparams.
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if torch.any(min_val > max_val):
        raise ValueError("qparams_from_range: min_val must be <= max_val")
    qmin, qmax = spec.qrange
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if spec.symmetric:
        bound = torch.maximum(-min_neg, max_pos)
        if qmin < 0:
            # signed: zero point 0, range [-bound, bound] over the symmetric part of the int range
            scale = bound / (float(qmax - qmin) / 2)
            zero_point = torch.zeros_like(scale, dtype=torch.int64)
        else:
            scale = bound / (float(qmax - qmin) / 2)
            zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int64)
        scale = torch.clamp(scale, min=EPS)
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)
        scale = torch.clamp(scale, min=EPS)
        zero_point = qmin - torch.round(min_neg / scale)
        zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int64)
    return scale.to(torch.float32), zero_point


def fused_activation_qparams(spec: QSpec, qparams: tuple[float, int], act: str | None) -> tuple[float, int]:
    """The per-tensor qparams an int8 kernel with a fused ReLU / ReLU6 writes: the range of ``qparams`` cut
    at 0 (and at 6 for ``"relu6"``); ``qparams`` unchanged when ``act`` is None."""
    if act is None:
        return qparams
    scale, zero_point = qparams
    lo, hi = (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale
    if lo >= 0.0 and (act != "relu6" or hi <= 6.0):
        return qparams  # already inside the activation's range: the very same qparams (a cat sharing them copies)
    hi = min(hi, 6.0) if act == "relu6" else hi
    s, z = qparams_from_range(spec, torch.tensor(max(lo, 0.0)), torch.tensor(hi))
    return float(s), int(z)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Integer codes (as an int64 tensor) of ``x``; per-channel along ``spec.axis``."""
    scale, zero_point = _broadcast(x, scale, zero_point, spec.axis)
    return torch.clamp(torch.round(x / scale) + zero_point, spec.qmin, spec.qmax).to(torch.int64)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QSpec) -> torch.Tensor:
    scale, zero_point = _broadcast(q, scale, zero_point, spec.axis)
    return (q.to(torch.float32) - zero_point) * scale


def _broadcast(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None):
    scale = torch.as_tensor(scale, dtype=torch.float32)
    zero_point = torch.as_tensor(zero_point)
    if axis is None or scale.dim() == 0:
        return scale, zero_point
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape), zero_point.reshape(shape)
