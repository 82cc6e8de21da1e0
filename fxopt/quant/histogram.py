"""Histogram math for the histogram-based observers (percentile, histogram, mse).

Everything works on a batch of rows: ``hist`` is ``(C, B)`` (one histogram per channel, ``C = 1`` for
per-tensor), ``left`` and ``width`` are ``(C, 1)`` float64 (left edge and bin width). Values are
assumed uniform inside a bin. Range choosers return ``(lo, hi)`` of shape ``(C,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import QSpec, qparams_from_range

__all__ = ["histogram", "rebin", "percentile_range", "l2_range", "search_factors", "mse_range", "mse_range_on_values"]


def histogram(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of each row of ``rows`` (C, N) in ``bins`` equal bins over ``[lo, hi]`` (all values inside)."""
    if rows.shape[0] == 1:
        return torch.histc(rows, bins, min=float(lo[0]), max=float(hi[0])).double()[None]
    channels = rows.shape[0]
    scale = (bins / (hi - lo))[:, None]
    idx = ((rows - lo[:, None]) * scale).long().clamp_(0, bins - 1)
    idx += torch.arange(channels, device=rows.device)[:, None] * bins
    return torch.bincount(idx.reshape(-1), minlength=channels * bins).reshape(channels, bins).double()


def rebin(hist: torch.Tensor, old_lo, old_hi, new_lo, new_hi) -> torch.Tensor:
    """Re-bin ``hist`` from ``[old_lo, old_hi]`` onto the wider ``[new_lo, new_hi]`` (same bin count).

    Each old bin's mass is split between the (at most two) new bins it overlaps, in proportion.
    """
    channels, bins = hist.shape
    old_lo, old_hi, new_lo, new_hi = (t.double()[:, None] for t in (old_lo, old_hi, new_lo, new_hi))
    new_width = (new_hi - new_lo) / bins
    u = (old_lo + (old_hi - old_lo) / bins * torch.arange(bins + 1, device=hist.device) - new_lo) / new_width
    start, end = u[:, :-1], u[:, 1:]
    first = start.floor().clamp(0, bins - 1)
    frac = ((first + 1 - start) / (end - start).clamp(min=1e-12)).clamp(0, 1)
    out = torch.zeros_like(hist)
    out.scatter_add_(1, first.long(), hist * frac)
    out.scatter_add_(1, (first + 1).clamp(max=bins - 1).long(), hist * (1 - frac))
    return out


def _cdf(hist: torch.Tensor) -> torch.Tensor:
    return F.pad(hist.cumsum(dim=1), (1, 0))  # counts below each of the B + 1 edges


def _interp_cdf(cdf, left, width, t):
    bins = cdf.shape[1] - 1
    u = ((t - left) / width).clamp(0, bins)
    k = u.floor().clamp(max=bins - 1).long()
    c0 = cdf.gather(1, k)
    return c0 + (u - k) * (cdf.gather(1, k + 1) - c0)


def _inverse_cdf(cdf, left, width, target):
    bins = cdf.shape[1] - 1
    k = torch.searchsorted(cdf.contiguous(), target.contiguous()).clamp(1, bins)
    c0, c1 = cdf.gather(1, k - 1), cdf.gather(1, k)
    frac = ((target - c0) / (c1 - c0).clamp(min=1e-12)).clamp(0, 1)
    return (left + (k - 1 + frac) * width)[:, 0]


def percentile_range(hist, left, width, lo, hi, percentile: float, symmetric: bool):
    """The ``percentile``-th percentile of each tail, or of ``|x|`` (then ``(-t, t)``) when symmetric."""
    cdf = _cdf(hist)
    total = cdf[:, -1:]
    p = percentile / 100.0
    if symmetric:  # smallest t on a fine grid with P(-t <= x <= t) >= p
        bound = torch.maximum(lo.abs(), hi.abs()).double()[:, None]
        t = bound * torch.linspace(0.0, 1.0, hist.shape[1] + 1, dtype=torch.float64, device=hist.device)
        inside = _interp_cdf(cdf, left, width, t) - _interp_cdf(cdf, left, width, -t)
        idx = (inside < p * total * (1 - 1e-12)).sum(dim=1, keepdim=True).clamp(max=t.shape[1] - 1)
        t = t.gather(1, idx)[:, 0]
        return -t, t
    return _inverse_cdf(cdf, left, width, (1.0 - p) * total), _inverse_cdf(cdf, left, width, p * total)


def _grid(spec: QSpec, a: torch.Tensor, b: torch.Tensor):
    """Lowest grid point, step and highest grid point of the quantizer that qparams_from_range gives."""
    scale, zero_point = qparams_from_range(spec, a, b)
    scale = scale.double()
    g_lo = (spec.qmin - zero_point).double() * scale
    return g_lo, scale, g_lo + (spec.qmax - spec.qmin) * scale


