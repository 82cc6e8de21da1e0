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

__all__ = ["fake_quantize_weight"]


def fake_quantize_weight(weight: torch.Tensor, config: QuantConfig, per_channel: bool) -> torch.Tensor:
    """``weight`` quantized and dequantized with the qparams static int8 lowering gives it."""
    wspec = config.weight_spec.with_axis(0 if per_channel else None)
    observer = make_observer(config.weight, wspec)
    w = weight.detach().float()
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    with torch.no_grad():
        return fake_quantize(w, scale, zero_point, wspec).to(weight.dtype)
