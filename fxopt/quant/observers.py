"""Observers: modules that watch float values during calibration and choose quantization ranges.

An observer's ``forward(x)`` records statistics and returns ``x`` itself; ``calculate_qparams()``
turns them into ``(scale, zero_point)`` with :func:`fxopt.quant.spec.qparams_from_range`. With a
per-channel spec (``spec.axis`` set) every statistic is kept per channel along that axis: all
observers work on a ``(channels, values)`` view, one row per channel (one row for per-tensor).

Kinds (``make_observer(kind, spec)``):

- ``minmax``: running min / max.
- ``moving_average``: exponential moving average of each batch's min / max.
- ``percentile``: the p-th percentile of each tail (of ``|x|`` for symmetric specs), read off a
  histogram, so memory stays bounded.
- ``histogram``: a histogram whose range grows (re-binning) as data arrives; the clipping range is the
  one that minimises the modelled quantization error (clipping error + rounding error ``scale²/12``)
  over the histogram, searched coarse-to-fine over bin edges with prefix sums (O(1) per candidate).
- ``mse``: a grid search over shrink factors of the min / max that minimises the mean squared error
  of quantize→dequantize: on the values themselves while few were seen (weights), else integrated
  exactly over the histogram (values uniform inside a bin).

State lives in buffers, so a calibrated model can be saved and reloaded with ``state_dict``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from ..errors import CalibrationError
from . import histogram as hm
from .spec import QSpec, qparams_from_range

log = logging.getLogger(__name__)

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageObserver",
    "PercentileObserver",
    "HistogramObserver",
    "MSEObserver",
    "OBSERVER_KINDS",
    "make_observer",
]


class Observer(nn.Module):
    """Base observer: tracks the running min / max per row and checks the data.

    Subclasses refine ``_observe`` (what to record) and ``_range`` (the chosen float range).
    """

    def __init__(self, spec: QSpec, *, name: str | None = None):
        super().__init__()
        self.spec = spec
        self.name = name
        shape = (0,) if spec.per_channel else ()
        self.register_buffer("min_val", torch.full(shape, math.inf))
        self.register_buffer("max_val", torch.full(shape, -math.inf))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.int64))

    @property
    def calibrated(self) -> bool:
        """Whether the observer has seen data."""
        return bool(self.num_batches > 0)

    def _label(self) -> str:
        return f"observer {self.name!r}" if self.name else f"{type(self).__name__}"

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return x  # integer indices, masks, empty tensors: nothing to observe
        with torch.no_grad():
            rows = self._rows(x.detach()).float()
            lo, hi = torch.aminmax(rows, dim=1)  # NaN and inf propagate into lo / hi
            if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise CalibrationError(
                    f"{self._label()} saw NaN or inf values (shape {tuple(x.shape)}): check the calibration "
                    "data and the model for NaN/inf (e.g. uninitialised weights, log/div by zero) before calibrating"
                )
            self._observe(rows, lo, hi)
            self.num_batches = self.num_batches + 1  # out of place: buffers may be inference tensors
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)``: 0-dim tensors per-tensor, one value per channel per-channel."""
        if not self.calibrated:
            raise CalibrationError(
                f"{self._label()} saw no data: run fxopt.passes.Calibrate(...) with data that reaches this "
                "layer before lowering"
            )
        with torch.no_grad():
            lo, hi = self._range()
            scale, zero_point = qparams_from_range(self.spec, lo, hi)
            # An all-zero range (a dead ReLU, a pruned channel) holds no scale: any scale keeps 0 exact. The
            # float32-eps floor would make a reader's int32 bias (bias / (s_in * s_w) on qnnpack) overflow, 122
            # steps off (tests/test_properties.py); 1.0 instead, as ONNX Runtime's quantizer does.
            scale = torch.where((lo == 0) & (hi == 0), torch.ones_like(scale), scale)
        shape = self.min_val.shape
        return scale.reshape(shape), zero_point.reshape(shape)

    def extra_repr(self) -> str:
        name = f"name={self.name!r}, " if self.name else ""
        return f"{name}dtype={self.spec.dtype}, qrange={self.spec.qrange}, axis={self.spec.axis}"

    # -- helpers for subclasses ----------------------------------------------------------------

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(channels, values)``; one row for per-tensor specs."""
        if not self.spec.per_channel:
            return x.reshape(1, -1)
        axis = self.spec.axis
        if x.dim() == 0 or not -x.dim() <= axis < x.dim():
            raise CalibrationError(
                f"{self._label()} is per-channel along axis {axis} but got a tensor of shape {tuple(x.shape)}: "
                "use a per-tensor spec (axis=None) for this value"
            )
        channels = x.shape[axis]
        if self.calibrated and self.min_val.numel() != channels:
            raise CalibrationError(
                f"{self._label()} saw {self.min_val.numel()} channels before and now {channels} "
                f"(shape {tuple(x.shape)}): calibration inputs must keep the channel count fixed"
            )
        return x.movedim(axis, 0).reshape(channels, -1)

    def _observe(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Record one batch: ``rows`` is (C, N) float32, ``lo`` / ``hi`` its per-row min / max."""
        if self.calibrated:
            lo, hi = torch.minimum(self._lo(), lo), torch.maximum(self._hi(), hi)
        self._store(lo, hi)

    def _store(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        shape = lo.shape if self.spec.per_channel else ()
        self.min_val, self.max_val = lo.reshape(shape).clone(), hi.reshape(shape).clone()

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lo(), self._hi()

    def _lo(self) -> torch.Tensor:
        return self.min_val.reshape(-1)

    def _hi(self) -> torch.Tensor:
        return self.max_val.reshape(-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Buffers change shape with the data (channels, bins): take the saved shapes before loading.
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buf is not None and isinstance(saved, torch.Tensor) and saved.shape != buf.shape:
                self._buffers[name] = torch.empty_like(saved, dtype=buf.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MinMaxObserver(Observer):
    """Range = running [min, max] of everything seen."""


class MovingAverageObserver(Observer):
    """Range = exponential moving average of each batch's min / max (the first batch is taken as is)."""

    def __init__(self, spec: QSpec, *, averaging_constant: float = 0.01, name: str | None = None):
        super().__init__(spec, name=name)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant

    def _observe(self, rows, lo, hi):
        if self.calibrated:
            c = self.averaging_constant
            lo = self._lo() + c * (lo - self._lo())
            hi = self._hi() + c * (hi - self._hi())
        self._store(lo, hi)


class _HistogramBase(Observer):
    """Keeps one histogram per row over ``[hist_min, hist_max]``, re-binned when data falls outside.

    Memory is ``channels x bins`` whatever the amount of data. Subclasses choose the range from the
    histogram in ``_search`` (rows are processed in chunks to bound the search's memory).
    """

    def __init__(self, spec: QSpec, *, bins: int = 2048, name: str | None = None):
        super().__init__(spec, name=name)
        if bins < 16:
            raise ValueError(f"bins must be >= 16, got {bins}")
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(0, bins, dtype=torch.float64))
        self.register_buffer("hist_min", torch.zeros(0))
        self.register_buffer("hist_max", torch.zeros(0))
        # exact zeros per row (counted where a batch's range ends at 0): they are always on the grid
        self.register_buffer("zeros", torch.zeros(0, dtype=torch.float64))

    def _observe(self, rows, lo, hi):
        first = not self.calibrated
        super()._observe(rows, lo, hi)
        if first:
            pad = torch.where(hi > lo, torch.zeros_like(hi), 1e-6 * hi.abs().clamp(min=1.0))
            self.hist_min, self.hist_max = lo.clone(), hi + pad
            self.histogram = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64, device=rows.device)
            self.zeros = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
        else:
            new_min, new_max = torch.minimum(self.hist_min, lo), torch.maximum(self.hist_max, hi)
            if bool((new_min < self.hist_min).any() or (new_max > self.hist_max).any()):
                log.debug("%s: histogram range grows to [%s, %s]", self._label(), new_min.min(), new_max.max())
                self.histogram = hm.rebin(self.histogram, self.hist_min, self.hist_max, new_min, new_max)
                self.hist_min, self.hist_max = new_min, new_max
        self.histogram = self.histogram + hm.histogram(rows, self.hist_min, self.hist_max, self.bins)
        if bool((lo == 0).any() or (hi == 0).any()):  # ReLU-like rows: exact zeros pile up at one end
            self.zeros = self.zeros + (rows == 0).sum(dim=1).to(torch.float64)

    def _range(self):
        lo, hi = self._lo(), self._hi()
        chosen_lo, chosen_hi = self._choose(lo, hi)
        constant = hi <= lo  # a constant row: nothing to search, keep its value
        return torch.where(constant, lo, chosen_lo), torch.where(constant, hi, chosen_hi)

    def _choose(self, lo, hi):
        left = self.hist_min.double()[:, None]
        width = (self.hist_max.double()[:, None] - left) / self.bins
        return _by_chunks(self._search, self.bins * self._candidates(), self.histogram, left, width, self.zeros, lo, hi)

    def _candidates(self) -> int:
        return 1


class PercentileObserver(_HistogramBase):
    """Range = the ``percentile``-th percentile of each tail (of ``|x|`` for symmetric specs)."""

    def __init__(self, spec: QSpec, *, percentile: float = 99.99, bins: int = 2048, name: str | None = None):
        super().__init__(spec, bins=bins, name=name)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _search(self, hist, left, width, zeros, lo, hi):
        return hm.percentile_range(hist, left, width, lo, hi, self.percentile, self.spec.symmetric)

    def _candidates(self):
        return 2 if self.spec.symmetric else 1


class HistogramObserver(_HistogramBase):
    """Range = argmin over ``[a, b]`` of ``clip_weight`` x clipping error + ``scale²/12`` rounding error on
    the histogram, then widened ``headroom`` times (both ends, about 0): a range fitted on a few calibration
    batches clips the tails of unseen inputs, which reach further than the calibration data did."""

    def __init__(self, spec: QSpec, *, clip_weight: float = 1.0, headroom: float = 1.0, bins: int = 2048,
                 name: str | None = None):
        super().__init__(spec, bins=bins, name=name)
        if clip_weight <= 0:
            raise ValueError(f"clip_weight must be > 0, got {clip_weight}")
        if headroom < 1:
            raise ValueError(f"headroom must be >= 1 (it widens the chosen range), got {headroom}")
        self.clip_weight = clip_weight
        self.headroom = headroom

    def _range(self):
        lo, hi = super()._range()
        return lo * self.headroom, hi * self.headroom

    def _search(self, hist, left, width, zeros, lo, hi):
        return hm.l2_range(hist, left, width, zeros, lo, hi, self.spec, self.clip_weight)

    def _candidates(self):
        return 1 if self.spec.symmetric else 8  # ~9k (i, j) pairs at O(1) each vs bins per row


class MSEObserver(_HistogramBase):
    """Range = argmin over shrink factors of the min / max of the quantize→dequantize MSE.

    While a row has seen at most ``exact_limit`` values (weights: always) the values themselves are
    kept and the MSE is exact; beyond that they are dropped and the MSE is integrated over the
    histogram (values uniform inside each bin), so memory stays bounded. Symmetric specs search shrink
    factors of ``max|x|``; asymmetric ones a joint shrink of (min, max), then each side in turn. Each
    search takes ``num_candidates`` even steps in (0, 1], then 17 finer ones around the best.
    """

    def __init__(self, spec: QSpec, *, num_candidates: int = 40, bins: int = 2048,
                 exact_limit: int = 1 << 14, name: str | None = None):
        super().__init__(spec, bins=bins, name=name)
        if num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2, got {num_candidates}")
        self.num_candidates = num_candidates
        self.exact_limit = exact_limit
        self.register_buffer("values", torch.zeros(0, 0))
        self.register_buffer("exact", torch.tensor(True))

    def _observe(self, rows, lo, hi):
        first = not self.calibrated
        super()._observe(rows, lo, hi)
        kept = 0 if first else self.values.shape[1]
        if bool(self.exact) and kept + rows.shape[1] <= self.exact_limit:
            self.values = rows.clone() if first else torch.cat([self.values, rows], dim=1)
        else:
            if bool(self.exact):
                log.debug("%s: over %d values per row, searching the histogram", self._label(), self.exact_limit)
            self.values, self.exact = rows.new_zeros(0, 0), torch.tensor(False, device=rows.device)

    def _choose(self, lo, hi):
        if not bool(self.exact):
            return super()._choose(lo, hi)

        def search(values, lo, hi):
            return hm.mse_range_on_values(values, lo, hi, self.spec, self.num_candidates)

        return _by_chunks(search, self.values.shape[1] * self._candidates(), self.values, lo, hi)

    def _search(self, hist, left, width, zeros, lo, hi):
        return hm.mse_range(hist, left, width, lo, hi, self.spec, self.num_candidates)

    def _candidates(self):
        return self.num_candidates + 17


def _by_chunks(search, cost_per_row: int, *per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``search(*chunk) -> (lo, hi)`` over chunks of rows, so a search holds at most ~2M elements."""
    chunk = max(1, (1 << 21) // max(1, cost_per_row))
    found = [search(*(t[k : k + chunk] for t in per_row)) for k in range(0, len(per_row[0]), chunk)]
    return torch.cat([f[0] for f in found]).float(), torch.cat([f[1] for f in found]).float()


OBSERVER_KINDS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "histogram": HistogramObserver,
    "mse": MSEObserver,
}


def make_observer(kind: str, spec: QSpec, *, name: str | None = None, **options) -> Observer:
    """A fresh observer of ``kind`` (one of :data:`OBSERVER_KINDS`) for ``spec``; options go to its class."""
    if kind not in OBSERVER_KINDS:
        raise ValueError(f"unknown observer kind {kind!r}; available: {sorted(OBSERVER_KINDS)}")
    return OBSERVER_KINDS[kind](spec, name=name, **options)