class _L2Model:
    """Modelled squared error of quantizing the histogram with the grid of ``[a, b]``.

    Clipping error is integrated exactly (prefix sums of per-bin moments, partial edge bin by hand);
    rounding error is ``scale² / 12`` per value inside the grid, except exact zeros (always on the grid).
    """

    def __init__(self, hist, left, width, zeros, spec: QSpec, clip_weight: float = 1.0):
        self.clip_weight = clip_weight
        bins = hist.shape[1]
        centers = left + width * (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5)
        self.hist, self.left, self.width, self.spec = hist, left, width, spec
        self.p0, self.p1 = _cdf(hist), _cdf(hist * centers)
        self.p2 = _cdf(hist * (centers**2 + width**2 / 12))
        self.total, self.zeros = self.p0[:, -1:], zeros[:, None]

    def _tail(self, g, below: bool):
        bins = self.hist.shape[1]
        k = ((g - self.left) / self.width).clamp(0, bins).floor().clamp(max=bins - 1).long()
        e0 = self.left + k * self.width
        e1, m, w = e0 + self.width, self.hist.gather(1, k), self.width
        if below:  # values < g: bins before k, and the part of bin k below g
            s0, s1, s2 = (p.gather(1, k) for p in (self.p0, self.p1, self.p2))
            part = m / (3 * w) * ((g - e0).clamp(min=0) ** 3 - (g - torch.minimum(g, e1)) ** 3)
            mass = s0 + m * (torch.minimum(g, e1) - e0).clamp(min=0) / w
        else:  # values > g: bins after k, and the part of bin k above g
            s0, s1, s2 = (p[:, -1:] - p.gather(1, k + 1) for p in (self.p0, self.p1, self.p2))
            part = m / (3 * w) * ((e1 - g).clamp(min=0) ** 3 - (torch.maximum(g, e0) - g) ** 3)
            mass = s0 + m * (e1 - torch.maximum(g, e0)).clamp(min=0) / w
        return s2 - 2 * g * s1 + g * g * s0 + part, mass

    def __call__(self, a, b):
        g_lo, scale, g_hi = _grid(self.spec, a, b)
        err_lo, mass_lo = self._tail(g_lo, below=True)
        err_hi, mass_hi = self._tail(g_hi, below=False)
        inside = (self.total - mass_lo - mass_hi - self.zeros).clamp(min=0)
        return self.clip_weight * (err_lo + err_hi) + inside * scale**2 / 12


def l2_range(hist, left, width, zeros, lo, hi, spec: QSpec, clip_weight: float = 1.0):
    """``[a, b]`` minimising the :class:`_L2Model` error: a 1-D search over bin edges when symmetric,
    else a coarse 2-D grid of (left edge, right edge) refined at full resolution around the best.

    The model's ``scale²/12`` rounding error is wrong for peaks narrower than a quantization step (few
    bits), so the result is finally checked against the full ``[lo, hi]`` with the exact error.
    ``clip_weight`` multiplies the clipping part of both errors (> 1: clipping costs more than rounding).
    """
    a, b = _l2_search(_L2Model(hist, left, width, zeros, spec, clip_weight), hist, left, width, lo, hi, spec)
    edges = left + width * torch.arange(hist.shape[1] + 1, dtype=torch.float64, device=hist.device)
    a = torch.cat([a[:, None], lo.double()[:, None]], dim=1)
    b = torch.cat([b[:, None], hi.double()[:, None]], dim=1)
    k = _exact_mse(edges, hist / width, a, b, spec, clip_weight).argmin(dim=1, keepdim=True)
    return a.gather(1, k)[:, 0], b.gather(1, k)[:, 0]


