"""Weights on their int8 grid, in float: what static int8 will do to a conv/linear weight.

Used by the accuracy-aware PTQ passes (bias correction, sensitivity-guided float fallback) to see the
weight error before lowering. The qparams follow the same rule as lowering
(:func:`fxopt.backends.lowering.weight_qparams`): the weight observer kind and qspec recorded by
``PlaceObservers`` (:class:`~fxopt.quant.stubs.QuantConfig`), per output channel when the config and the
backend's op rule allow it.
"""

from __future__ import annotations

import torch

from .fake_quant import fake_quantize
from .observers import make_observer
from .stubs import QuantConfig

__all__ = ["fake_quantize_weight", "is_depthwise"]


def is_depthwise(weight: torch.Tensor, groups: int) -> bool:
    """A conv with one input channel per group (and more than one group)."""
    return weight.dim() > 2 and weight.shape[1] == 1 and int(groups) > 1


def fake_quantize_weight(weight: torch.Tensor, config: QuantConfig, per_channel: bool,
                         depthwise: bool = False) -> torch.Tensor:
    """``weight`` quantized and dequantized with the qparams static int8 lowering gives it (the backend's
    depthwise grid for a depthwise conv's weight, when it has one)."""
    base = config.depthwise_weight_spec if depthwise and config.depthwise_weight_spec is not None else config.weight_spec
    wspec = base.with_axis(0 if per_channel else None)
    observer = make_observer(config.weight, wspec)
    w = weight.detach().float()
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    with torch.no_grad():
        return fake_quantize(w, scale, zero_point, wspec).to(weight.dtype)
