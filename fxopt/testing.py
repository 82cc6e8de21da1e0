"""Latency and accuracy regression tests for your own models, on top of pytest-benchmark.

Three lines in a test file::

    from fxopt.testing import check_latency

    def test_int8_latency(benchmark):
        check_latency(benchmark, fxopt.compile(model, recipes.static_int8(data), backend="x86"), (x,),
                      baseline=model, min_sqnr=20)

Save a baseline once and fail later runs that got slower::

    pytest tests/test_latency.py --benchmark-autosave
    pytest tests/test_latency.py --benchmark-compare --benchmark-compare-fail=median:10%

``check_latency`` times ``module(*example_inputs)`` under ``torch.inference_mode()`` with pytest-benchmark
(so ``--benchmark-compare-fail`` guards it), and stores in the JSON's ``extra_info``: the module's stored
bytes, and, with a ``baseline``, the SQNR and top-1 agreement vs the baseline's outputs and the
speed-up measured interleaved with the baseline in the same process. ``min_sqnr`` / ``min_speedup``
turn those into assertions (speed-ups are ratios of interleaved medians, so they hold on a noisy machine
far better than absolute times; still, keep thresholds well below what you measure).

The ``fxopt_latency`` fixture is the same function with the ``benchmark`` fixture bound; enable it with
``pytest_plugins = ["fxopt.testing"]`` in your ``conftest.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from .benchmark import _num_threads, benchmark_many
from .compare import compare
from .report import report
from .tracing import as_args

__all__ = ["check_latency", "fxopt_latency"]


def check_latency(benchmark: Any, module: torch.nn.Module, example_inputs: Any, *,
                  baseline: torch.nn.Module | None = None, min_sqnr: float | None = None,
                  min_speedup: float | None = None, threads: int | None = None, rounds: int = 5,
                  iters: int = 10) -> dict[str, Any]:
    """Benchmark ``module`` with pytest-benchmark's ``benchmark`` fixture; record and check extra info.

    Returns the ``extra_info`` dict (``bytes``, and with ``baseline``: ``sqnr_db``, ``top1``, ``speedup``).
    Under ``--benchmark-disable`` the module runs once and the interleaved speed-up is not measured
    (``min_speedup`` is then not checked).
    """
    if min_speedup is not None and baseline is None:
        raise ValueError("check_latency(min_speedup=...) needs baseline=<the model to be faster than>")
    if min_sqnr is not None and baseline is None:
        raise ValueError("check_latency(min_sqnr=...) needs baseline=<the reference model>")
    args = as_args(example_inputs)
    info: dict[str, Any] = {"bytes": report(module).total_bytes}
    if baseline is not None:
        cmp = compare(baseline, module, args)
        info["sqnr_db"] = cmp.sqnr_db
        info["top1"] = cmp.top1_agreement
        info["baseline_bytes"] = report(baseline).total_bytes
    disabled = bool(getattr(benchmark, "disabled", False))
    if baseline is not None and not disabled:
        timing = benchmark_many({"baseline": baseline, "module": module}, args, rounds=rounds, iters=iters,
                                warmup=3, threads=threads)
        info["speedup"] = timing.speedup["module"]
    with _num_threads(threads) as n, torch.inference_mode():
        info["threads"] = n
        benchmark.extra_info.update(info)
        benchmark(module, *args)
    if min_sqnr is not None:
        assert info["sqnr_db"] >= min_sqnr, (
            f"SQNR vs baseline is {info['sqnr_db']:.2f} dB, below min_sqnr={min_sqnr} dB")
    if min_speedup is not None and "speedup" in info:
        assert info["speedup"] >= min_speedup, (
            f"speed-up vs baseline is {info['speedup']:.2f}x (interleaved medians), below min_speedup={min_speedup}x")
    return info


try:  # the fixture, for users who load this module as a pytest plugin
    import pytest

    @pytest.fixture
    def fxopt_latency(benchmark):
        """``fxopt_latency(module, example_inputs, baseline=..., min_sqnr=..., min_speedup=...)``."""

        def run(module: torch.nn.Module, example_inputs: Any, **kwargs: Any) -> dict[str, Any]:
            return check_latency(benchmark, module, example_inputs, **kwargs)

        return run
except ImportError:  # pragma: no cover - pytest is only needed to use the fixture
    fxopt_latency = None  # type: ignore[assignment]
