"""Recipes: plain lists of passes that a user can print, edit and give to ``fxopt.compile``."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from fxopt import passes as fp

__all__ = ["fuse", "static_int8", "dynamic_int8", "fp16", "qat"]


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


def qat(
    *,
    backend: str | None = None,
    weight_bits: int = 8,
    activation_bits: int = 8,
    per_channel: bool = True,
    learnable: bool = False,
    freeze_bn_after: int | None = None,
    freeze_observers_after: int | None = None,
) -> list:
    """Quantization-aware training: a trainable fake-quant graph (Conv+BN trained folded, STE, optional LSQ).

    Train the compiled module (an ordinary loop or ``fxopt.finetune(qat_model, data, teacher=float_model)``),
    then ``fxopt.lower(qat_model.eval(), backend)``. The recipe follows compile's ``backend`` (x86 when none is
    named); ``backend=`` pins one.
    """
    return [
        fp.PrepareQAT(backend=backend, weight_bits=weight_bits, activation_bits=activation_bits,
                      per_channel=per_channel, learnable=learnable, freeze_bn_after=freeze_bn_after,
                      freeze_observers_after=freeze_observers_after),
    ]
