"""Latency per model x recipe x backend at batch 1 and 8, with SQNR and bytes in the JSON's extra_info.

    python -m pytest bench/bench_latency.py --benchmark-only                    # the table
    python -m pytest bench/bench_latency.py --benchmark-only --benchmark-autosave
    python -m pytest bench/bench_latency.py --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Models: resnet18, mobilenet_v2, mobilenet_v3_large, efficientnet_b0 (224x224, random weights whose BatchNorm
statistics saw data) and a 4-layer transformer encoder (d_model 256, 128 tokens). Recipes and backends are
discovered (bench/zoo.py): recipes landing later show up without a change here. 2 threads.
Each group is one model at one batch size, so pytest-benchmark's table compares the variants side by side.
"""

from __future__ import annotations

import pytest
import torch

from fxopt.errors import UnsupportedError
from bench.zoo import BATCHES, MODELS, built, extra_info, inputs, variant_id, variants

CASES = [(m, r, b) for m in MODELS for r, b in variants(m)]


pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name,recipe,backend", CASES, ids=[f"{m}-{variant_id(r, b)}" for m, r, b in CASES])
def test_latency(benchmark, name, recipe, backend, batch):
    benchmark.group = f"{name} batch {batch}"
    try:
        module = built(name, recipe, backend)
    except UnsupportedError as exc:
        pytest.skip(f"{variant_id(recipe, backend)} cannot be built for {name}: {exc}")
    benchmark.extra_info.update(extra_info(name, recipe, backend), batch=batch)
    x = inputs(name, batch)
    with torch.inference_mode():
        module(x)  # warm-up (first-call packing, allocator)
        out = benchmark(module, x)
    assert out.shape[0] == batch and torch.isfinite(out).all()
