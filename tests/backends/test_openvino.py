"""backend="openvino": IR written, compiled and run by the real OpenVINO CPU plugin (no mocks)."""

from __future__ import annotations

import copy
import pathlib
import sys
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision

import fxopt
from fxopt import recipes
from fxopt.errors import UnsupportedError

pytest.importorskip("openvino")
pytest.importorskip("onnx")

from fxopt.backends.openvino import OpenVinoBackend, OpenVinoModule  # noqa: E402
sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the shared models of test_onnx.py
from test_onnx import SmallNet, sqnr, trained_looking  # noqa: E402

from tests.helpers import SmallEncoder  # noqa: E402


def runtime_ops(module: OpenVinoModule) -> Counter:
    """(layer type, runtime precision) of every op the CPU plugin actually executes."""
    rt = module.compiled.get_runtime_model()
    return Counter((op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                   for op in rt.get_ops())


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(2, 3, 32, 32)
    data = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    return model, x, data


def test_fp16_ir_by_default_half_size(small):
    model, x, _ = small
    fp16 = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="openvino")
    fp32 = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend=OpenVinoBackend(compress_to_fp16=False))
    assert isinstance(fp16, OpenVinoModule)
    assert 0.4 < len(fp16.weights) / len(fp32.weights) < 0.6
    consts = [layer.find("data") for layer in ET.fromstring(fp16.xml).iter("layer") if layer.get("type") == "Const"]
    assert any(c.get("element_type") == "f16" for c in consts)
    ref = model(x)
    for key in ref:
        assert sqnr(ref[key], fp16(x)[key]) >= 40
        torch.testing.assert_close(fp32(x)[key], ref[key], atol=1e-4, rtol=1e-4)
    assert fp16(torch.randn(5, 3, 32, 32))["logits"].shape == (5, 10)  # dynamic batch


def test_static_shapes_on_request(small):
    model, x, _ = small
    out = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend=OpenVinoBackend(static_shapes=True))
    dims = [d.text for layer in ET.fromstring(out.xml).iter("layer") if layer.get("type") == "Parameter"
            for d in layer.iter("dim")]
    assert dims == ["2", "3", "32", "32"]
    assert out(x)["logits"].shape == (2, 10)


def test_static_int8_runs_int8_kernels(small):
    model, x, data = small
    prepared = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,))
    q = fxopt.lower(prepared, "openvino")
    x86 = fxopt.lower(prepared, "x86")
    ops = runtime_ops(q)
    assert ops[("Convolution", "u8")] == 3 and ops[("FullyConnected", "u8")] == 2
    assert ops[("Const", "i8")] >= 5  # int8 weights in the IR
    for key in ("logits", "aux"):
        assert sqnr(x86(x)[key], q(x)[key]) >= 30


def test_threads_and_save_load_bit_exact(small, tmp_path):
    model, x, data = small
    torch.set_num_threads(1)
    out = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,), backend=OpenVinoBackend(threads=2))
    assert out.threads == 2 and out.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="openvino").threads == 1
    path = tmp_path / "m.xml"
    fxopt.save(out, path)
    assert path.with_suffix(".bin").read_bytes() == out.weights
    back = fxopt.load(path)
    assert isinstance(back, OpenVinoModule)
    for key in ("logits", "aux"):
        assert torch.equal(back(x)[key], out(x)[key])
    assert torch.equal(copy.deepcopy(out)(x)["logits"], out(x)["logits"])


def test_missing_openvino_says_how_to_install(small, monkeypatch):
    model, x, _ = small
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(UnsupportedError, match=r"pip install 'fxopt\[openvino\]'"):
        fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="openvino")


def test_transformer_encoder_fp16_ir():
    torch.manual_seed(0)
    model = SmallEncoder().eval()
    x = torch.randn(2, 12, 16)
    out = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="openvino")
    with torch.no_grad():
        assert sqnr(model(x), out(x)) >= 40
        assert out(torch.randn(3, 12, 16)).shape == (3, 5)


class MBConv(torch.nn.Module):
    """EfficientNet's block: expand conv-BN-SiLU, depthwise conv-BN-SiLU, squeeze-excitation (pool, conv, SiLU,
    conv, sigmoid, mul), project conv-BN, residual add; a pooled linear head."""

    def __init__(self, c: int = 16, e: int = 4) -> None:
        super().__init__()
        bn = torch.nn.BatchNorm2d
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), bn(c), torch.nn.SiLU())
        self.expand = torch.nn.Sequential(torch.nn.Conv2d(c, c * e, 1), bn(c * e), torch.nn.SiLU())
        self.dw = torch.nn.Sequential(torch.nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e), bn(c * e),
                                      torch.nn.SiLU())
        self.se = torchvision.ops.SqueezeExcitation(c * e, c // 4, activation=torch.nn.SiLU)
        self.project = torch.nn.Sequential(torch.nn.Conv2d(c * e, c, 1), bn(c))
        self.fc = torch.nn.Linear(c, 10)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.project(self.se(self.dw(self.expand(h))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))


def _activations_after_conv(module: OpenVinoModule) -> list:
    """The Swish / Sigmoid ops of the IR (as read, before the CPU plugin's transformations) that read a conv."""
    import openvino as ov  # noqa: PLC0415

    model = ov.Core().read_model(module.xml.decode(), ov.Tensor(np.frombuffer(module.weights, np.uint8)))
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Swish", "Sigmoid"):
            src = op.input_value(0).get_node()
            if src.get_type_name() == "Add":  # the conv's bias
                src = src.input_value(0).get_node()
            out.append((op, src))
    return out


@pytest.fixture(scope="module")
def mbconv():
    torch.manual_seed(0)
    model = trained_looking(MBConv())
    x = torch.randn(2, 3, 24, 24)
    data = [torch.randn(2, 3, 24, 24) for _ in range(4)]
    with torch.no_grad():
        prepared = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,))
    return model, x, prepared


