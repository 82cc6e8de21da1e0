"""backend="edgetpu": check() lists every op that would leave the EdgeTPU; full-integer export runs in ORT."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt import backends, recipes
from fxopt.errors import UnsupportedError

pytest.importorskip("onnxruntime")
sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the shared models of test_onnx.py
from test_onnx import sqnr, trained_looking  # noqa: E402


class WithIsland(nn.Module):
    """conv → GELU (no EdgeTPU kernel: a float island) → conv → global pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        y = self.c2(nn.functional.gelu(self.c1(x)))
        return self.fc(torch.flatten(self.pool(y), 1))


class Clean(WithIsland):
    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return self.fc(torch.flatten(self.pool(y), 1))


def _prepare(model, shape=(1, 3, 16, 16), backend="edgetpu"):
    torch.manual_seed(0)
    x = torch.randn(shape)
    data = [torch.randn(shape) for _ in range(3)]
    return fxopt.compile(model.eval(), recipes.static_int8(data, backend=backend), example_inputs=(x,)), x


def test_float_island_reported_precisely():
    prepared, _ = _prepare(WithIsland())
    report = backends.get("edgetpu").check(prepared)
    assert not report.ok
    by_node = {i.node: i for i in report.issues}
    assert by_node["gelu"].kind == "unsupported-op" and "gelu" in by_node["gelu"].reason
    re_entry = [i for i in report.issues if i.kind == "float-island" and i.op == "quantize"]
    assert len(re_entry) == 1 and "gelu" in re_entry[0].reason
    assert {i.node for i in report.issues} == {"gelu", re_entry[0].node, by_node["gelu"].node} | {
        i.node for i in report.issues if i.op == "dequantize" and i.kind == "float-island"}
    assert sum(i.op == "dequantize" for i in report.issues) == 1  # only the exit into GELU
    assert "gelu" in str(report)
    with pytest.raises(UnsupportedError, match=r"gelu \(gelu\) \[unsupported-op\]"):
        fxopt.lower(prepared, "edgetpu")


def test_clean_model_passes_and_exports_full_integer():
    prepared, x = _prepare(Clean())
    tpu = backends.get("edgetpu")
    assert tpu.check(prepared).ok
    assert tpu.check(prepared, full_integer=False).kinds() == {"float-io"}
    module = fxopt.lower(prepared, "edgetpu")
    proto = __import__("onnx").load_from_string(module.model_bytes)
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [2]  # UINT8
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [2]
    (s_in, z_in), = module.info["input_qparams"].values()
    (s_out, z_out), = module.info["output_qparams"].values()
    xq = torch.clamp(torch.round(x / s_in) + z_in, 0, 255).to(torch.uint8)
    out = module(xq)
    assert out.dtype == torch.uint8
    qdq = fxopt.lower(prepared, "onnx")  # the same graph with float I/O
    assert sqnr(qdq(x), (out.float() - z_out) * s_out) >= 30


def test_per_channel_linear_and_batch_reported():
    prepared, _ = _prepare(Clean(), shape=(2, 3, 16, 16), backend="x86")
    report = backends.get("edgetpu").check(prepared)
    kinds = {(i.node, i.kind) for i in report.issues}
    assert ("fc", "per-channel") in kinds
    assert any(k == "dynamic-shape" and "batch must be 1" in i.reason for i in report.issues for k in [i.kind])


def test_float_graph_is_not_prepared():
    gm = fxopt.compile(Clean().eval(), recipes.fuse(), example_inputs=(torch.randn(1, 3, 16, 16),))
    assert backends.get("edgetpu").check(gm).kinds() == {"not-prepared"}


def test_mobilenet_v2_passes_check():
    model = trained_looking(torchvision.models.mobilenet_v2(weights=None, num_classes=10))
    prepared, _ = _prepare(model, shape=(1, 3, 64, 64))
    report = backends.get("edgetpu").check(prepared)
    assert report.ok, str(report)
