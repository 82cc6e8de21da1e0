"""backend="tflite": full-integer .tflite files written from fxopt's calibrated graphs, run in LiteRT (no mocks)."""

from __future__ import annotations

import copy
import pathlib
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxopt
from fxopt import backends, recipes
from fxopt.errors import CalibrationError, UnsupportedError

pytest.importorskip("ai_edge_litert")
from ai_edge_litert import schema_py_generated as schema  # noqa: E402

from fxopt.backends.tflite import TFLiteBackend, TFLiteModule  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the shared helpers of test_onnx.py / test_edgetpu.py
from test_edgetpu import Clean, WithIsland  # noqa: E402
from test_onnx import sqnr, trained_looking  # noqa: E402


class KitchenSink(nn.Module):
    """Every op the writer emits: conv-bn-relu, depthwise, stride-2 conv (explicit PAD), max/avg pool with
    padding, add+relu, mul, cat of differently scaled inputs, hardswish, sigmoid, mean, a flatten of a spatial
    map into a linear layer; outputs: logits, a 4-D map (NHWC -> NCHW) and a flattened spatial map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.down = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.proj = nn.Conv2d(48, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.dw(y) + y)
        y = self.down(y)  # 8x8, no activation: negative values reach the max pool
        z = self.pool(y)  # 4x4
        gate = torch.sigmoid(z.mean((2, 3), keepdim=True))
        w = F.hardswish(self.avg(z)) * gate
        c = torch.cat([w, z], 1)
        p = self.proj(c)
        return self.fc(torch.flatten(p, 1)), p, torch.flatten(z, 1)


def _prepare(model, shape, backend="tflite", n=3, observer="histogram", seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape)
    data = [torch.randn(shape) for _ in range(n)]
    return fxopt.compile(model.eval(), recipes.static_int8(data, backend=backend, observer=observer),
                         example_inputs=(x,)), x


def _ops(module: TFLiteModule) -> dict:
    return module.meta["ops"]


def _model(module: TFLiteModule):
    return schema.ModelT.InitFromPackedBuf(module.model_bytes, 0)


@pytest.fixture(scope="module")
def sink():
    torch.manual_seed(0)
    model = trained_looking(KitchenSink())
    prepared, x = _prepare(model, (1, 3, 16, 16))
    return model, prepared, x


def test_every_op_matches_the_reference_simulation(sink):
    model, prepared, _ = sink
    module = fxopt.lower(prepared, "tflite")
    assert isinstance(module, TFLiteModule) and fxopt.meta.backend_of(module) == "tflite"
    ops = _ops(module)
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "CONCATENATION", "MAX_POOL_2D",
               "AVERAGE_POOL_2D", "MEAN", "HARD_SWISH", "LOGISTIC", "PAD", "RESHAPE", "QUANTIZE", "DEQUANTIZE"):
        assert ops.get(op), (op, ops)
    assert ops["QUANTIZE"] == 1 + 2  # the input, and both cat inputs re-quantized to the output grid
    assert ops["DEQUANTIZE"] == 3 and ops["TRANSPOSE"] == 1  # the flattened map output goes back to NCHW order
    ref = fxopt.lower(prepared, "reference")
    torch.manual_seed(1)
    x = torch.randn(3, 3, 16, 16)  # another batch size than the example: the interpreter is resized
    with torch.no_grad():
        outs, refs, floats = module(x), ref(x), model(x)
    assert [o.shape for o in outs] == [torch.Size([3, 10]), torch.Size([3, 8, 4, 4]), torch.Size([3, 384])]
    for out, r, f in zip(outs, refs, floats):
        assert out.dtype == torch.float32
        assert sqnr(r, out) >= 35, sqnr(r, out)  # the same int8 model, run by TFLite's kernels
        assert sqnr(f, out) >= 25
    # the flatten whose linear layer reads NHWC order (weight columns permuted) gives torch's order
    assert torch.allclose(outs[2].reshape(3, 24, 4, 4).mean((2, 3)), refs[2].reshape(3, 24, 4, 4).mean((2, 3)),
                          atol=0.05)


class Functional(nn.Module):
    """The functional forms: F.conv2d on parameters, F.relu6 (fused, then standalone), F.max_pool2d,
    F.avg_pool2d with padding, tanh, a standalone relu, a cat of two flattened spatial maps (put back in torch
    order), hardtanh(-1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.fc = nn.Linear(2 * 8 * 4 * 4, 6)

    def forward(self, x):
        y = F.relu6(F.conv2d(x, self.weight, self.bias, padding=1))
        y = F.avg_pool2d(F.relu6(F.max_pool2d(y, 2)), 3, stride=2, padding=1)
        z = torch.cat([torch.flatten(torch.relu(torch.tanh(y)), 1), torch.flatten(y, 1)], dim=-1)
        return F.hardtanh(self.fc(z), -1.0, 1.0)


def test_functional_forms_match_the_reference_simulation():
    model = Functional().eval()
    prepared, _ = _prepare(model, (1, 3, 16, 16))
    module = fxopt.lower(prepared, "tflite")
    ops = _ops(module)
    for op in ("CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D", "PAD", "TANH", "TRANSPOSE", "CONCATENATION",
               "RELU", "RELU6", "RELU_N1_TO_1"):
        assert ops.get(op), (op, ops)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 16)
    ref = fxopt.lower(prepared, "reference")
    assert sqnr(ref(x), module(x)) >= 35, sqnr(ref(x), module(x))


