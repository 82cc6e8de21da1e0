"""backend="openvino": IR written, compiled and run by the real OpenVINO CPU plugin (no mocks)."""

from __future__ import annotations

import copy
import pathlib
import sys
import xml.etree.ElementTree as ET
from collections import Counter

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
