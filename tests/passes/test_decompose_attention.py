"""DecomposeAttention: nn.TransformerEncoder / EncoderLayer / MultiheadAttention and SDPA as traceable ops."""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import passes as fp
from fxopt import recipes
from fxopt.quant.nn import QuantizedModule


class EncoderModel(nn.Module):
    def __init__(self, batch_first=True, norm_first=False, nested=False, activation="gelu", width=32, layers=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=batch_first,
                                           norm_first=norm_first, activation=activation)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nested tensors are off for norm_first layers: torch warns
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested, norm=nn.LayerNorm(width))
        for i, lyr in enumerate(self.encoder.layers):  # cloned layers start equal: make them differ
            with torch.no_grad():
                for p in lyr.parameters():
                    p.add_(0.05 * (i + 1) * torch.randn_like(p))

        self.extra = "mask"  # what forward's second input is: "mask" or "padding" (src_key_padding_mask)

    def forward(self, x, extra=None):
        if self.extra == "padding":
            return self.encoder(x, src_key_padding_mask=extra)
        return self.encoder(x, mask=extra)


class Attention(nn.Module):
    def __init__(self, batch_first=True, kdim=None):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)

    def forward(self, q, kv, mask, kpm):
        out, weights = self.mha(q, kv, kv, attn_mask=mask, key_padding_mask=kpm)
        return out, weights


def _decompose(model, inputs, matmul):
    gm = fxopt.trace(model, inputs)
    result = fp.DecomposeAttention(matmul=matmul)(gm)
    return result, result.graph_module


@pytest.mark.parametrize("matmul", [False, True], ids=["sdpa", "matmul"])
@pytest.mark.parametrize("batch_first,norm_first,nested", [(True, False, False), (False, False, False),
                                                           (True, True, False), (True, False, True)])
@pytest.mark.parametrize("masks", ["none", "padding", "causal"])
def test_encoder_exact(batch_first, norm_first, nested, masks, matmul):
    model = EncoderModel(batch_first, norm_first, nested).eval()
    x = torch.randn(2, 10, 32) if batch_first else torch.randn(10, 2, 32)
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[1, 6:] = True
    model.extra = masks if masks == "padding" else "mask"
    inputs = {"none": (x,), "padding": (x, kpm),
              "causal": (x, nn.Transformer.generate_square_subsequent_mask(10))}[masks]
    result, gm = _decompose(model, inputs, matmul)
    assert result.modified and result.stats["encoders"] == 1 and result.stats["layers"] == 2
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert (torch.matmul in ops) == matmul
    assert (torch.nn.functional.scaled_dot_product_attention in ops) == (not matmul)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 24])
@pytest.mark.parametrize("mask_kind", ["bool2d", "float3d"])
def test_multihead_attention_exact_with_weights(batch_first, kdim, mask_kind):
    model = Attention(batch_first, kdim).eval()
    q = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
    kv = torch.randn(2, 9, kdim or 32) if batch_first else torch.randn(9, 2, kdim or 32)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 5:] = True
    mask = torch.rand(6, 9) > 0.8 if mask_kind == "bool2d" else torch.randn(8, 6, 9)
    result, gm = _decompose(model, (q, kv, mask, kpm), matmul=False)
    assert result.stats["attention"] == 1
    assert {"q_proj", "k_proj", "v_proj", "out_proj"} <= set(dict(gm.mha.named_children()))
    with torch.no_grad():
        for got, want in zip(gm(q, kv, mask, kpm), model(q, kv, mask, kpm)):  # output and averaged weights
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_user_model_untouched_and_linears_quantized_on_x86():
    model = EncoderModel(width=64).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 12, 64)
    data = [torch.randn(2, 12, 64) for _ in range(3)]
    q = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,), backend="x86")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.encoder.layers[0].self_attn, nn.MultiheadAttention)
    int8 = [name for name, m in q.named_modules() if isinstance(m, QuantizedModule) and "linear" in type(m).__name__.lower()]
    assert len(int8) == 2 * 6  # q/k/v/out projections and both feed-forward Linears of each layer
    with torch.no_grad():
        ref, out = model(x), q(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    assert sqnr > 20


def test_nothing_to_do_and_skips_with_reasons():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    result = fp.DecomposeAttention()(fxopt.trace(net, torch.randn(2, 8)))
    assert not result.modified
    training = EncoderModel().train()
    result = fp.DecomposeAttention()(fxopt.trace(training, torch.randn(2, 5, 32)))
    assert not result.modified and "training mode" in result.notes[0]
    no_shapes = fp.DecomposeAttention()(fxopt.trace(EncoderModel().eval()))
    assert not no_shapes.modified and "example_inputs" in no_shapes.notes[0]


    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0] + self.mha(x, x, x)[0]

    shared = fp.DecomposeAttention()(fxopt.trace(Twice().eval(), torch.randn(2, 5, 32)))
    assert not shared.modified and "more than once" in shared.notes[0]


def test_sdpa_in_exported_bert_made_explicit():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(config).eval()
    ids = torch.randint(0, 200, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    gm = fxopt.trace(bert, (ids, mask), mode="export")
    kept = fp.DecomposeAttention(matmul=False)(copy.deepcopy(gm))
    assert not kept.modified  # x86: the fused float kernel stays
    result = fp.DecomposeAttention(matmul=True)(gm)
    assert result.stats["sdpa"] == 2
    assert sum(n.target is torch.matmul for n in gm.graph.nodes) == 4
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, mask).last_hidden_state, bert(ids, mask).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_matmul_operands_get_their_own_symmetric_stubs_on_onnx_only():
    from fxopt import meta
    from fxopt.quant.stubs import QuantStub

    class QK(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-2, -1)), -1)

    x = torch.randn(2, 5, 8)
    for backend, int8_matmul in (("onnx", True), ("x86", False)):
        gm = fxopt.trace(QK().eval(), (x,))
        fp.InsertQuantStubs(backend=backend)(gm)
        matmul = next(n for n in gm.graph.nodes if n.target is torch.matmul)
        if not int8_matmul:
            assert meta.quant_region(matmul) is None
            assert any("matmul" in i.reason or "int8 kernel" in i.reason for i in meta.float_islands(gm))
            continue
        stubs = [a for a in matmul.args[:2] if a.op == "call_module"]
        assert len(stubs) == 2 and all(isinstance(gm.get_submodule(s.target), QuantStub) for s in stubs)
        for s in stubs:
            spec = meta.operand_spec(s)
            assert spec.dtype == torch.qint8 and spec.symmetric
            assert s.args[0].op == "call_module" and "dequant" in s.args[0].target  # requantized int8 values


def test_residual_stream_float_unless_asked():
    from fxopt import meta

    model = EncoderModel().eval()
    x = torch.randn(2, 6, 32)
    for int8_residual in (False, True):
        gm = fxopt.trace(model, (x,))
        fp.DecomposeAttention(int8_residual=int8_residual)(gm)
        fp.InsertQuantStubs(backend="x86")(gm)
        residual = [n for n in gm.graph.nodes if n.target is operator.add or "norm" in str(n.target)]
        assert len(residual) == 2 * 4 + 1  # two adds and two LayerNorms per layer, the final norm
        in_int8 = [meta.quant_region(n) is not None for n in residual]
        assert all(in_int8) if int8_residual else not any(in_int8)
        reasons = {i.reason for i in meta.float_islands(gm)}
        assert any("residual stream" in r for r in reasons) != int8_residual
