"""Compile-time benchmarks: tracing and the float clean-up passes on real architectures.

Run: ``pytest bench/bench_compile.py --benchmark-only``
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxopt
from fxopt import recipes

MODELS = ["resnet50", "mobilenet_v2"]


def _model(name):
    return torchvision.models.get_model(name, weights=None).eval()


@pytest.mark.parametrize("name", MODELS)
def test_trace(benchmark, name):
    model = _model(name)
    x = torch.randn(1, 3, 224, 224)
    gm = benchmark(fxopt.trace, model, (x,))
    assert not fxopt.untraced(gm)


@pytest.mark.parametrize("name", MODELS)
def test_trace_and_cleanup(benchmark, name):
    model = _model(name)
    x = torch.randn(1, 3, 224, 224)
    out = benchmark(fxopt.compile, model, recipes.fuse(), example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-3, atol=1e-3)
