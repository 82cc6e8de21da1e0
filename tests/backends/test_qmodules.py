"""Each int8 module against its float version, under both engines; copy/state_dict/report behaviour."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxopt.quant.nn import int8 as qm
from fxopt.quant.nn import engine_scope
from fxopt.backends.x86 import x86_engine
from fxopt.quant.spec import QSpec, qparams_from_range

from tests.helpers import sqnr

ENGINES = [x86_engine(), "qnnpack"]
ACT = QSpec(torch.quint8)
WEIGHT = QSpec(torch.qint8, symmetric=True, axis=0)

warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")


def act_qparams(t: torch.Tensor) -> tuple[float, int]:
    scale, zp = qparams_from_range(ACT, t.detach().min(), t.detach().max())
    return float(scale), int(zp)


def quant(t: torch.Tensor) -> torch.Tensor:
    return torch.quantize_per_tensor(t, *act_qparams(t), torch.quint8)


def weight_qparams(w: torch.Tensor, per_channel: bool):
    spec = WEIGHT if per_channel else WEIGHT.with_axis(None)
    if per_channel:
        flat = w.detach().reshape(w.shape[0], -1)
        return qparams_from_range(spec, flat.amin(1), flat.amax(1))
    return qparams_from_range(spec, w.detach().min(), w.detach().max())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("conv,shape,relu", [
    (nn.Conv1d(4, 8, 3, padding=1), (2, 4, 16), False),
    (nn.Conv2d(4, 8, 3, stride=2, padding=1), (2, 4, 12, 12), True),
    (nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False), (1, 8, 10, 10), False),
    (nn.Conv3d(4, 6, 3, padding=1), (1, 4, 6, 6, 6), True),
])
def test_qconv_matches_float(engine, per_channel, conv, shape, relu):
    x = torch.randn(shape)
    ref = conv(x)
    ref = ref.relu() if relu else ref
    with engine_scope(engine):
        q = qm.QConv.from_float(conv, weight_qparams(conv.weight, per_channel), act_qparams(ref), relu=relu,
                                engine=engine)
        out = q(quant(x)).dequantize()
    assert out.shape == ref.shape
    assert sqnr(ref, out) > 30


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("relu", [False, True])
def test_qlinear_matches_float_nd_input(engine, relu):
    lin = nn.Linear(16, 10)
    x = torch.randn(3, 5, 16)
    ref = lin(x).relu() if relu else lin(x)
    with engine_scope(engine):
        q = qm.QLinear.from_float(lin, weight_qparams(lin.weight, True), act_qparams(ref), relu=relu, engine=engine)
        out = q(quant(x)).dequantize()
    assert sqnr(ref, out) > 30


@pytest.mark.parametrize("engine", ENGINES)
def test_binary_and_cat_modules(engine):
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 1, 5)  # broadcasting
    with engine_scope(engine):
        for cls, fn in ((qm.QAdd, torch.add), (qm.QMul, torch.mul)):
            for relu in (False, True):
                ref = fn(a, b).relu() if relu else fn(a, b)
                out = cls(*act_qparams(ref), relu=relu)(quant(a), quant(b)).dequantize()
                assert sqnr(ref, out) > 30, (cls, relu)
        c = torch.randn(2, 3, 5, 5)
        ref = torch.cat([a, c], 1)
        assert sqnr(ref, qm.QCat.from_float(1, act_qparams(ref))(quant(a), quant(c)).dequantize()) > 30


@pytest.mark.parametrize("engine", ENGINES)
def test_hardswish_layernorm_batchnorm(engine):
    x = torch.randn(2, 6, 7, 7) * 3
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2)
    bn3 = nn.BatchNorm3d(6).eval()
    ln = nn.LayerNorm(7)
    nn.init.normal_(ln.weight)
    with engine_scope(engine):
        cases = [
            (qm.QHardswish.from_float(None, act_qparams(F.hardswish(x))), F.hardswish(x), x),
            (qm.QLayerNorm.from_float(ln, act_qparams(ln(x))), ln(x), x),
            (qm.QBatchNorm.from_float(bn, act_qparams(bn(x))), bn(x), x),
            (qm.QBatchNorm.from_float(bn3, act_qparams(bn3(x.unsqueeze(2)))), bn3(x.unsqueeze(2)), x.unsqueeze(2)),
        ]
        for mod, ref, inp in cases:
            assert sqnr(ref, mod(quant(inp)).dequantize()) > 30, type(mod).__name__


@pytest.mark.parametrize("engine", ENGINES)
def test_deepcopy_state_dict_and_weights(engine):
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with engine_scope(engine):
        q = qm.QConv.from_float(conv, weight_qparams(conv.weight, True), act_qparams(conv(x)), engine=engine)
        qx = quant(x)
        expected = q(qx).int_repr()
        assert torch.equal(copy.deepcopy(q)(qx).int_repr(), expected)
        state = q.state_dict()
        assert state["weight"].dtype == torch.qint8 and "scale" in state
        other = qm.QConv.from_float(nn.Conv2d(3, 4, 3), weight_qparams(conv.weight, False), (1.0, 0), engine=engine)
        other.load_state_dict(state)
        assert torch.equal(other(qx).int_repr(), expected)
    weights = q.fxopt_weights()
    assert weights["weight"].dtype == torch.qint8 and weights["weight"].qscheme() == torch.per_channel_affine
    assert weights["bias"].dtype == torch.float32


def test_packing_follows_module_engine_not_global():
    """A module built for qnnpack while the global engine is x86 runs under either global engine."""
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with engine_scope(x86_engine()):
        q = qm.QLinear.from_float(lin, weight_qparams(lin.weight, False), act_qparams(lin(x)), engine="qnnpack")
        assert torch.backends.quantized.engine == x86_engine()  # restored after packing
    for engine in ENGINES:
        with engine_scope(engine):
            assert sqnr(lin(x), q(quant(x)).dequantize()) > 30


def test_qconv3d_on_qnnpack_keeps_weights_for_saving():
    conv = nn.Conv3d(2, 3, 3)
    q = qm.QConv.from_float(conv, weight_qparams(conv.weight, True), (0.1, 128), engine="qnnpack")
    assert q.fxopt_weights()["weight"].shape == conv.weight.shape
    assert q.state_dict()["weight"].dtype == torch.qint8


def test_quantize_input():
    x = torch.linspace(-1, 1, 11)
    q = qm.QuantizeInput(2 / 255, 128)(x)
    assert q.dtype == torch.quint8 and torch.allclose(q.dequantize(), x, atol=1 / 255)
