"""Compression state that runs inside a model: pruning masks, pruning schedules, clustered weights.

The passes that create them live in ``fxopt.passes`` (``PruneMagnitude``, ``ClusterWeights``,
``ApplyMasks``); the step hook that advances pruning schedules during fine-tuning is
:func:`pruning_step` / :func:`pruning_hook`.
"""

from __future__ import annotations

from .clustered import ClusteredWeight
from .kmeans import kmeans_1d
from .masks import MagnitudeMask, magnitude_masks, masked_weights, pruning_hook, pruning_step, update_masks
from .schedules import ConstantSparsity, PolynomialDecay, PruningSchedule

__all__ = [
    "ClusteredWeight",
    "MagnitudeMask",
    "PruningSchedule",
    "ConstantSparsity",
    "PolynomialDecay",
    "kmeans_1d",
    "magnitude_masks",
    "masked_weights",
    "pruning_step",
    "pruning_hook",
    "update_masks",
    "is_compression_parametrization",
]


def is_compression_parametrization(p: object) -> bool:
    """Whether ``p`` is one of fxopt's compression parametrizations (baked by ``fp.ApplyMasks``)."""
    return isinstance(p, (MagnitudeMask, ClusteredWeight))
