"""state_dict() / load_state_dict of every fxopt quantized module: the int8/fp16 weights and qparams are in the
state dict, survive torch.save + torch.load(weights_only=True), and a module of the same structure but other
weights gives bit-identical outputs after loading them."""

from __future__ import annotations

import io
from typing import Callable

import pytest
import torch
from torch import nn

import fxopt
from fxopt import recipes
from fxopt.quant.nn import (DynamicEmbedding, DynamicEmbeddingBag, DynamicGRU, DynamicLinear, DynamicLSTM,
                            DynamicMultiheadAttention, DynamicTransformerEncoderLayer, FP16Module, QAdd, QBatchNorm,
                            QCat, QConv, QHardswish, QLayerNorm, QLinear, QMul, QuantizeInput, engine_scope)
from fxopt.quant.nn.dynamic import needs_reduce_range

ENGINE = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"


def _q(x: torch.Tensor, scale: float = 0.05, zero_point: int = 60) -> torch.Tensor:
    return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)


def _wq(weight: torch.Tensor):
    """Per-channel symmetric int8 qparams of a weight."""
    scale = weight.detach().reshape(weight.shape[0], -1).abs().amax(1).clamp_min(1e-8) / 127
    return scale, torch.zeros_like(scale, dtype=torch.int64)


def _conv(seed: int, dim: int = 2) -> QConv:
    torch.manual_seed(seed)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1](3, 4, 3, padding=1)
    return QConv.from_float(conv, _wq(conv.weight), (0.04 + 0.01 * seed, 10 + seed), relu=True, engine=ENGINE)


def _linear(seed: int) -> QLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(6, 5)
    return QLinear.from_float(lin, _wq(lin.weight), (0.03 + 0.01 * seed, 64 + seed), engine=ENGINE)


def _layer_norm(seed: int) -> QLayerNorm:
    torch.manual_seed(seed)
    ln = nn.LayerNorm(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.5, 0.5)
    return QLayerNorm.from_float(ln, (0.05 + 0.01 * seed, 128 - seed))


def _batch_norm(seed: int) -> QBatchNorm:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    return QBatchNorm.from_float(bn, (0.05 + 0.01 * seed, 100 + seed))


def _seeded(build: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build().eval()
    return make


x2d, x1d, x3d = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 8), torch.randn(1, 3, 4, 4, 4)
seq = torch.randn(2, 7, 8)
ids = torch.randint(0, 20, (2, 5))

# name -> (make(seed) -> module, inputs); every module's outputs depend on its seed
CASES = {
    "QuantizeInput": (lambda s: QuantizeInput(0.02 + 0.01 * s, 100 + s), (x2d,)),
    "QConv1d": (lambda s: _conv(s, 1), (_q(x1d),)),
    "QConv2d": (_conv, (_q(x2d),)),
    "QConv3d": (lambda s: _conv(s, 3), (_q(x3d),)),
    "QLinear": (_linear, (_q(torch.randn(3, 6)),)),
    "QAdd": (lambda s: QAdd(0.05 + 0.02 * s, 60 + s, relu=True), (_q(x2d), _q(x2d.flip(0)))),
    "QMul": (lambda s: QMul(0.05 + 0.02 * s, 60 + s), (_q(x2d), _q(x2d.flip(0)))),
    "QCat": (lambda s: QCat(1, 0.05 + 0.02 * s, 60 + s), (_q(x2d), _q(x2d.flip(0)))),
    "QHardswish": (lambda s: QHardswish(0.05 + 0.02 * s, 60 + s), (_q(x2d),)),
    "QLayerNorm": (_layer_norm, (_q(torch.randn(2, 4, 6)),)),
    "QBatchNorm": (_batch_norm, (_q(x2d),)),
    "DynamicLinear": (_seeded(lambda: DynamicLinear.from_float(nn.Linear(8, 5))), (seq,)),
    "DynamicLinear-fp16": (_seeded(lambda: DynamicLinear.from_float(nn.Linear(8, 5), torch.float16)), (seq,)),
    "DynamicEmbedding": (_seeded(lambda: DynamicEmbedding.from_float(nn.Embedding(20, 6))), (ids,)),
    "DynamicEmbeddingBag": (_seeded(lambda: DynamicEmbeddingBag.from_float(nn.EmbeddingBag(20, 6))), (ids,)),
    "DynamicLSTM": (_seeded(lambda: DynamicLSTM.from_float(nn.LSTM(8, 6, 2, batch_first=True))), (seq,)),
    "DynamicGRU": (_seeded(lambda: DynamicGRU.from_float(nn.GRU(8, 6, bidirectional=True, batch_first=True,
                                                                bias=False))), (seq,)),
    "DynamicMultiheadAttention": (_seeded(lambda: DynamicMultiheadAttention.from_float(
        nn.MultiheadAttention(8, 2, batch_first=True))), (seq, seq, seq)),
    "DynamicTransformerEncoderLayer": (_seeded(lambda: DynamicTransformerEncoderLayer.from_float(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval())), (seq,)),
    "FP16Module": (_seeded(lambda: FP16Module(nn.Conv2d(3, 4, 3))), (x2d,)),
    "FP16Module-fp16-compute": (_seeded(lambda: FP16Module(nn.Linear(8, 5), "fp16")), (seq,)),
}