def _l2_search(model, hist, left, width, lo, hi, spec: QSpec):
    bins = hist.shape[1]
    if spec.symmetric:
        bound = torch.maximum(lo.abs(), hi.abs()).double()[:, None]
        t = bound * _best_factor(lambda f: model(-bound * f, bound * f), len(hist), max(16, bins // 8), hist.device)
        return -t[:, 0], t[:, 0]

    def best(i, j):
        k = model(left + i * width, left + j * width).argmin(dim=1, keepdim=True)
        return i.gather(1, k), j.gather(1, k)

    step, rows = max(1, bins // 128), hist.shape[0]
    edge = torch.arange(0, bins + 1, step, device=hist.device)
    i, j = torch.meshgrid(edge, edge, indexing="ij")
    keep = i < j
    i, j = best(i[keep].expand(rows, -1), j[keep].expand(rows, -1))
    off = torch.arange(-step, step + 1, device=hist.device)
    n = len(off)
    i = (i[:, :, None] + off[None, :, None]).expand(-1, n, n).reshape(rows, -1).clamp(0, bins)
    j = (j[:, :, None] + off[None, None, :]).expand(-1, n, n).reshape(rows, -1).clamp(0, bins)
    i, j = best(torch.minimum(i, j), torch.maximum(i, j))
    return (left + i * width)[:, 0], (left + j * width)[:, 0]


def _exact_mse(edges, density, a, b, spec: QSpec, clip_weight: float = 1.0):
    """Squared quantize→dequantize error of the histogram for each candidate range: (C, K).

    ``G(x) = ∫_{g_lo}^{x} (t - Q(t))² dt`` has a closed form (n full rounding cells of ``s³/12`` each,
    a partial cell, cubic clipping tails), so a bin contributes ``density · (G(e1) - G(e0))``.
    """
    g_lo, s, g_hi = (t[:, :, None] for t in _grid(spec, a, b))
    x = edges[:, None, :]
    y = ((x - g_lo) / s).clamp(0, spec.qmax - spec.qmin) + 0.5
    cells = y.floor()
    r = y - cells - 0.5
    g = s**3 * (cells / 12 + (r**3 + 0.125) / 3 - 1 / 24)
    g = g + clip_weight * ((x - g_lo).clamp(max=0) ** 3 / 3 + (x - g_hi).clamp(min=0) ** 3 / 3)
    return ((g[..., 1:] - g[..., :-1]) * density[:, None, :]).sum(dim=-1)


def _best_factor(score, rows: int, coarse: int, device, sub: int = 8) -> torch.Tensor:
    """argmin over factors ``f`` in (0, 1] of ``score(f)`` ((C, K) -> (C, K)): ``coarse`` even steps,
    then ``2 * sub + 1`` steps of ``1 / (coarse * sub)`` around the best. Returns (C, 1)."""
    f = (torch.arange(1, coarse + 1, dtype=torch.float64, device=device) / coarse).expand(rows, -1)
    f = f.gather(1, score(f).argmin(dim=1, keepdim=True))
    steps = torch.linspace(-1.0, 1.0, 2 * sub + 1, dtype=torch.float64, device=device) / coarse
    f = (f + steps).clamp(1.0 / (coarse * sub), 1.0)
    return f.gather(1, score(f).argmin(dim=1, keepdim=True))


def search_factors(err, lo, hi, spec: QSpec, num_candidates: int):
    """Minimise ``err(a, b)`` ((C, K) candidates -> (C, K) errors) over shrink factors: of ``max|x|``
    (symmetric), or of (min, max) jointly and then of each side in turn (asymmetric). Each 1-D search
    takes ``num_candidates`` even steps in (0, 1], refined 8x around the best. The range is widened to
    include 0 first (as qparams_from_range does), so every candidate has ``a <= 0 <= b``."""
    lo, hi = lo.double().clamp(max=0)[:, None], hi.double().clamp(min=0)[:, None]

    def factor(a_of, b_of):
        return _best_factor(lambda f: err(a_of(f), b_of(f)), len(lo), num_candidates, lo.device)

    if spec.symmetric:
        bound = torch.maximum(lo.abs(), hi.abs())
        t = bound * factor(lambda f: -bound * f, lambda f: bound * f)
        return -t[:, 0], t[:, 0]
    f = factor(lambda f: lo * f, lambda f: hi * f)
    a, b = lo * f, hi * f
    a = lo * factor(lambda f: lo * f, lambda f: b.expand_as(f))
    b = hi * factor(lambda f: a.expand_as(f), lambda f: hi * f)
    return a[:, 0], b[:, 0]


def mse_range(hist, left, width, lo, hi, spec: QSpec, num_candidates: int):
    """:func:`search_factors` with the exact quantize→dequantize error integrated over the histogram."""
    edges = left + width * torch.arange(hist.shape[1] + 1, dtype=torch.float64, device=hist.device)
    density = hist / width
    return search_factors(lambda a, b: _exact_mse(edges, density, a, b, spec), lo, hi, spec, num_candidates)


def mse_range_on_values(values, lo, hi, spec: QSpec, num_candidates: int):
    """:func:`search_factors` with the quantize→dequantize error of the values themselves ((C, N))."""
    x = values[:, None, :]

    def err(a, b):
        scale, zero_point = (t.to(torch.float32)[:, :, None] for t in qparams_from_range(spec, a, b))
        q = (torch.round(x / scale) + zero_point).clamp(spec.qmin, spec.qmax)
        return (((q - zero_point) * scale - x) ** 2).sum(dim=-1)

    return search_factors(err, lo, hi, spec, num_candidates)
