"""Compile-time benchmarks: how long fxopt takes to optimize a model (trace + passes + calibration + lowering).

    python -m pytest bench/bench_compile.py --benchmark-only

One group per stage; each benchmark's extra_info holds the result's bytes and SQNR vs float. The static int8
cases run on every available backend that can lower them (bench/zoo.py discovers them).
"""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import recipes
from fxopt.errors import UnsupportedError
from bench.zoo import CNNS, SMOKE, build, extra_info, inputs, lowering_backends, model, variant_id

ROUNDS = 1 if SMOKE else 3


pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.mark.parametrize("name", CNNS + ["encoder"])
def test_trace(benchmark, name):
    benchmark.group = "trace"
    m, x = model(name), inputs(name, 1)
    gm = benchmark.pedantic(fxopt.trace, args=(m, (x,)), rounds=ROUNDS, iterations=1)
    assert not fxopt.untraced(gm) or name == "encoder"


@pytest.mark.parametrize("name", CNNS)
def test_fuse(benchmark, name):
    benchmark.group = "trace + fuse"
    m, x = model(name), inputs(name, 1)
    out = benchmark.pedantic(fxopt.compile, args=(m, recipes.fuse()), kwargs={"example_inputs": (x,)},
                             rounds=ROUNDS, iterations=1)
    with torch.no_grad():
        torch.testing.assert_close(out(x), m(x), rtol=1e-3, atol=1e-3)


CASES = [(n, "static_int8", b) for n in CNNS for b in lowering_backends()] + [("encoder", "dynamic_int8", None)]


@pytest.mark.parametrize("name,recipe,backend", CASES, ids=[f"{n}-{variant_id(r, b)}" for n, r, b in CASES])
def test_optimize(benchmark, name, recipe, backend):
    """The whole job: trace, passes, calibration (2-4 batches of 4) and lowering."""
    benchmark.group = "trace + passes + calibration + lowering"
    try:
        out = benchmark.pedantic(build, args=(name, recipe, backend), rounds=ROUNDS, iterations=1)
    except UnsupportedError as exc:
        pytest.skip(f"{variant_id(recipe, backend)} cannot be built for {name}: {exc}")
    benchmark.extra_info.update(extra_info(name, recipe, backend))
    with torch.no_grad():
        assert out(inputs(name, 2)).shape[0] == 2