def test_fxopt_scales_are_in_the_file(sink):
    _, prepared, _ = sink
    module = fxopt.lower(prepared, "tflite")
    graph = _model(module).subgraphs[0]
    obs = prepared.get_submodule("fxopt_obs_0")  # the input's observer (uint8 grid)
    scale, zp = (float(v) for v in obs.calculate_qparams())
    (s_in, z_in), = module.input_qparams
    assert s_in == pytest.approx(scale, rel=1e-7) and z_in == int(zp) - 128
    int8 = schema.TensorType.INT8
    weights = [t for t in graph.tensors if t.type == int8 and t.buffer > 0 and t.quantization.scale is not None
               and len(t.quantization.scale) > 1]
    assert weights and all(not np.any(t.quantization.zeroPoint) for t in weights)  # symmetric per channel
    biases = [t for t in graph.tensors if t.type == schema.TensorType.INT32 and t.quantization is not None]
    assert len(biases) == 5  # conv1, dw, down, proj, fc: int32, scale = input scale x weight scale


def test_digits_cnn_keeps_accuracy_within_one_point():
    from fxopt.demo import DigitsCNN, accuracy, load_digits_tensors, train

    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors(16, seed=0)
    model = train(DigitsCNN(), xtr, ytr, epochs=6, seed=0)
    float_acc = accuracy(model, xte, yte)
    assert float_acc > 90.0
    calib = [xtr[i: i + 32] for i in range(0, 256, 32)]
    module = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(xte[:1],), backend="tflite")
    assert isinstance(module, TFLiteModule)
    q_acc = accuracy(module, xte, yte)
    assert q_acc >= float_acc - 1.0, f"tflite int8 {q_acc:.2f}% vs float {float_acc:.2f}%"
    assert len(module.model_bytes) <= 0.3 * sum(p.numel() * 4 for p in model.parameters())


@pytest.fixture(scope="module")
def mobilenet():
    model = trained_looking(torchvision.models.mobilenet_v2(weights=None, num_classes=10))
    prepared, x = _prepare(model, (1, 3, 96, 96), n=2)
    return model, prepared, x


