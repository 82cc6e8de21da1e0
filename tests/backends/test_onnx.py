"""backend="onnx": real exports checked with onnx.checker and run in ONNX Runtime (no mocks)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt import recipes
from fxopt.errors import CalibrationError, UnsupportedError
from fxopt.graph_utils import is_observer
from tests.helpers import SmallEncoder

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from fxopt.backends.onnx import OnnxBackend, OnnxModule  # noqa: E402


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().float(), out.detach().float()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-30)))


class SmallNet(nn.Module):
    """conv-bn-relu, residual add+relu, max-pool, hardswish, sigmoid gate, global pool, linear; two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.act = nn.Hardswish()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)
        self.aux = nn.Linear(32, 3)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.conv2(y) + y)
        y = self.act(self.conv3(self.pool(y)))
        z = torch.flatten(self.gap(y), 1)
        return {"logits": self.fc(z), "aux": torch.sigmoid(self.aux(z))}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = SmallNet().eval()
    with torch.no_grad():  # a trained-looking BatchNorm
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    data = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    return model, x, data


def _model(module: OnnxModule):
    return onnx.load_from_string(module.model_bytes)


def _ops(module: OnnxModule) -> list[str]:
    return [n.op_type for n in _model(module).graph.node]


def test_float_export_matches_and_any_batch(small):
    model, x, _ = small
    out = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="onnx")
    assert isinstance(out, OnnxModule) and out.kind == "float"
    onnx.checker.check_model(_model(out), full_check=True)
    assert _model(out).opset_import[0].version >= 13
    for batch in (1, 2, 5):
        xb = torch.randn(batch, 3, 32, 32)
        got, ref = out(xb), model(xb)
        assert set(got) == {"logits", "aux"}  # same output structure
        for key in ref:
            assert got[key].shape == ref[key].shape
            torch.testing.assert_close(got[key], ref[key], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out(x=x)["logits"], model(x)["logits"], atol=1e-4, rtol=1e-4)  # keyword call
    with pytest.raises(TypeError, match="unexpected keyword"):
        out(y=x)
    assert fxopt.meta.backend_of(out) == "onnx"


def test_static_int8_is_qdq_with_fxopt_scales(small):
    model, x, data = small
    prepared = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,))
    lowered = fxopt.lower(prepared, "onnx")
    x86 = fxopt.lower(prepared, "x86")
    proto = _model(lowered)
    onnx.checker.check_model(proto, full_check=True)
    ops = _ops(lowered)
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:  # weight: per-channel int8 initializer behind a DQ; bias: int32 behind a DQ
        dq_w = producers[conv.input[1]]
        assert dq_w.op_type == "DequantizeLinear" and inits[dq_w.input[0]].dtype == np.int8
        assert inits[dq_w.input[1]].shape == (inits[dq_w.input[0]].shape[0],)
        assert inits[producers[conv.input[2]].input[0]].dtype == np.int32
    # the input's QuantizeLinear carries the observer's calibrated scale / zero point (no re-calibration)
    first_q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    consts.update(inits)
    obs = next(m for m in prepared.modules() if is_observer(m) and "x" in m.name.split("after ")[1])
    scale, zp = obs.calculate_qparams()
    assert float(consts[first_q.input[1]]) == pytest.approx(float(scale), rel=1e-6)
    assert int(consts[first_q.input[2]]) == int(zp) and consts[first_q.input[2]].dtype == np.uint8
    got, ref = lowered(x), x86(x)
    for key in ref:
        assert sqnr(ref[key], got[key]) >= 30
    assert sqnr(model(x)["logits"], got["logits"]) >= 20
    assert lowered(torch.randn(3, 3, 32, 32))["logits"].shape == (3, 10)


def test_static_int8_recipe_for_onnx_and_relu_qdq_after_activation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    out = fxopt.compile(model, recipes.static_int8([x], backend="onnx"), example_inputs=(x,), backend="onnx")
    proto = _model(out)
    producers = {o: n for n in proto.graph.node for o in n.output}
    # each activation is followed by a QuantizeLinear whose zero point is 0: the range starts at 0
    for node in proto.graph.node:
        if node.op_type in ("Relu", "Clip"):
            users = [n for n in proto.graph.node if node.output[0] in n.input]
            assert [u.op_type for u in users] == ["QuantizeLinear"]
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in proto.graph.node if n.op_type == "Conv")
    # the model output is written in float by the last int8 conv: no 8-bit rounding of the result
    assert producers[proto.graph.output[0].name].op_type == "Conv"
    assert sqnr(model(x), out(x)) >= 25


def test_fp16_export_has_half_weights(small):
    model, x, _ = small
    f32 = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="onnx")
    fp16_torch = fxopt.compile(model, recipes.fp16(), example_inputs=(x,))
    out = fxopt.compile(model, recipes.fp16(), example_inputs=(x,), backend="onnx")
    assert out.kind == "fp16"
    dtypes = [i.data_type for i in _model(out).graph.initializer if len(i.dims) > 1]
    assert dtypes and all(d == onnx.TensorProto.FLOAT16 for d in dtypes)
    assert len(out.model_bytes) < 0.6 * len(f32.model_bytes)
    for key in ("logits", "aux"):
        torch.testing.assert_close(out(x)[key], fp16_torch(x)[key], atol=1e-4, rtol=1e-4)


