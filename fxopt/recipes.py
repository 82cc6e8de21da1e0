"""Recipes: plain lists of passes that a user can print, edit and give to ``fxopt.compile``."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from fxopt import passes as fp

__all__ = ["fuse", "static_int8", "dynamic_int8", "fp16"]


def fuse() -> list:
    """Float clean-up and fusion: no numerics change."""
    return [fp.RemoveIdentities(), fp.FoldBatchNorm(), fp.FuseActivations(), fp.EliminateDeadCode()]


def static_int8(
    calibration: Iterable[Any],
    *,
    observer: str = "histogram",
    per_channel: bool = True,
    backend: str | None = None,
    num_batches: int | None = None,
) -> list:
    """Static post-training int8: fuse, place stubs and observers, calibrate.

    The recipe does not fix the backend: ``fxopt.compile(m, fxopt.recipes.static_int8(data), backend="qnnpack")``
    prepares for qnnpack (x86 when compile names none). ``backend=`` pins one; compile must then agree.
    """
    return fuse() + [
        fp.InsertQuantStubs(backend=backend),
        fp.PlaceObservers(activation=observer, per_channel=per_channel),
        fp.Calibrate(calibration, num_batches=num_batches),
    ]


def dynamic_int8(dtype: torch.dtype = torch.qint8) -> list:
    """Dynamic quantization of Linear/LSTM/GRU/Embedding (no calibration data needed)."""
    return [fp.RemoveIdentities(), fp.QuantizeDynamic(dtype=dtype)]


def fp16() -> list:
    """Half-precision weights (after folding BatchNorm)."""
    return [fp.RemoveIdentities(), fp.FoldBatchNorm(), fp.ConvertFP16()]