def test_mobilenet_v2_full_int8_passes_edgetpu_check(mobilenet):
    model, prepared, _ = mobilenet
    tpu = backends.get("edgetpu")
    full = fxopt.lower(prepared, TFLiteBackend(int8_io=True))
    assert tpu.check(full).ok, str(tpu.check(full))
    graph = _model(full).subgraphs[0]
    assert {graph.tensors[i].type for i in [*graph.inputs, *graph.outputs]} == {schema.TensorType.INT8}
    assert "DEQUANTIZE" not in _ops(full) and "QUANTIZE" not in _ops(full)
    floating = fxopt.lower(prepared, "tflite")
    report = tpu.check(floating)
    assert report.kinds() == {"float-io"} and {i.op for i in report.issues} == {"QUANTIZE", "DEQUANTIZE"}
    assert tpu.check(floating, full_integer=False).ok
    ref = fxopt.lower(prepared, "reference")
    torch.manual_seed(2)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out, r, f = floating(x), ref(x), model(x)
    assert sqnr(r, out) >= 30, sqnr(r, out)
    assert sqnr(f, out) >= 25, sqnr(f, out)
    assert sqnr(out, full(x)) >= 40  # int8 I/O quantized in torch: the same file inside
    # int8 weights, plus int32 biases and the per-channel scales / zero points of weights and biases
    assert len(full.model_bytes) <= 0.32 * sum(p.numel() * 4 for p in model.parameters())


def test_int8_io_module_is_a_drop_in_and_exposes_raw_int8(sink):
    _, prepared, x = sink
    module = fxopt.lower(prepared, TFLiteBackend(int8_io=True))
    assert module.int8_io and len(module.input_qparams) == 1 and len(module.output_qparams) == 3
    details = module.interpreter.get_input_details()
    assert [d["dtype"] for d in details] == [np.int8]
    (s, z), = module.input_qparams
    xq = torch.clamp(torch.round(x / s) + z, -128, 127).to(torch.int8)
    raw = module.run_int8(xq)
    assert [r.dtype for r in raw] == [torch.int8] * 3 and raw[1].shape == (1, 8, 4, 4)
    out = module(x)  # float in, float out: quantized / dequantized at the boundary in torch
    for o, r, (so, zo) in zip(out, raw, module.output_qparams):
        torch.testing.assert_close(o, (r.float() - zo) * so, rtol=1e-6, atol=0)
    assert torch.equal(module(xq)[0], out[0])  # int8 inputs pass through as they are
    floating = fxopt.lower(prepared, "tflite")
    assert sqnr(floating(x)[0], out[0]) >= 35
    with pytest.raises(UnsupportedError, match="int8_io=True"):
        floating.run_int8(xq)


def test_save_load_bit_exact(sink, tmp_path):
    _, prepared, x = sink
    for backend in ("tflite", TFLiteBackend(int8_io=True)):
        module = fxopt.lower(prepared, backend)
        path = tmp_path / "m.tflite"
        fxopt.save(module, path)
        assert path.read_bytes() == module.model_bytes
        back = fxopt.load(path)
        assert isinstance(back, TFLiteModule) and back.int8_io == module.int8_io
        for a, b in zip(back(x), module(x)):
            assert torch.equal(a, b)
        for a, b in zip(copy.deepcopy(module)(x), module(x)):
            assert torch.equal(a, b)
    with pytest.raises(UnsupportedError, match=r"\.tflite path"):
        backends.get("tflite").save(module, tmp_path / "m.onnx")
    (tmp_path / "other.tflite").write_bytes(b"\x00" * 16)
    with pytest.raises(UnsupportedError, match="not a TFLite flatbuffer"):
        fxopt.load(tmp_path / "other.tflite")


def test_threads_and_per_tensor(sink):
    _, prepared, x = sink
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert fxopt.lower(prepared, "tflite").threads == 1
    finally:
        torch.set_num_threads(before)
    assert fxopt.lower(prepared, TFLiteBackend(threads=2)).threads == 2
    per_tensor = fxopt.lower(prepared, TFLiteBackend(per_tensor=True))
    graph = _model(per_tensor).subgraphs[0]
    weights = [t for t in graph.tensors if t.type == schema.TensorType.INT8 and t.buffer > 0]
    assert weights and all(len(t.quantization.scale) == 1 for t in weights)
    assert sqnr(fxopt.lower(prepared, "tflite")(x)[0], per_tensor(x)[0]) >= 15