def test_dynamic_int8_uses_matmulinteger():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    torch_dyn = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=(x,))
    out = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=(x,), backend="onnx")
    ops = _ops(out)
    assert out.kind == "dynamic-int8" and ops.count("MatMulInteger") == 2 and "DynamicQuantizeLinear" in ops
    weights = [i for i in _model(out).graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(weights) == 2
    assert sqnr(torch_dyn(x), out(x)) >= 30
    assert out(torch.randn(7, 32)).shape == (7, 8)


def test_threads_follow_torch_or_backend_option(small):
    model, x, _ = small
    torch.set_num_threads(1)
    default = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="onnx")
    assert default.threads == 1
    two = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend=OnnxBackend(threads=2))
    assert two.threads == 2
    assert two.session.get_session_options().intra_op_num_threads == 2
    torch.testing.assert_close(two(x)["logits"], default(x)["logits"], atol=1e-5, rtol=1e-5)


def test_save_load_bit_exact(small, tmp_path):
    model, x, data = small
    out = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,), backend="onnx")
    path = tmp_path / "m.onnx"
    fxopt.save(out, path)
    assert path.read_bytes() == out.model_bytes
    onnx.checker.check_model(str(path))
    back = fxopt.load(path)
    assert isinstance(back, OnnxModule) and back.kind == "int8-qdq"
    for key in ("logits", "aux"):
        assert torch.equal(back(x)[key], out(x)[key])
    copied = __import__("copy").deepcopy(out)
    assert torch.equal(copied(x)["logits"], out(x)["logits"])


def test_bad_input_errors(small, monkeypatch):
    model, x, data = small
    prepared = fxopt.compile(model, recipes.fuse() + [fxopt.passes.InsertQuantStubs(), fxopt.passes.PlaceObservers()],
                             example_inputs=(x,))
    with pytest.raises(CalibrationError, match="Calibrate"):
        fxopt.lower(prepared, "onnx")
    with pytest.raises(UnsupportedError, match="example_inputs"):
        fxopt.compile(model, recipes.fuse(), backend="onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UnsupportedError, match=r"pip install 'fxopt\[onnx\]'"):
        fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="onnx")


class _ListOfImages(nn.Module):
    """Takes a list of CHW images, as torchvision detectors do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, images):
        return self.conv(torch.stack(images)).relu()


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_a_list_input_says_the_export_takes_tensors(backend):
    """Before: "input 'images' has none recorded: compile the model with example_inputs", though it was."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    images = [torch.randn(3, 16, 16), torch.randn(3, 16, 16)]
    with pytest.raises(UnsupportedError, match=r"input 'images' is a list \(2 items.*backend='x86'"):
        fxopt.compile(_ListOfImages(), recipes.fuse(), example_inputs=(images,), backend=backend)


def test_transformer_encoder_float_and_dynamic():
    torch.manual_seed(0)
    model = SmallEncoder().eval()
    x = torch.randn(2, 12, 16)
    f = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="onnx")
    with torch.no_grad():
        torch.testing.assert_close(f(x), model(x), atol=1e-4, rtol=1e-4)
        assert f(torch.randn(3, 12, 16)).shape == (3, 5)
        dyn = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=(x,), backend="onnx")
        assert sqnr(model(x), dyn(x)) >= 25


def trained_looking(model: nn.Module) -> nn.Module:
    """torchvision's init zeroes some BN gammas and leaves unit statistics: give every BN plausible values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


ZOO = ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_float_int8_fp16(name):
    torch.manual_seed(0)
    model = trained_looking(getattr(torchvision.models, name)(weights=None, num_classes=10))
    x = torch.randn(2, 3, 96, 96)
    data = [torch.randn(2, 3, 96, 96) for _ in range(4)]
    with torch.no_grad():
        ref = model(x)
        f = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="onnx")
        torch.testing.assert_close(f(x), ref, atol=1e-4, rtol=1e-4)
        prepared = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,))
        q = fxopt.lower(prepared, "onnx")
        assert sqnr(fxopt.lower(prepared, "x86")(x), q(x)) >= 30
        h = fxopt.compile(model, recipes.fp16(), example_inputs=(x,), backend="onnx")
        assert sqnr(ref, h(x)) >= 40


@pytest.mark.slow
def test_transformer_encoder_static_int8():
    torch.manual_seed(0)
    model = SmallEncoder(width=96).eval()
    x = torch.randn(2, 12, 16)
    data = [torch.randn(2, 12, 16) for _ in range(4)]
    with torch.no_grad():
        prepared = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,))
        q = fxopt.lower(prepared, "onnx")
        assert sqnr(fxopt.lower(prepared, "x86")(x), q(x)) >= 30
        h = fxopt.compile(model, recipes.fp16(), example_inputs=(x,), backend="onnx")
        assert sqnr(model(x), h(x)) >= 40