def _outputs(module: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.inference_mode(), engine_scope(ENGINE):
        out = module(*inputs)
    leaves = torch.utils._pytree.tree_leaves(out)
    # quantized outputs: the integers and the qparams, so "equal" means bit-identical
    return [t.int_repr() if t.is_quantized else t for t in leaves if isinstance(t, torch.Tensor)] + \
        [torch.tensor([t.q_scale(), t.q_zero_point()], dtype=torch.float64) for t in leaves
         if isinstance(t, torch.Tensor) and t.is_quantized]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def _through_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_round_trip_is_bit_identical(name):
    make, inputs = CASES[name]
    with engine_scope(ENGINE):
        source, target = make(0), make(1)
    want = _outputs(source, inputs)
    assert not _same(_outputs(target, inputs), want), "the two modules must differ for the test to mean anything"
    state = source.state_dict()
    assert state, f"{name}: empty state_dict"
    loaded = _through_file(state)
    with engine_scope(ENGINE):
        result = target.load_state_dict(loaded)
    assert not result.missing_keys and not result.unexpected_keys
    assert _same(_outputs(target, inputs), want)


@pytest.mark.parametrize("name", ["QConv2d", "QLinear", "DynamicLinear", "DynamicLSTM"])
def test_int8_weights_and_qparams_are_in_the_state_dict(name):
    make, _ = CASES[name]
    with engine_scope(ENGINE):
        state = make(0).state_dict()
    weights = [v for k, v in state.items() if k.startswith("weight")]
    assert weights and any(w.is_quantized and w.dtype == torch.qint8 for w in weights)
    if name.startswith("Q"):
        assert state["scale"].dtype == torch.float64 and state["zero_point"].dtype == torch.int64


def test_load_state_dict_reports_missing_and_mismatched_entries():
    with engine_scope(ENGINE):
        target = DynamicLinear.from_float(nn.Linear(8, 5))
        state = DynamicLinear.from_float(nn.Linear(8, 5)).state_dict()
        result = target.load_state_dict({"bias": state["bias"]}, strict=False)
        assert result.missing_keys == ["weight"]
        wrong = DynamicLinear.from_float(nn.Linear(8, 3)).state_dict()
        with pytest.raises(RuntimeError, match="does not fit"):
            target.load_state_dict(wrong)
        fp16 = DynamicLinear.from_float(nn.Linear(8, 5), torch.float16).state_dict()
        with pytest.raises(RuntimeError, match="does not fit"):
            target.load_state_dict(fp16)


def _tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_whole_static_int8_model_state_dict_round_trip(backend):
    x = torch.randn(2, 3, 12, 12)
    q0 = fxopt.compile(_tiny_cnn(0), recipes.static_int8([x]), example_inputs=x, backend=backend)
    q1 = fxopt.compile(_tiny_cnn(1), recipes.static_int8([x]), example_inputs=x, backend=backend)
    want = q0(x)
    assert not torch.equal(q1(x), want)
    result = q1.load_state_dict(_through_file(q0.state_dict()))
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(q1(x), want)


def test_whole_dynamic_model_state_dict_round_trip():
    def model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()

    x = torch.randn(3, 8)
    q0 = fxopt.compile(model(0), recipes.dynamic_int8(), example_inputs=x)
    q1 = fxopt.compile(model(1), recipes.dynamic_int8(), example_inputs=x)
    assert {k for k, v in q0.state_dict().items() if v is not None and v.is_quantized} == {"0.weight", "2.weight"}
    q1.load_state_dict(_through_file(q0.state_dict()))
    assert torch.equal(q1(x), q0(x))
    assert needs_reduce_range() == q1.get_submodule("0").reduce_range
