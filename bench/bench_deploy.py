"""pytest-benchmark suite for the deployment runtimes (see bench/deploy_speed.py for the interleaved ratios).

    pytest bench/bench_deploy.py --benchmark-only [--benchmark-group-by=param:name]

One benchmark per (model, candidate) at batch 1 on 2 threads; the candidates are deploy_speed's: fp32 eager,
fxopt x86 int8, fxopt onnx int8, ONNX Runtime's quantize_static, fxopt openvino int8, NNCF + OpenVINO.
Each also checks that the int8 candidate's SQNR vs fp32 is above 15 dB (it runs the model it times).
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.deploy_speed import CANDIDATES, candidates_for, prepare, sqnr
from bench.quant_reference import engine

MODELS = ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "efficientnet_b0", "transformer"]
THREADS = 2


@functools.lru_cache(maxsize=1)
def _prepared(name: str):
    return prepare(name, 224, "histogram")


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("name", MODELS)
def test_deploy_latency(benchmark, name, candidate):
    model, test, make, artifacts, float_ir = _prepared(name)
    cands = candidates_for(model, artifacts, float_ir, THREADS)
    if candidate not in cands:
        pytest.skip(f"{candidate} is not available here (nncf not installed?)")
    module = cands[candidate]
    if candidate != "fp32":
        assert sqnr(model, module, test) > 15
    x = make(1)
    torch.set_num_threads(THREADS)
    with torch.inference_mode(), engine("x86"):
        benchmark.pedantic(module, (x,), rounds=20, iterations=1, warmup_rounds=3)
