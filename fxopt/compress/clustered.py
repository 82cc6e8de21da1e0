"""Clustered weights kept as a parametrization: ``weight = centroids[labels]`` (weight sharing).

TF-MOT's clustering-aware training semantics: the centroids are trainable parameters and receive the
summed gradient of the weights that share them; in training mode every forward re-assigns each original
weight to its nearest centroid and passes the weight gradient straight through to the original weights,
so the assignment can change while the layer keeps at most ``n_clusters`` distinct values. With
``keep`` (sparsity preservation) the zeros of a pruned layer stay exactly zero and zero is one of the
``n_clusters`` values. ``fp.ApplyMasks()`` bakes the result into a plain weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .kmeans import assign

__all__ = ["ClusteredWeight"]


class ClusteredWeight(nn.Module):
    """Parametrization ``w -> centroids.gather(labels)`` (rows: output channels, or one row per layer)."""

    def __init__(self, centroids: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None) -> None:
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        index_dtype = torch.uint8 if centroids.shape[1] <= 256 else torch.int32
        self.register_buffer("labels", labels.to(index_dtype))
        self.register_buffer("keep", keep.to(torch.bool) if keep is not None else None)

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[1]) + (1 if self.keep is not None else 0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = self.centroids.shape[0]
        flat = weight.reshape(rows, -1)
        if self.training:
            with torch.no_grad():
                ordered, order = self.centroids.detach().sort(1)
                self.labels.copy_(order.gather(1, assign(flat.detach().float(), ordered)).to(self.labels.dtype))
        out = self.centroids.to(weight.dtype).gather(1, self.labels.long())
        if self.training:
            out = out + (flat - flat.detach())  # straight-through gradient to the original weights
        if self.keep is not None:
            out = out * self.keep.to(out.dtype)
        return out.reshape(weight.shape)

    def extra_repr(self) -> str:
        return f"rows={self.centroids.shape[0]}, n_clusters={self.n_clusters}"
