"""The module of the ``"reference"`` backend: quantize→dequantize in float with fixed qparams.

:class:`QuantDequant` is what a calibrated observer becomes in the float simulation of an int8 graph
(``fxopt.lower(prepared, "reference")``): ``scale * (clamp(round(x / scale) + zero_point, qmin, qmax) -
zero_point)`` on every float tensor of its input (tuples and lists too: ``chunk``/``split`` outputs), so
the simulation rounds exactly where the int8 graph holds integers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

__all__ = ["QuantDequant"]


class QuantDequant(nn.Module):
    """Fixed-qparams fake quantization (per tensor), the float twin of one int8 value."""

    def __init__(self, scale: float, zero_point: int, quant_min: int = 0, quant_max: int = 255) -> None:
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)

    def _one(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.quant_min, self.quant_max)
        return ((q - self.zero_point) * self.scale).to(x.dtype)

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            return self._one(x)
        return pytree.tree_map(self._one, x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}, qrange=[{self.quant_min}, {self.quant_max}]"
