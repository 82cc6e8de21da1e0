import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fxopt import FxoptError
from fxopt.benchmark import LatencyComparison, Timing, benchmark, benchmark_many


class Sleepy(nn.Module):
    """Sleeps a fixed time per call and records the calls' context."""

    def __init__(self, seconds, log=None, name=""):
        super().__init__()
        self.seconds, self.log, self.name = seconds, log, name
        self.inference = []

    def forward(self, x):
        self.inference.append(torch.is_inference_mode_enabled())
        if self.log is not None:
            self.log.append(self.name)
        time.sleep(self.seconds)
        return x


def test_timings_are_positive_and_consistent():
    timing = benchmark(nn.Linear(16, 16), torch.randn(4, 16), warmup=2, iters=20)
    assert isinstance(timing, Timing)
    assert 0 < timing.min_ms <= timing.median_ms <= timing.p90_ms
    assert timing.batch_size == 4 and timing.iters == 20 and len(timing.samples_ms) == 20
    assert timing.fps == pytest.approx(4 / (timing.median_ms / 1000))
    text = str(timing)
    assert "median" in text and "p90" in text and "fps" in text and "\n" not in text


def test_a_list_of_images_counts_as_a_batch_of_that_many():
    """torchvision detectors take a list of CHW images: fps counts images, not the first image's channels."""
    images = [torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)]
    timing = benchmark(Sleepy(0.0), (images,), warmup=1, iters=2)
    assert timing.batch_size == 2  # was 3 (the first image's channels)
    assert benchmark(Sleepy(0.0), ([torch.zeros(3, 8, 8)],), warmup=1, iters=2).batch_size == 1
    maps = [torch.zeros(4, 8, 16, 16), torch.zeros(4, 8, 8, 8)]  # multi-scale feature maps of a batch of 4
    assert benchmark(Sleepy(0.0), (maps,), warmup=1, iters=2).batch_size == 4


def test_sleep_time_is_measured_under_inference_mode():
    model = Sleepy(0.004)
    timing = benchmark(model, (torch.zeros(2, 3),), warmup=1, iters=5)
    assert 4.0 <= timing.median_ms < 40.0
    assert model.inference == [True] * 6
    assert timing.fps == pytest.approx(2 / (timing.median_ms / 1000))


def test_threads_are_set_and_restored_even_on_error():
    before = torch.get_num_threads()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    timing = benchmark(Probe(), torch.zeros(1), warmup=0, iters=3, threads=1)
    assert timing.threads == 1 and seen == [1, 1, 1]
    assert torch.get_num_threads() == before

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        benchmark(Broken(), torch.zeros(1), threads=1)
    assert torch.get_num_threads() == before


def test_bad_arguments_raise():
    with pytest.raises(FxoptError, match="iters >= 1"):
        benchmark(nn.Identity(), torch.zeros(1), iters=0)
    with pytest.raises(FxoptError, match="positive integer"):
        benchmark(nn.Identity(), torch.zeros(1), threads=0)
    with pytest.raises(FxoptError, match="at least one candidate"):
        benchmark_many({}, torch.zeros(1))
    with pytest.raises(FxoptError, match="baseline 'c'"):
        benchmark_many({"a": nn.Identity()}, torch.zeros(1), baseline="c")


def test_benchmark_many_interleaves_and_reports_speedups():
    log: list[str] = []
    slow, fast = Sleepy(0.006, log, "slow"), Sleepy(0.002, log, "fast")
    result = benchmark_many({"slow": slow, "fast": fast}, torch.zeros(3, 1), rounds=3, iters=2, warmup=1)
    assert isinstance(result, LatencyComparison)
    # warm-up once each, then rounds in rotating order, ``iters`` calls per turn
    assert log == ["slow", "fast"] + ["slow"] * 2 + ["fast"] * 2 + ["fast"] * 2 + ["slow"] * 2 + \
        ["slow"] * 2 + ["fast"] * 2
    assert result.timings["slow"].iters == 6
    assert result.speedup["slow"] == 1.0
    assert 1.0 < result.speedup["fast"] < 4.5  # 6 ms vs 2 ms of sleep, plus scheduling noise
    assert result.timings["fast"].batch_size == 3
    assert "speedup vs slow" in str(result)
    assert [r["name"] for r in result.rows] == ["slow", "fast"]


class SwitchCost(nn.Module):
    """Advances a fake clock: 20 ms on the first call after another module ran, 2 ms otherwise (the cost an
    ONNX Runtime session pays while PyTorch's idle OpenMP workers still spin)."""

    def __init__(self, clock, log, name):
        super().__init__()
        self.clock, self.log, self.name = clock, log, name

    def forward(self, x):
        switched = bool(self.log) and self.log[-1] != self.name
        self.log.append(self.name)
        self.clock[0] += 20_000_000 if switched else 2_000_000
        return x


@pytest.mark.parametrize("lead_in", [0, 1])
def test_benchmark_many_lead_in_keeps_switching_cost_out_of_the_samples(monkeypatch, lead_in):
    clock, log = [0], []
    module = sys.modules[benchmark_many.__module__]  # fxopt.benchmark the module (the package exports a function)
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter_ns=lambda: clock[0]))
    mods = {name: SwitchCost(clock, log, name) for name in ("a", "b", "c")}
    result = benchmark_many(mods, torch.zeros(1), rounds=3, iters=3, warmup=1, lead_in=lead_in)
    # warm-up once each, then per turn: lead_in untimed calls + iters timed ones
    assert len(log) == 3 + 3 * 3 * (lead_in + 3)
    for name in mods:
        samples = result.timings[name].samples_ms
        assert len(samples) == 9
        if lead_in:
            assert list(samples) == [2.0] * 9
        else:  # the first timed call of every turn paid the switch
            assert sorted(samples) == [2.0] * 6 + [20.0] * 3
    with pytest.raises(FxoptError, match="lead_in >= 0"):
        benchmark_many(mods, torch.zeros(1), lead_in=-1)


def test_benchmark_many_shuffle_lets_every_candidate_follow_every_other(monkeypatch):
    clock, log = [0], []
    module = sys.modules[benchmark_many.__module__]
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter_ns=lambda: clock[0]))
    names = ("a", "b", "c", "d")
    mods = {name: SwitchCost(clock, log, name) for name in names}

    def predecessors(shuffle):
        log.clear()
        benchmark_many(mods, torch.zeros(1), rounds=12, iters=1, warmup=1, shuffle=shuffle)
        turns = log[len(names):]  # after the warm-up: one call per turn
        return {n: {prev for prev, cur in zip(turns, turns[1:]) if cur == n and prev != n} for n in names}

    rotated = predecessors(False)
    assert all(len(before) <= 2 for before in rotated.values())  # the rotation keeps the cyclic order
    shuffled = predecessors(True)
    assert all(len(before) == 3 for before in shuffled.values()), shuffled
    assert predecessors(True) == shuffled  # seeded: a rerun times the same order
