"""Static int8 latency and calibration time, fxopt vs torch.ao FX (reference) vs float, with pytest-benchmark.

    python -m pytest bench/bench_static.py --benchmark-only

Each group holds float / fxopt / torch.ao for one model and batch size (2 threads, x86 engine).
Ratios measured interleaved in one process come from ``python -m bench.static_speed``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.quant_reference import data, engine, fxopt_int8, torchao_int8, zoo_model

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"]


@functools.lru_cache(maxsize=2)
def _built(name: str):
    model = zoo_model(name, 96)
    calib, _ = data(224, n_calib=4, n_test=1, batch=4)
    return {"float": model, "fxopt": fxopt_int8(model, calib, "x86"), "torch.ao": torchao_int8(model, calib, "x86")}


@pytest.fixture(autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    with engine("x86"):
        yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("variant", ["float", "fxopt", "torch.ao"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", MODELS)
def test_latency(benchmark, name, batch, variant):
    benchmark.group = f"{name} batch {batch}"
    module = _built(name)[variant]
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        out = benchmark(module, x)
    assert out.shape == (batch, 1000)


@pytest.mark.parametrize("flow", ["fxopt", "torch.ao"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_calibrate_and_convert(benchmark, name, flow):
    benchmark.group = f"{name} calibrate+convert"
    model = zoo_model(name, 96)
    calib, _ = data(224, n_calib=4, n_test=1, batch=4)
    build = {"fxopt": fxopt_int8, "torch.ao": torchao_int8}[flow]
    benchmark.pedantic(build, args=(model, calib, "x86"), rounds=3, iterations=1)
