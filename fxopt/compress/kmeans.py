"""Batched 1-D k-means in torch (weight clustering).

Rows are clustered independently (one row per output channel, or a single row for the whole layer).
The values are sorted once; since a 1-D cluster is a contiguous run of sorted values, each Lloyd
iteration only looks up the midpoints between centroids in the sorted values and reads cluster sums from
prefix sums (``O(K log N)``). No ``N x K`` distance matrix is ever built. ``weights`` (0/1) exclude values from a row
(e.g. the zeros of a pruned layer).

Initialisations (TF-MOT's names): ``"kmeans++"`` (D² sampling), ``"linear"`` (evenly spaced between the
row's min and max) and ``"density"`` (evenly spaced in the row's CDF, i.e. quantiles).
"""

from __future__ import annotations

import torch

__all__ = ["INITS", "kmeans_1d", "assign"]

INITS = ("kmeans++", "linear", "density")


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every element of ``x`` ``[R, N]``; ``centroids`` ``[R, K]`` sorted."""
    mid = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(mid.contiguous(), x.contiguous())


def _init(x: torch.Tensor, w: torch.Tensor, k: int, how: str, gen: torch.Generator) -> torch.Tensor:
    rows = x.shape[0]
    big = torch.finfo(x.dtype).max
    lo = torch.where(w > 0, x, torch.full_like(x, big)).amin(1)
    hi = torch.where(w > 0, x, torch.full_like(x, -big)).amax(1)
    if how == "linear":
        steps = torch.linspace(0, 1, k, dtype=x.dtype)
        return lo[:, None] + (hi - lo)[:, None] * steps[None]
    if how == "density":
        # quantiles of the valid values of each row: sort with the invalid ones pushed to the end
        ordered = torch.where(w > 0, x, torch.full_like(x, big)).sort(1).values
        count = w.sum(1)
        q = (torch.arange(k, dtype=x.dtype) + 0.5) / k
        idx = (q[None] * count[:, None]).floor().long().clamp(min=0)
        idx = torch.minimum(idx, (count.long() - 1).clamp(min=0)[:, None])
        return ordered.gather(1, idx)
    # kmeans++: first centre uniform over valid values, then D^2 sampling (on a random subset of a long row)
    if x.shape[1] > 65536:
        pick = torch.randperm(x.shape[1], generator=gen)[:65536]
        x, w = x[:, pick], w[:, pick]
        w[w.sum(1) <= 0, 0] = 1.0  # a row whose subset has no valid value: any value seeds it
    centres = torch.empty(rows, k, dtype=x.dtype)
    first = torch.multinomial(w.float(), 1, generator=gen)
    centres[:, 0] = x.gather(1, first)[:, 0]
    d2 = (x - centres[:, :1]) ** 2
    for j in range(1, k):
        probs = d2 * w
        empty = probs.sum(1) <= 0
        probs[empty] = w[empty].float()  # all remaining points coincide with centres: any valid one
        pick = torch.multinomial(probs.float(), 1, generator=gen)
        centres[:, j] = x.gather(1, pick)[:, 0]
        d2 = torch.minimum(d2, (x - centres[:, j : j + 1]) ** 2)
    return centres


def kmeans_1d(x: torch.Tensor, k: int, *, init: str = "kmeans++", weights: torch.Tensor | None = None,
              iters: int = 50, tol: float = 1e-7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each row of ``x`` ``[R, N]`` into ``k`` values. Returns ``(centroids [R, k] sorted, labels [R, N])``.

    Empty clusters keep their previous centre (a row then uses fewer than ``k`` distinct values).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    x = x.detach().to(torch.float32)
    w = torch.ones_like(x) if weights is None else weights.to(torch.float32)
    if bool((w.sum(1) <= 0).any()):
        raise ValueError("every row needs at least one value to cluster")
    gen = torch.Generator().manual_seed(seed)
    centroids = _init(x, w, k, init, gen).sort(1).values
    # Lloyd iterations on the sorted values: a cluster is a contiguous run, so its sum and count come from
    # prefix sums at the midpoints between centroids (O(K log N) per iteration after one sort).
    xs, order = x.sort(1)
    ws = w.gather(1, order).double()
    zero = torch.zeros(x.shape[0], 1, dtype=torch.float64)
    cum_xw = torch.cat([zero, torch.cumsum(xs.double() * ws, 1)], 1)
    cum_w = torch.cat([zero, torch.cumsum(ws, 1)], 1)
    n = torch.full((x.shape[0], 1), x.shape[1], dtype=torch.long)
    for _ in range(iters):
        mid = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        bounds = torch.cat([torch.zeros_like(n), torch.searchsorted(xs, mid, right=True), n], 1)
        sums = cum_xw.gather(1, bounds[:, 1:]) - cum_xw.gather(1, bounds[:, :-1])
        counts = cum_w.gather(1, bounds[:, 1:]) - cum_w.gather(1, bounds[:, :-1])
        new = torch.where(counts > 0, sums / counts.clamp(min=1e-300), centroids.double()).float().sort(1).values
        shift = (new - centroids).abs().max()
        centroids = new
        if shift <= tol * (1 + centroids.abs().max()):
            break
    return centroids, assign(x, centroids)