def test_activation_after_conv_is_a_post_op_without_fake_quantize(mbconv):
    """conv → SiLU / sigmoid: one quantization, after the activation (NNCF's placement), so the CPU plugin runs
    conv + activation + requantization as one u8 kernel; a FakeQuantize in between was a second requantization
    post-op in every such kernel."""
    model, x, prepared = mbconv
    q = fxopt.lower(prepared, "openvino")
    pairs = _activations_after_conv(q)
    kinds = Counter(op.get_type_name() for op, _ in pairs)
    assert kinds == {"Swish": 4, "Sigmoid": 1}, kinds  # stem, expand, dw, SE reduce; the SE gate
    for op, src in pairs:
        assert src.get_type_name() in ("Convolution", "GroupConvolution"), (op.get_friendly_name(), src.get_type_name())
    # in the compiled model each activation is inside a u8 convolution (no float Swish / Sigmoid layer of its own)
    runtime = q.compiled.get_runtime_model().get_ops()
    for op, _ in pairs:
        host = [r for r in runtime if op.get_friendly_name() in
                r.get_rt_info()["originalLayersNames"].astype(str).split(",")]
        assert len(host) == 1, op.get_friendly_name()
        info = host[0].get_rt_info()
        assert (info["layerType"].astype(str), info["runtimePrecision"].astype(str)) == ("Convolution", "u8")
    ops = runtime_ops(q)
    assert ops[("Convolution", "u8")] == 6 and ops[("Eltwise", "u8")] >= 1  # the SE multiply runs in u8 too
    # the ONNX Runtime export is not affected: its conv outputs keep their QDQ before the sigmoid
    from fxopt.backends.onnx import export_onnx  # noqa: PLC0415

    graph = export_onnx(prepared)[0].graph
    producer = {o: n for n in graph.node for o in n.output}
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" for n in graph.node if n.op_type == "Sigmoid")


def test_activation_post_op_numerics(mbconv, tmp_path):
    """Without the rounding between conv and activation the IR is the x86 lowering's arithmetic (it fuses conv +
    SiLU too) and at least as close to float as the export that kept it (the onnx target's QDQ, run by OpenVINO)."""
    import openvino as ov  # noqa: PLC0415
    from fxopt.backends.onnx import export_onnx  # noqa: PLC0415

    model, x, prepared = mbconv
    q = fxopt.lower(prepared, "openvino")
    x86 = fxopt.lower(prepared, "x86")
    (tmp_path / "kept.onnx").write_bytes(export_onnx(prepared)[0].SerializeToString())
    kept = ov.Core().compile_model(ov.convert_model(str(tmp_path / "kept.onnx")), "CPU",
                                   {"INFERENCE_PRECISION_HINT": "f32"})
    xs = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, ours, lowered = model(xs), q(xs), x86(xs)
    before = torch.from_numpy(kept({0: xs.numpy()})[0].copy())
    assert sqnr(lowered, ours) >= 30
    assert sqnr(ref, ours) >= sqnr(ref, before) - 0.5


def test_near_symmetric_ranges_become_symmetric():
    """A u8 activation whose zero point is within 8 of 128 is written with zero point 128 (its scale widened to
    keep both calibrated ends), which OpenVINO runs as s8 without a zero point (LayerNorm outputs into the
    linears); the others keep theirs (a ReLU's output: zero point 0, u8)."""
    import openvino as ov  # noqa: PLC0415

    torch.manual_seed(0)
    model = SmallEncoder(distinct_layers=True).eval()
    x = torch.randn(2, 12, 16)
    data = [torch.randn(8, 12, 16) for _ in range(4)]
    prepared = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,))
    q = fxopt.lower(prepared, "openvino")
    ir = ov.Core().read_model(q.xml.decode(), ov.Tensor(np.frombuffer(q.weights, np.uint8)))
    zero_points = []
    for op in ir.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize" or op.input_value(0).get_node().get_type_name() == "Constant":
            continue
        lo, hi = (float(np.ravel(op.input_value(i).get_node().get_data())[0]) for i in (1, 2))
        if op.get_levels() == 256 and lo < 0 < hi:
            zero_points.append(round(-lo / ((hi - lo) / 255)))
    assert len(zero_points) >= 8
    assert not [z for z in zero_points if 0 < abs(z - 128) <= 8], zero_points
    assert zero_points.count(128) >= 4, zero_points
    ops = runtime_ops(q)
    assert ops[("FullyConnected", "i8")] >= 4 and ops[("FullyConnected", "u8")] >= 1
    with torch.no_grad():
        assert sqnr(fxopt.lower(prepared, "x86")(x), q(x)) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_zoo_openvino(name):
    torch.manual_seed(0)
    model = trained_looking(getattr(torchvision.models, name)(weights=None, num_classes=10))
    x = torch.randn(2, 3, 96, 96)
    data = [torch.randn(2, 3, 96, 96) for _ in range(4)]
    with torch.no_grad():
        fp16 = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="openvino")
        assert sqnr(model(x), fp16(x)) >= 40
        prepared = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,))
        q = fxopt.lower(prepared, "openvino")
        assert sqnr(fxopt.lower(prepared, "x86")(x), q(x)) >= 30
        assert runtime_ops(q)[("Convolution", "u8")] > 10
        if name == "efficientnet_b0":  # 49 SiLUs + 16 SE gates, each read straight from its conv
            pairs = _activations_after_conv(q)
            assert len(pairs) == 65 and all(src.get_type_name() != "FakeQuantize" for _, src in pairs)
