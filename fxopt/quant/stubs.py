"""Quant/dequant stubs: the region borders InsertQuantStubs puts into a float graph.

In float they are identities, so a prepared graph still runs (and can be calibrated or trained);
lowering turns a ``QuantStub`` into ``quantize_per_tensor`` with the qparams of the observer that
follows it and a ``DeQuantStub`` into ``dequantize()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .spec import QSpec

__all__ = ["QuantStub", "DeQuantStub", "QuantConfig"]


class QuantStub(nn.Module):
    """Entry of an int8 region (identity until lowered)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DeQuantStub(nn.Module):
    """Exit of an int8 region (identity until lowered)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class QuantConfig:
    """What PlaceObservers chose, recorded on the graph for lowering (``fxopt.meta.quant_config``)."""

    backend: str
    activation: str  # observer kind for activations
    weight: str  # observer kind for weights ("minmax", "mse", ...)
    per_channel: bool
    symmetric_weights: bool
    activation_spec: QSpec
    weight_spec: QSpec  # per-channel (axis=0) when per_channel
    depthwise_weight_spec: QSpec | None = None  # the backend's narrower depthwise grid (x86: [-63, 63])
    # a cat whose inputs are computed only for it takes one set of qparams for inputs and output
    # (PlaceObservers(share_cat=True); Calibrate ties the observers once their ranges are known)
    share_cat: bool = False
