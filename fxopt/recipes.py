"""Recipes: plain lists of passes that a user can print, edit and give to ``fxopt.compile``."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from fxopt import passes as fp

__all__ = ["fuse", "static_int8", "dynamic_int8", "fp16", "qat", "prune", "cluster", "low_rank"]


def fuse() -> list:
    """Float clean-up and fusion: no numerics change."""
    return [fp.RemoveIdentities(), fp.FoldBatchNorm(), fp.FuseActivations(), fp.EliminateDeadCode()]


# In static_int8 the histogram observer's clipping error counts 16x its rounding error: on 16 calibration
# images the tails are under-sampled, and clipping errors (biased, unlike rounding) add up through deep
# networks. Measured on the 224-px natural-image bench (bench/quant_numerics.py --natural, 32 held-out
# images, x86, plain L2 choice -> clip_weight 16): efficientnet_b0 8.69 -> 10.78 dB, mobilenet_v3_large
# 9.29 -> 10.42, regnet_x_400mf 17.99 -> 18.19; README "Measured here" has the whole table.
HISTOGRAM_DEFAULTS = {"clip_weight": 16.0}

# ... and its chosen range is then widened 1.1x (HistogramObserver(headroom=...)): a range fitted on 16
# calibration images clips the tails of held-out images (squeezenet1_1: 36.6 dB on the calibration images
# but 32.8 on held-out ones, where torch.ao's reduce_range quirk leaves ~2x room and got 34.8). Measured on
# the same bench, all 10 models, headroom 1.0 -> 1.1: squeezenet1_1 33.39 -> 35.89, googlenet 17.21 -> 18.59,
# efficientnet_b0 11.52 -> 11.78, densenet121 21.90 -> 21.56 (the largest loss); 1.25 lost up to 1.1 dB on the
# BatchNorm networks (densenet121, resnet18), and "auto" (TuneHeadroom) picked a worse headroom than 1.1 on 5
# of the 8 models it was run on (2-fold splits of 16 images are too noisy).
HEADROOM = 1.1


def static_int8(
    calibration: Iterable[Any],
    *,
    observer: str = "histogram",
    per_channel: bool = True,
    backend: str | None = None,
    num_batches: int | None = None,
    equalize: bool = False,
    bias_correction: bool | str = False,
    adaround: bool | int = False,
    min_sqnr: float | None = None,
    max_float_fraction: float = 0.1,
    metric: Any = None,
    min_metric: float | None = None,
    share_cat: bool = True,
    headroom: float | str = HEADROOM,
    islands: str = "dynamic",
) -> list:
    """Static post-training int8: fuse, place stubs and observers, calibrate.

    ``nn.TransformerEncoder`` / ``MultiheadAttention`` are decomposed first (``DecomposeAttention``), so their
    Linear layers (and, on onnx / openvino, attention's matmuls) are quantized too.

    The recipe does not fix the backend: ``fxopt.compile(m, fxopt.recipes.static_int8(data), backend="qnnpack")``
    prepares for qnnpack (x86 when compile names none). ``backend=`` pins one; compile must then agree.

    Accuracy-aware options: ``equalize=True`` adds cross-layer equalization (``EqualizeCrossLayer``, after
    BatchNorm folding), ``bias_correction=True`` (or ``"empirical"``) adds empirical bias correction
    (``CorrectBias``), ``bias_correction="analytical"`` the data-free one from BatchNorm statistics;
    ``adaround=True`` (or a number of iterations) learns each weight's rounding (``AdaRound``) after calibration;
    ``min_sqnr=dB`` (or ``metric=fn(outputs, reference)`` with ``min_metric=``) adds ``FloatFallback``, which
    keeps the most damaging ops float (at most ``max_float_fraction`` of them) until the target holds.
    ``headroom``: the histogram observers' chosen ranges are widened this many times (``HistogramObserver``),
    for the tails of inputs the calibration data did not show (default ``HEADROOM`` = 1.1, see there);
    ``"auto"`` picks it per model by 2-fold cross-validation over the calibration batches (``TuneHeadroom``,
    among 1, 1.1 and 1.25; measured noisier than the fixed default on the natural-image bench).
    ``share_cat`` (default on): a ``cat`` and the inputs computed only for it share one set of qparams
    (``PlaceObservers(share_cat=True)``), so the int8 cat is a copy; ``share_cat=False`` requantizes.
    ``islands="dynamic"`` (default): Linear layers inside the float islands the tracer left (``fxopt.untraced``,
    e.g. Faster R-CNN's ``roi_heads``) get dynamic int8 (``QuantizeIslands``; x86/qnnpack, not the export
    backends); ``islands="float"`` leaves them float.
    """
    if islands not in ("dynamic", "float"):
        raise ValueError(f"static_int8(islands={islands!r}): give 'dynamic' or 'float'")
    if headroom != "auto" and (isinstance(headroom, str) or headroom < 1):
        raise ValueError(f"static_int8(headroom={headroom!r}): give a number >= 1 or 'auto'")
    calibration = list(calibration) if (bias_correction or adaround or min_sqnr is not None or min_metric is not None
                                        or headroom == "auto") else calibration
    options = dict(HISTOGRAM_DEFAULTS) if observer == "histogram" else {}
    if observer == "histogram" and headroom != "auto" and headroom != 1.0:
        options["headroom"] = float(headroom)
    steps = [fp.DecomposeAttention(backend=backend), fp.LinearizeConv1D(), fp.RemoveIdentities(), fp.FoldBatchNorm()]
    if equalize:
        steps.append(fp.EqualizeCrossLayer())
    steps += [fp.FuseActivations(), fp.EliminateDeadCode()]
    if islands == "dynamic":
        steps.append(fp.QuantizeIslands(backend=backend))
    steps += [fp.InsertQuantStubs(backend=backend),
              fp.PlaceObservers(activation=observer, per_channel=per_channel, share_cat=share_cat,
                                activation_options=options)]
    if headroom == "auto" and observer == "histogram":
        steps.append(fp.TuneHeadroom(calibration, num_batches=num_batches))
    if bias_correction:
        mode = "empirical" if bias_correction is True else str(bias_correction)
        steps.append(fp.CorrectBias(None if mode == "analytical" else calibration, num_batches=num_batches,
                                    mode=mode))
    steps.append(fp.Calibrate(calibration, num_batches=num_batches))
    if adaround:
        iters = {} if adaround is True else {"iters": int(adaround)}
        steps.append(fp.AdaRound(calibration, num_batches=num_batches, **iters))
    if min_sqnr is not None or min_metric is not None:
        steps.append(fp.FloatFallback(calibration, min_sqnr=min_sqnr, max_float_fraction=max_float_fraction,
                                      metric=metric, min_metric=min_metric))
    return steps


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


def prune(sparsity: float, *, structured: bool = False, scope: str = "global", schedule=None) -> list:
    """Pruning. Unstructured (default): magnitude masks kept as parametrizations, ready for fine-tuning
    (``fp.ApplyMasks()`` bakes them; add it before ``static_int8``). ``structured=True``: remove
    ``sparsity`` of the channels of every prunable dependency group (needs ``example_inputs``)."""
    if structured:
        return [fp.PruneChannels(sparsity)]
    return [fp.PruneMagnitude(sparsity, scope=scope, schedule=schedule)]


def cluster(n_clusters: int, *, per_channel: bool = False, preserve_sparsity: bool = True) -> list:
    """Weight sharing: every layer's weights take one of ``n_clusters`` trainable centroid values
    (``fp.ApplyMasks()`` bakes them)."""
    return [fp.ClusterWeights(n_clusters, per_channel=per_channel, preserve_sparsity=preserve_sparsity)]


def low_rank(*, rank_ratio: float | None = None, energy: float | None = None, scheme: str = "channel") -> list:
    """Truncated-SVD factorization of Linear and Conv2d layers (``rank_ratio=0.5`` when neither is given);
    ``scheme="spatial"``: convolutions become a kh×1 then a 1×kw convolution (AIMET's spatial SVD)."""
    return [fp.LowRankFactorize(rank_ratio=rank_ratio, energy=energy, scheme=scheme)]
