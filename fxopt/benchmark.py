"""``fxopt.benchmark``: wall-clock latency of a module on CPU; ``fxopt.benchmark_many``: several
modules measured interleaved in one process, so that they share the same machine noise.

Both run under ``torch.inference_mode()``. ``threads`` sets ``torch.set_num_threads`` for the
measurement only and restores the previous value afterwards.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.utils._pytree as pytree
from tabulate import tabulate

from .tracing import as_args
from .errors import FxoptError

__all__ = ["Timing", "LatencyComparison", "benchmark", "benchmark_many"]


@dataclass(frozen=True)
class Timing:
    """Latency statistics of one module, in milliseconds per call."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    batch_size: int
    threads: int
    iters: int
    samples_ms: tuple[float, ...] = field(repr=False, default=())

    @property
    def fps(self) -> float:
        """Samples per second: batch size / median seconds."""
        return self.batch_size / (self.median_ms / 1000.0) if self.median_ms > 0 else float("inf")

    def __str__(self) -> str:
        return (f"median {self.median_ms:.3f} ms, p90 {self.p90_ms:.3f} ms, {self.fps:.1f} fps "
                f"(batch {self.batch_size}, {self.threads} threads, {self.iters} iters)")


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _timing(samples_ms: list[float], batch_size: int, threads: int) -> Timing:
    s = sorted(samples_ms)
    return Timing(median_ms=statistics.median(s), p90_ms=_percentile(s, 90.0), mean_ms=statistics.fmean(s),
                  min_ms=s[0], batch_size=batch_size, threads=threads, iters=len(s), samples_ms=tuple(samples_ms))


def _batch_size(args: tuple) -> int:
    """Samples per call: the first tensor's leading dim, or the length of a first argument that is a list of
    CHW images (what torchvision detectors take; a list of batched NCHW maps counts its leading dim)."""
    first = args[0] if args else None
    if isinstance(first, (list, tuple)) and first and all(isinstance(x, torch.Tensor) and x.dim() == 3
                                                          for x in first):
        return len(first)
    for leaf in pytree.tree_leaves(args):
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[0]) if leaf.dim() > 0 else 1
    return 1


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise FxoptError(f"threads must be a positive integer or None, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _check_counts(warmup: int, iters: int) -> None:
    if iters < 1 or warmup < 0:
        raise FxoptError(f"benchmark needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")


def _time_calls(module: Any, args: tuple, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        module(*args)
        out.append((time.perf_counter_ns() - start) / 1e6)
    return out


def benchmark(module: torch.nn.Module, example_inputs: Any, *, warmup: int = 10, iters: int = 50,
              threads: int | None = None) -> Timing:
    """Time ``iters`` calls of ``module(*example_inputs)`` after ``warmup`` untimed calls."""
    _check_counts(warmup, iters)
    args = as_args(example_inputs)
    with _num_threads(threads) as n_threads, torch.inference_mode():
        _time_calls(module, args, warmup)
        samples = _time_calls(module, args, iters)
    return _timing(samples, _batch_size(args), n_threads)


@dataclass(frozen=True)
class LatencyComparison:
    """Timings of several modules measured interleaved; ``speedup[name]`` = baseline median / its median."""

    timings: dict[str, Timing]
    baseline: str

    @property
    def speedup(self) -> dict[str, float]:
        base = self.timings[self.baseline].median_ms
        return {name: base / t.median_ms for name, t in self.timings.items()}

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [{"name": name, "median_ms": t.median_ms, "p90_ms": t.p90_ms, "fps": t.fps,
                 "speedup": self.speedup[name]} for name, t in self.timings.items()]

    def __str__(self) -> str:
        table = [[r["name"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['fps']:.1f}",
                  f"{r['speedup']:.2f}x"] for r in self.rows]
        return tabulate(table, headers=["name", "median ms", "p90 ms", "fps", f"speedup vs {self.baseline}"],
                        disable_numparse=True)


def benchmark_many(candidates: Mapping[str, torch.nn.Module], example_inputs: Any, *, rounds: int = 5,
                   iters: int = 10, warmup: int = 5, threads: int | None = None,
                   baseline: str | None = None, lead_in: int = 0, shuffle: bool = False) -> LatencyComparison:
    """Time several modules on the same inputs, interleaved: ``rounds`` rounds of ``iters`` calls each,
    the order of the candidates rotating every round. ``baseline`` (default: the first) sets the speedups.

    ``lead_in``: untimed calls at the start of every candidate's turn. The rotation keeps the cyclic order,
    so a candidate always follows the same neighbour; when that neighbour runs another runtime whose idle
    threads still spin (PyTorch's OpenMP workers do, for a few ms after each parallel region), the first
    call of the turn shares the cores with them. One lead-in call takes that switching cost out of every
    candidate's samples (an ONNX Runtime session at 2 threads on 2 cores ran 3x slower on its first call
    after a PyTorch call).

    ``shuffle``: a new random order every round (seeded, so reruns repeat it) instead of the rotation, so
    every candidate follows every other about equally often. Lead-in calls absorb the first call's cost but
    not all of it: two ONNX Runtime sessions timed alternately measured 9 % apart one way round and 5 % the
    other way round, so comparisons of two candidates of the same runtime should shuffle.
    """
    if not candidates:
        raise FxoptError("benchmark_many needs at least one candidate: {'name': module, ...}")
    _check_counts(warmup, iters)
    if rounds < 1:
        raise FxoptError(f"benchmark_many needs rounds >= 1, got {rounds}")
    if lead_in < 0:
        raise FxoptError(f"benchmark_many needs lead_in >= 0, got {lead_in}")
    names = list(candidates)
    baseline = names[0] if baseline is None else baseline
    if baseline not in candidates:
        raise FxoptError(f"baseline {baseline!r} is not one of the candidates {names}")
    args = as_args(example_inputs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with _num_threads(threads) as n_threads, torch.inference_mode():
        for name in names:
            _time_calls(candidates[name], args, warmup)
        rng = random.Random(0)
        for r in range(rounds):
            shift = r % len(names)
            order = rng.sample(names, len(names)) if shuffle else names[shift:] + names[:shift]
            for name in order:
                _time_calls(candidates[name], args, lead_in)
                samples[name].extend(_time_calls(candidates[name], args, iters))
    batch = _batch_size(args)
    return LatencyComparison({n: _timing(s, batch, n_threads) for n, s in samples.items()}, baseline)
