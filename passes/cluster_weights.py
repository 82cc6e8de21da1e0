"""``cluster-weights``: weight sharing. Each layer's weights take one of ``n_clusters`` values.

k-means (``fxopt.compress.kmeans_1d``: batched, 1-D, in torch) over each selected layer's weights, or
over each output channel with ``per_channel=True``; ``init`` is ``"kmeans++"``, ``"linear"`` or
``"density"`` (TF-MOT's centroid initialisations). The result is a parametrization
(``fxopt.compress.ClusteredWeight``) so the layer stays clustered while fine-tuning: gradients update the
centroids (TF-MOT's clustering-aware training), and ``fp.ApplyMasks()`` bakes the values.

``preserve_sparsity=True`` keeps the zeros of a pruned layer exactly zero: zero is one of the
``n_clusters`` values and only the nonzero weights are clustered (into ``n_clusters - 1`` centroids).
Layers with ``n_clusters`` or fewer weights are skipped with a note. Module-level pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn.utils import parametrize

from fxopt import Pass, PassResult
from fxopt.compress import ClusteredWeight, kmeans_1d
from fxopt.compress.kmeans import INITS

from ._compress import describe_selection, freeze_selection, own_copy, parametrizations_of, select_layers

__all__ = ["ClusterWeights"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterWeights(Pass):
    """k-means weight sharing, kept as a trainable parametrization."""

    name = "cluster-weights"
    swaps_modules: ClassVar[bool] = True  # only replaces layers: compile may return the eager model (fxopt.compress.eager)
    module_level: ClassVar[bool] = True

    n_clusters: int = 16
    init: str = "kmeans++"
    per_channel: bool = False
    preserve_sparsity: bool = True
    include: tuple = ()
    exclude: tuple = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_clusters, bool) or not isinstance(self.n_clusters, int) or self.n_clusters < 2:
            raise ValueError(f"n_clusters must be an integer >= 2, got {self.n_clusters!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        freeze_selection(self)

    def call(self, gm: torch.nn.Module) -> PassResult:
        return PassResult(gm, *self.apply(gm))

    def apply(self, root: torch.nn.Module) -> tuple[bool, dict, list[str]]:
        layers, notes = select_layers(root, self.include, self.exclude)
        if not layers:
            return False, {"layers": 0}, notes + [f"nothing to cluster: {describe_selection(self.include)}"]
        done = 0
        for name, module in layers:
            if any(isinstance(p, ClusteredWeight) for p in parametrizations_of(module)):
                notes.append(f"{name}: skipped, already clustered")
                continue
            weight = module.weight.detach()
            if weight.numel() // (weight.shape[0] if self.per_channel else 1) <= self.n_clusters:
                notes.append(f"{name}: skipped, {weight.numel()} weights <= n_clusters={self.n_clusters} per row")
                continue
            module = own_copy(root, module)
            rows = weight.shape[0] if self.per_channel else 1
            flat = weight.reshape(rows, -1).float().cpu()
            keep = flat != 0 if self.preserve_sparsity else None
            if keep is not None and bool(keep.all()):
                keep = None
            k = self.n_clusters - (1 if keep is not None else 0)
            valid = keep.clone() if keep is not None else None
            if valid is not None:
                valid[~valid.any(1), 0] = True  # an all-zero row: cluster its (zero) first value, keep zeros
            centroids, labels = kmeans_1d(flat, k, init=self.init, weights=valid, seed=self.seed)
            param = ClusteredWeight(centroids.to(weight.dtype), labels, keep).to(weight.device)
            param.train(module.training)
            parametrize.register_parametrization(module, "weight", param)
            done += 1
        stats = {"layers": done, "n_clusters": self.n_clusters,
                 "bits_per_weight": round(float(torch.tensor(float(self.n_clusters)).log2().ceil()), 1)}
        if not done:
            notes.append("nothing clustered")
        logger.debug("cluster-weights: %s", stats)
        return done > 0, stats, notes
