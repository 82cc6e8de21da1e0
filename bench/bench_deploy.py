"""pytest-benchmark suite for the deployment runtimes (see bench/deploy_speed.py for the interleaved ratios).

    pytest bench/bench_deploy.py --benchmark-only [--benchmark-group-by=param:name]

One benchmark per (model, candidate) at batch 1 on 2 threads; the candidates are deploy_speed's: fp32 eager,
fxopt x86 int8, fxopt onnx int8, ONNX Runtime's quantize_static, fxopt openvino int8, NNCF + OpenVINO.
Each int8 candidate is also checked against fp32 (SQNR above 15 dB on the model it times).
``test_onnx_int8_pair`` is issue 8's ONNX parity pair on its own: fxopt's onnx int8 and ORT's quantize_static in
one pytest-benchmark group per model (``--benchmark-group-by=group`` puts them side by side), fxopt's SQNR vs fp32
no worse than ORT's. ``FXOPT_BENCH_SMOKE=1`` keeps resnet18 and the encoder at 64 px with 2 calibration batches.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.zoo import SMOKE
from bench.deploy_speed import CANDIDATES, MODELS, candidates_for, prepare, sqnr
from bench.quant_reference import engine

NAMES = ["resnet18", "transformer"] if SMOKE else MODELS
SIZE = 64 if SMOKE else 224
THREADS = 2


@functools.lru_cache(maxsize=1)
def _prepared(name: str):
    return prepare(name, SIZE, "histogram", n_calib=2 if SMOKE else 8)


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("name", NAMES)
def test_deploy_latency(benchmark, name, candidate):
    model, test, make, artifacts, float_ir = _prepared(name)
    cands = candidates_for(model, artifacts, float_ir, THREADS)
    if candidate not in cands:
        pytest.skip(f"{candidate} is not available here (nncf not installed?)")
    module = cands[candidate]
    if candidate != "fp32":
        assert sqnr(model, module, test) > 15
    x = make(1)
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.inference_mode(), engine("x86"):
            benchmark.pedantic(module, (x,), rounds=3 if SMOKE else 20, iterations=1, warmup_rounds=1 if SMOKE else 3)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("candidate", ["fxopt onnx", "ort quant"])
@pytest.mark.parametrize("name", NAMES)
def test_onnx_int8_pair(benchmark, name, candidate):
    model, test, make, artifacts, float_ir = _prepared(name)
    cands = candidates_for(model, artifacts, float_ir, THREADS)
    fx, theirs = sqnr(model, cands["fxopt onnx"], test), sqnr(model, cands["ort quant"], test)
    assert fx >= theirs, f"fxopt onnx int8 {fx:.1f} dB vs fp32, ORT quantize_static {theirs:.1f} dB"
    benchmark.group = f"onnx int8 {name} b1 x{THREADS}"
    benchmark.extra_info["sqnr_db"] = round(fx if candidate == "fxopt onnx" else theirs, 2)
    x = make(1)
    with torch.inference_mode():
        benchmark.pedantic(cands[candidate], (x,), rounds=3 if SMOKE else 30, iterations=1,
                           warmup_rounds=1 if SMOKE else 5)
