"""fxopt's built-in passes, one per file. ``from fxopt import passes as fp``.

Each name is imported from its own file on first use, so importing ``fxopt.passes`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> file (module) that defines it
_PASSES: dict[str, str] = {
    "EliminateDeadCode": "eliminate_dead_code",
    "RemoveIdentities": "remove_identities",
    "FoldBatchNorm": "fold_batchnorm",
    "FuseActivations": "fuse_activations",
    "DecomposeAttention": "decompose_attention",
    "LinearizeConv1D": "linearize_conv1d",
    "InsertQuantStubs": "insert_quant_stubs",
    "PlaceObservers": "place_observers",
    "Calibrate": "calibrate",
    "QuantizeDynamic": "quantize_dynamic",
    "QuantizeIslands": "quantize_dynamic",
    "ConvertFP16": "convert_fp16",
    "PrepareQAT": "prepare_qat",
    "EqualizeCrossLayer": "equalize_cross_layer",
    "CorrectBias": "correct_bias",
    "FloatFallback": "float_fallback",
    "TuneHeadroom": "tune_headroom",
    "AdaRound": "adaround",
    "PruneMagnitude": "prune_magnitude",
    "ApplyMasks": "apply_masks",
    "PruneChannels": "prune_channels",
    "ClusterWeights": "cluster_weights",
    "LowRankFactorize": "low_rank",
}

__all__ = sorted(_PASSES)


def __getattr__(name: str) -> Any:
    module = _PASSES.get(name)
    if module is None:
        raise AttributeError(f"fxopt.passes has no pass {name!r}; available: {', '.join(__all__)}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
