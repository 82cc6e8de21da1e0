"""The "reference" backend (float simulation of a calibrated graph) and lower(check=True)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import backends, meta, recipes
from fxopt.quant.nn import int8 as qm
from fxopt.backends._lower_ops import is_depthwise, weight_qparams
from fxopt.lower_check import check_lowering
from fxopt.quant.observers import Observer
from fxopt.quant.simulate import QuantDequant
from tests.helpers import sqnr

warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
BACKENDS = ["x86", "qnnpack"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = F.hardswish(self.dw(y))
        y = self.c2(y) + y
        y = F.max_pool2d(y, 2)
        y = torch.sigmoid(y) * y
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _prepared(model, backend, size=16, n=4):
    torch.manual_seed(1)
    calib = [torch.randn(2, 3, size, size) for _ in range(n)]
    return fxopt.compile(model.eval(), recipes.static_int8(calib, backend=backend), example_inputs=(calib[0],))


def test_reference_is_registered_and_simulates_the_prepared_graph():
    assert "reference" in backends.available()
    model = Net()
    prepared = _prepared(model, "x86")
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    sim = fxopt.lower(prepared, "reference")
    assert {k: v for k, v in prepared.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in prepared.state_dict().items())  # prepared untouched
    assert meta.backend_of(sim) == "reference"
    assert not any(isinstance(m, Observer) for m in sim.modules())
    sims = [m for m in sim.modules() if isinstance(m, QuantDequant)]
    checkpoints = [n for n in sim.graph.nodes if meta.checkpoint(n) is not None]
    assert len(sims) == len(checkpoints) >= 8
    # weights on their int8 grid: integer multiples of the scale lowering gives each output channel
    spec, config = backends.get("x86").spec, meta.quant_config(prepared)
    convs = [(name, m) for name, m in sim.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for name, conv in convs:
        original = prepared.get_submodule(name).weight
        scale, _ = weight_qparams(original, True, spec, config, is_depthwise(original, conv.groups))
        codes = conv.weight.detach().double().flatten(1) / scale.reshape(-1, 1)
        assert torch.allclose(codes, codes.round(), atol=1e-3) and not torch.equal(conv.weight, original)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert 20 < sqnr(model(x), sim(x)) < 60  # quantized, but close


@pytest.mark.parametrize("backend", BACKENDS)
def test_lower_check_passes_and_reports_every_layer(backend):
    prepared = _prepared(Net(), backend)
    q = fxopt.lower(prepared, backend, check=True)
    assert meta.backend_of(q) == backend
    sim = fxopt.backends.reference.ReferenceBackend(backends.get(backend).spec).lower(prepared)
    result = check_lowering(sim, q, (torch.randn(2, 3, 16, 16),))
    assert not result.unmatched and len(result.layers) >= 8
    assert result.worst.max_steps <= 1.001 and result.first_failure is None  # rounding only
    # compile(check=True) runs the same check after lowering
    calib = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    fxopt.compile(Net().eval(), recipes.static_int8(calib, backend=backend), example_inputs=(calib[0],),
                  backend=backend, check=True)


def test_check_names_the_first_diverging_layer(monkeypatch):
    model = Net().eval()
    torch.manual_seed(1)
    calib = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    # ranges as fitted (headroom 1.0): the injected 20-step shift then shows as >= 10 steps after saturation
    prepared = fxopt.compile(model, recipes.static_int8(calib, backend="x86", headroom=1.0),
                             example_inputs=(calib[0],))
    real = qm.QConv.from_float

    def broken(conv, weight_qparams, output_qparams, **kw):
        if conv.groups > 1:  # the depthwise conv gets a wrong output zero point
            output_qparams = (output_qparams[0], int(output_qparams[1]) + 20)
        return real(conv, weight_qparams, output_qparams, **kw)

    monkeypatch.setattr(qm.QConv, "from_float", staticmethod(broken))
    with pytest.raises(fxopt.NumericsError) as err:
        fxopt.lower(prepared, "x86", check=True)
    msg = str(err.value)
    assert "dw" in msg and "Conv2d" in msg and "zero_point" in msg and "steps off" in msg, msg
    steps = float(msg.split("): ")[1].split(" quantization steps")[0])
    assert steps >= 10  # a 20-step zero-point shift, less where the shifted value saturates
    with pytest.raises(ValueError, match="example_inputs"):
        fxopt.lower(fxopt.compile(Net().eval(), recipes.fuse()), "x86", check=True)


class FillThenConv(nn.Module):
    """torchvision's detection transform pattern: allocate a batch buffer, copy the image into it in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        buf = x.new_full((x.shape[0], 3, 20, 20), 0.0)
        buf[:, :, : x.shape[2], : x.shape[3]].copy_(x)
        return self.conv(buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_filled_input_is_observed_and_kept(backend):
    """The detector bug: lowering dropped the unused copy_ (int8 saw a zero image) and the input observer ran
    before the copy (scale 1e-7)."""
    model = FillThenConv().eval()
    calib = [torch.rand(1, 3, 16, 16) for _ in range(3)]
    prepared = fxopt.compile(model, recipes.static_int8(calib, backend=backend), example_inputs=(calib[0],))
    stub = next(n for n in prepared.graph.nodes if n.op == "call_module" and "quant" in n.target)
    copy_node = next(n for n in prepared.graph.nodes if n.target == "copy_")
    order = list(prepared.graph.nodes)
    assert order.index(stub) > order.index(copy_node)
    q = fxopt.lower(prepared, backend, check=True)
    assert any(n.target == "copy_" for n in q.graph.nodes)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 30


def test_check_over_yolo_style_head():
    """Pixel boxes concatenated with [0, 1] scores: the cat stays float, the check still lines up."""

    class Yolo(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
            self.box = nn.Conv2d(8, 4, 1)
            self.obj = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            f = self.body(x)
            boxes = torch.sigmoid(self.box(f)) * 320.0
            scores = torch.sigmoid(self.obj(f))
            return torch.cat([boxes, scores], 1).flatten(2).transpose(1, 2)

    for backend in BACKENDS:
        model = Yolo().eval()
        calib = [torch.rand(2, 3, 32, 32) for _ in range(3)]
        q = fxopt.compile(model, recipes.static_int8(calib, backend=backend), example_inputs=(calib[0],),
                          backend=backend, check=True)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            ref, out = model(x), q(x)
        assert (ref[..., 4:] - out[..., 4:]).abs().max() < 0.03  # scores survive (not wiped by pixel scale)
        assert (ref[..., :4] - out[..., :4]).abs().max() < 4.0


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_check_on_runtime_backends_compares_whole_outputs(backend, monkeypatch):
    """ONNX Runtime / LiteRT hide their layers: check=True compares the whole output with the simulation."""
    pytest.importorskip("onnxruntime" if backend == "onnx" else "ai_edge_litert")
    prepared = _prepared(Net(), backend)
    x = torch.randn(2, 3, 16, 16)
    q = fxopt.lower(prepared, backend, check=True, example_inputs=(x,))
    sim = fxopt.lower(prepared, "reference")
    with torch.no_grad():
        assert sqnr(sim(x), q(x)) >= 25
    backend_cls = type(backends.get(backend))
    real = backend_cls.lower

    def broken(self, gm):  # a lowering whose runtime model is wrong: outputs shifted by a constant
        module = real(self, gm)
        return _Shifted(module)

    monkeypatch.setattr(backend_cls, "lower", broken)
    with pytest.raises(fxopt.NumericsError, match=rf"lowering to '{backend}' gives outputs .* dB from the reference"):
        fxopt.lower(prepared, backend, check=True, example_inputs=(x,))


class _Shifted(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y + y.abs().mean() * 3


class UnitPool(nn.Module):
    """FPN's LastLevelMaxPool: F.max_pool2d(x, 1, 2, 0), which QNNPACK's kernel rejects ("1x1 pooling")."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(1, stride=(2, 3), ceil_mode=True)

    def forward(self, x):
        y = F.relu(self.c(x))
        return torch.cat([F.max_pool2d(y, 1, 2, 0).flatten(1), self.pool(y).flatten(1)], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_max_pool_lowers_to_a_strided_view(backend):
    prepared = _prepared(UnitPool(), backend, size=15)
    x = torch.randn(2, 3, 15, 15)
    q = fxopt.lower(prepared, backend, check=True, example_inputs=(x,))
    gm = q.graph_module
    assert not any(n.target in (F.max_pool2d,) or "pool" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        assert q(x).shape == UnitPool().eval()(x).shape
        assert sqnr(fxopt.lower(prepared, "reference")(x), q(x)) > 35