def test_float_island_and_unsupported_op_errors():
    prepared, _ = _prepare(WithIsland(), (1, 3, 16, 16))
    with pytest.raises(UnsupportedError, match=r"(?s)float.*gelu \(gelu\): runs in float.*fxopt_quant_1 \(quantize\)"):
        fxopt.lower(prepared, "tflite")

    norm, _ = _prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(2), nn.LayerNorm(196)), (1, 3, 16, 16))
    with pytest.raises(UnsupportedError, match=r"(?s)\(layer_norm\): runs in float.*no int8 LayerNorm kernel.*keep "
                                               r"LayerNorm outside the exported model"):
        fxopt.lower(norm, "tflite")
    clean, x = _prepare(Clean(), (1, 3, 16, 16))
    fp = fxopt.compile(Clean().eval(), recipes.fuse(), example_inputs=(x,))
    with pytest.raises(UnsupportedError, match="graph is float"):
        fxopt.lower(fp, "tflite")
    blind = fxopt.compile(Clean().eval(), recipes.fuse() + [fxopt.passes.InsertQuantStubs(backend="tflite"),
                                                            fxopt.passes.PlaceObservers()], example_inputs=(x,))
    with pytest.raises(CalibrationError, match="Calibrate"):
        fxopt.lower(blind, "tflite")


def test_x86_prepared_graph_lowers_close_to_x86_int8():
    model = trained_looking(Clean())
    prepared, x = _prepare(model, (1, 3, 16, 16), backend="x86")
    tfl, x86 = fxopt.lower(prepared, "tflite"), fxopt.lower(prepared, "x86")
    torch.manual_seed(3)
    xs = torch.randn(4, 3, 16, 16)
    assert sqnr(x86(xs), tfl(xs)) >= 30


def test_missing_package_names_the_extra(sink, monkeypatch):
    _, prepared, _ = sink
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    with pytest.raises(UnsupportedError, match=r"pip install 'fxopt\[tflite\]'"):
        fxopt.lower(prepared, "tflite")


class MeanPool(nn.Module):
    def __init__(self, dims=(2, 3)) -> None:
        super().__init__()
        self.conv, self.fc, self.dims = nn.Conv2d(3, 8, 3), nn.Linear(8, 4), dims

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(self.dims))


def test_edgetpu_check_takes_mean_and_tflite_modules():
    prepared, x = _prepare(MeanPool(), (1, 3, 16, 16), backend="edgetpu")
    tpu = backends.get("edgetpu")
    assert tpu.check(prepared).ok, str(tpu.check(prepared))  # Mean (global average) is on the EdgeTPU
    module = fxopt.lower(prepared, TFLiteBackend(int8_io=True))
    assert _ops(module)["MEAN"] == 1 and tpu.check(module).ok
    ref = fxopt.lower(prepared, "reference")
    assert sqnr(ref(x), module(x)) >= 30

    class Channels(MeanPool):
        def forward(self, x):
            return torch.relu(self.conv(x)).mean(1, keepdim=True)

    channels, _ = _prepare(Channels(), (1, 3, 16, 16), backend="edgetpu")
    (issue,) = tpu.check(channels).issues
    assert issue.kind == "unsupported-op" and "only over x/y" in issue.reason
    hs, _ = _prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Hardswish()), (1, 3, 16, 16))
    report = tpu.check(fxopt.lower(hs, TFLiteBackend(int8_io=True)))
    assert [(i.op, i.kind) for i in report.issues] == [("HARD_SWISH", "unsupported-op")]


@pytest.mark.slow
def test_resnet18_full_int8_close_to_x86_int8():
    model = trained_looking(torchvision.models.resnet18(weights=None, num_classes=10))
    prepared, _ = _prepare(model, (1, 3, 96, 96), backend="x86", n=4)
    tfl = fxopt.lower(prepared, TFLiteBackend(int8_io=True))
    assert backends.get("edgetpu").check(tfl).ok
    x86 = fxopt.lower(prepared, "x86")
    torch.manual_seed(4)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert sqnr(x86(x), tfl(x)) >= 30
        assert sqnr(model(x), tfl(x)) >= 25
