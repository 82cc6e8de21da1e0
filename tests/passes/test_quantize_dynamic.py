"""``quantize-dynamic``: structure, numerics vs float, leaves, fp16, deepcopy, errors, digits accuracy."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import passes as fp
from fxopt.quant.nn.dynamic import DynamicEmbedding, DynamicEmbeddingBag, DynamicLinear
from fxopt.quant.nn.dynamic_attention import DynamicMultiheadAttention
from fxopt.quant.nn.dynamic_rnn import DynamicGRU, DynamicLSTM
from fxopt.report import report


def cosine(a, b):
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1).mean().item()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 24)
        self.bag = nn.EmbeddingBag(100, 24, mode="mean")

    def forward(self, ids):
        return self.emb(ids).sum(1) + self.bag(ids)


class Untraceable(nn.Module):
    """Data-dependent control flow: the auto tracer keeps it as a leaf (a float island)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


class WithIsland(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.island = Untraceable()

    def forward(self, x):
        return self.island(self.fc(x))


def stored_bytes(module: nn.Module) -> int:
    """Bytes the module stores, as fxopt.report counts them (int8 weights 1 byte, fp16 2, each tensor once)."""
    return report(module).total_bytes


def run(model, example, **options):
    gm = fxopt.trace(model, (example,))
    return fp.QuantizeDynamic(**options)(gm)


def test_mlp_structure_and_numerics():
    model = MLP().eval()
    x = torch.randn(64, 32)
    result = run(model, x)
    q = result.graph_module
    assert result.modified and result.stats == {"Linear": 3}
    assert all(isinstance(q.get_submodule(n), DynamicLinear) for n in ("fc1", "fc2", "fc3"))
    ref, out = model(x), q(x)
    assert cosine(out, ref) > 0.999
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    w = q.fc1.fxopt_weights()["weight"]
    assert w.qscheme() == torch.per_channel_symmetric or w.qscheme() == torch.per_channel_affine
    assert w.q_per_channel_scales().numel() == 64  # one scale per output row


def test_int8_size_at_most_27_percent():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512)).eval()
    q = run(model, torch.randn(1, 1024)).graph_module
    assert stored_bytes(q) <= 0.27 * stored_bytes(model)
    assert report(q).total_bytes <= 0.27 * report(model).total_bytes


@pytest.mark.parametrize("kind,qkind", [(nn.LSTM, DynamicLSTM), (nn.GRU, DynamicGRU)])
def test_recurrent_models(kind, qkind):
    model = Recurrent(kind).eval()
    x = torch.randn(4, 20, 16)
    q = run(model, x).graph_module
    assert isinstance(q.rnn, qkind) and isinstance(q.head, DynamicLinear)
    with torch.inference_mode():
        assert cosine(q(x), model(x)) > 0.995
    names = set(q.rnn.fxopt_weights())
    assert {"weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1", "bias_ih_l0"} <= names
    assert q.rnn.fxopt_weights()["weight_ih_l0"].dtype == torch.float16  # sensitive first projection
    assert q.rnn.fxopt_weights()["weight_hh_l1"].is_quantized


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_rnn_options_match_float(kind):
    """bidirectional, seq-first, initial state, packed sequences: same interface and results as float."""
    rnn = kind(6, 8, num_layers=2, bidirectional=True).eval()
    q = fp.QuantizeDynamic()(fxopt.trace(nn.Sequential(rnn))).graph_module.get_submodule("0")
    x = torch.randn(9, 3, 6)
    h0 = torch.randn(4, 3, 8)
    hx = (h0, torch.randn(4, 3, 8)) if kind is nn.LSTM else h0
    with torch.inference_mode():
        (ref, ref_h), (out, out_h) = rnn(x, hx), q(x, hx)
        assert out.shape == ref.shape and cosine(out, ref) > 0.999
        for h_q, h_f in zip(torch.utils._pytree.tree_leaves(out_h), torch.utils._pytree.tree_leaves(ref_h)):
            assert h_q.shape == h_f.shape and cosine(h_q, h_f) > 0.999
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([9, 4, 6]), enforce_sorted=False)
        ref_p, out_p = rnn(packed, hx)[0], q(packed, hx)[0]
        assert isinstance(out_p, nn.utils.rnn.PackedSequence)
        assert cosine(out_p.data, ref_p.data) > 0.999


def test_embeddings_weight_only():
    model = Bag().eval()
    ids = torch.randint(0, 100, (5, 7))
    result = run(model, ids)
    q = result.graph_module
    assert isinstance(q.emb, DynamicEmbedding) and isinstance(q.bag, DynamicEmbeddingBag)
    assert result.stats == {"Embedding": 1, "EmbeddingBag": 1}
    ref, out = model(ids), q(ids)
    assert (out - ref).abs().max() < 0.05  # 8-bit rows: error ~ range/255 per value
    assert q.emb.packed_weight.dtype == torch.uint8
    offsets = torch.tensor([0, 3, 3, 10])  # an empty bag included
    flat = ids.reshape(-1)
    assert (q.bag(flat, offsets) - model.bag(flat, offsets)).abs().max() < 0.05
    max_bag = fp.QuantizeDynamic()(fxopt.trace(nn.Sequential(nn.EmbeddingBag(10, 4, mode="max"))))
    assert max_bag.modified is False and "mode='max'" in max_bag.notes[0]
    assert stored_bytes(q) < 0.35 * stored_bytes(model)


def test_inside_a_leaf_module_is_quantized():
    model = WithIsland().eval()
    x = torch.randn(4, 8)
    gm = fxopt.trace(model, (x,), leaf_modules=[Untraceable])
    assert "island" in fxopt.untraced(gm)
    result = fp.QuantizeDynamic()(gm)
    assert isinstance(gm.get_submodule("island.inner"), DynamicLinear)
    assert result.stats == {"Linear": 2}
    assert cosine(gm(x), model(x)) > 0.999


def test_auto_traced_island():
    model = WithIsland().eval()
    x = torch.randn(4, 8)
    q = fxopt.compile(model, passes=[fp.QuantizeDynamic()], example_inputs=(x,))
    assert isinstance(q.get_submodule("island.inner"), DynamicLinear)
    assert cosine(q(x), model(x)) > 0.999


def test_nothing_to_quantize_is_not_modified():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    result = run(model, torch.randn(1, 3, 8, 8))
    assert result.modified is False and result.stats == {}
    only_lstm = run(MLP().eval(), torch.randn(2, 32), types=(nn.LSTM,))
    assert only_lstm.modified is False


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # the same module under two names
        self.rnn = nn.GRU(8, 8)

    def forward(self, x):
        return self.rnn(self.b(torch.relu(self.a(x))))[0]


def test_types_filter_and_shared_module():
    model = Pair().eval()
    x = torch.randn(3, 2, 8)
    gm = fxopt.trace(nn.Sequential(model), leaf_modules=[Pair])
    result = fp.QuantizeDynamic(types=(nn.Linear,))(gm)
    assert result.stats == {"Linear": 1}
    assert gm.get_submodule("0.a") is gm.get_submodule("0.b")
    assert isinstance(gm.get_submodule("0.a"), DynamicLinear)
    assert type(gm.get_submodule("0.rnn")) is nn.GRU
    assert cosine(gm(x), model(x)) > 0.999


def test_skip_patterns_keep_modules_float():
    model = MLP().eval()
    x = torch.randn(4, 32)
    result = run(model, x, skip=("fc3", "fc1*"))
    q = result.graph_module
    assert result.stats == {"Linear": 1} and isinstance(q.fc2, DynamicLinear)
    assert type(q.fc1) is nn.Linear and type(q.fc3) is nn.Linear
    assert any("fc3" in n and "skip" in n for n in result.notes)


def test_fp16_path():
    model = Recurrent(nn.LSTM).eval()
    x = torch.randn(2, 10, 16)
    result = run(model, x, dtype=torch.float16)
    q = result.graph_module
    assert q.head.fxopt_weights()["weight"].dtype == torch.float16
    assert all(w.dtype == torch.float16 for k, w in q.rnn.fxopt_weights().items() if k.startswith("weight"))
    with torch.inference_mode():
        assert (q(x) - model(x)).abs().max() < 1e-2


def test_multihead_attention_replaced_whole():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4)

        def forward(self, q, kv):
            return self.attn(q, kv, kv)[0]

    model = Attn().eval()
    qx, kv = torch.randn(5, 2, 32), torch.randn(7, 2, 32)
    gm = fxopt.trace(model, (qx, kv))
    result = fp.QuantizeDynamic()(gm)
    assert isinstance(gm.attn, DynamicMultiheadAttention) and result.stats == {"MultiheadAttention": 1}
    assert cosine(gm(qx, kv), model(qx, kv)) > 0.999


def test_deepcopy_and_save_roundtrip():
    model = Recurrent(nn.GRU).eval()
    x = torch.randn(2, 10, 16)
    q = run(model, x).graph_module
    clone = copy.deepcopy(q)
    assert torch.equal(clone(x), q(x))
    buf = io.BytesIO()
    torch.save(q.rnn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x)[0], q.rnn(x)[0])


def test_errors():
    with pytest.raises(ValueError, match="torch.qint8.*torch.float16"):
        fp.QuantizeDynamic(dtype=torch.quint8)
    with pytest.raises(ValueError, match="cannot quantize Conv2d"):
        fp.QuantizeDynamic(types=(nn.Conv2d,))
    lstm = nn.LSTM(4, 8, proj_size=2)
    result = fp.QuantizeDynamic()(fxopt.trace(nn.Sequential(lstm)))
    assert result.modified is False and "proj_size" in result.notes[0]


def test_digits_mlp_accuracy_within_half_a_point():
    from sklearn import datasets
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        for idx in train.split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    q = fxopt.compile(model, passes=[fp.QuantizeDynamic()], example_inputs=(x[:1],))
    with torch.inference_mode():
        acc_float = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        acc_int8 = (q(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc_float > 0.93
    assert acc_int8 >= acc_float - 0.005


@pytest.fixture
def qnnpack():
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    yield
    torch.backends.quantized.engine = engine


def test_qnnpack_engine(qnnpack):
    model = Recurrent(nn.LSTM).eval()
    x = torch.randn(3, 12, 16)
    result = run(model, x)
    q = result.graph_module
    weights = q.rnn.fxopt_weights()
    assert weights["weight_ih_l0"].is_quantized  # no fp16 kernels on qnnpack: int8 everywhere
    assert weights["weight_hh_l1"].q_per_channel_scales().numel() == 4 * 32  # per gate row
    with torch.inference_mode():
        assert cosine(q(x), model(x)) > 0.995
    with pytest.raises(fxopt.UnsupportedError, match="qnnpack"):
        fp.QuantizeDynamic(dtype=torch.float16)(fxopt.trace(MLP()))


class Outlier(nn.Module):
    """fc2's input has one channel 1000x larger than the rest: its per-tensor int8 activations lose the rest."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.register_buffer("gain", torch.ones(64))
        self.gain[3] = 1000.0
        with torch.no_grad():
            self.fc2.weight[:, 3] = 0.0  # the outlier only sets the activation range

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)) * self.gain)))


def test_min_cosine_keeps_the_sensitive_layer_float():
    torch.manual_seed(0)
    model = Outlier().eval()
    data = [torch.randn(16, 32) for _ in range(2)]
    plain = fp.QuantizeDynamic()(fxopt.trace(model, (data[0],)))
    gm = fxopt.trace(model, (data[0],))
    result = fp.QuantizeDynamic(calibration=data, min_cosine=0.999)(gm)
    assert plain.stats == {"Linear": 3} and result.modified is True
    assert result.stats["kept_float"] == ["fc2"] and result.stats["Linear"] == 2
    assert type(gm.fc2) is nn.Linear and isinstance(gm.fc1, DynamicLinear) and isinstance(gm.fc3, DynamicLinear)
    before, after = result.stats["cosine_quantized"], result.stats["cosine"]
    assert before < 0.999 <= after
    assert any(n.startswith("kept float: fc2 (cosine") for n in result.notes)
    assert any("fc2 (Linear) left float: kept float by min_cosine" in n for n in result.notes)
    x = torch.randn(32, 32)
    with torch.inference_mode():
        assert cosine(gm(x), model(x)) > cosine(plain.graph_module(x), model(x))


def test_min_cosine_already_met_keeps_nothing_float():
    model = MLP().eval()
    data = [torch.randn(8, 32), (torch.randn(4, 32),), {"x": torch.randn(4, 32)}]
    gm = fxopt.trace(model, (data[0],))
    result = fp.QuantizeDynamic(calibration=data, min_cosine=0.99)(gm)
    assert result.modified is True and result.stats["Linear"] == 3 and result.stats["kept_float"] == []
    assert result.stats["cosine"] == result.stats["cosine_quantized"] >= 0.99
    assert not any("kept float" in n for n in result.notes)
    assert all(isinstance(m, DynamicLinear) for m in (gm.fc1, gm.fc2, gm.fc3))
    measured = fp.QuantizeDynamic(calibration=data[:1])(fxopt.trace(model, (data[0],)))  # measures only
    assert 0.99 <= measured.stats["cosine"] <= 1.0 and measured.stats["kept_float"] == []


def test_min_cosine_out_of_reach_is_a_note():
    torch.manual_seed(0)
    model = MLP().eval()
    data = [torch.randn(8, 32)]
    gm = fxopt.trace(model, (data[0],))
    result = fp.QuantizeDynamic(calibration=data, min_cosine=1.0, max_float_fraction=0.34)(gm)
    assert len(result.stats["kept_float"]) == 1 and result.stats["Linear"] == 2  # cap: 1 of 3 modules
    assert any("min_cosine=1.0 not reached" in n and "max_float_fraction" in n for n in result.notes)
    none = fp.QuantizeDynamic(calibration=data, min_cosine=1.0, max_float_fraction=0.0)(fxopt.trace(model))
    assert none.stats["kept_float"] == [] and none.stats["Linear"] == 3


def test_min_cosine_errors_and_label():
    with pytest.raises(fxopt.CalibrationError, match="needs calibration data"):
        fp.QuantizeDynamic(min_cosine=0.99)
    with pytest.raises(ValueError, match="min_cosine"):
        fp.QuantizeDynamic(min_cosine=1.5, calibration=[torch.randn(2, 32)])
    with pytest.raises(ValueError, match="max_float_fraction"):
        fp.QuantizeDynamic(max_float_fraction=2.0)
    gm = fxopt.trace(MLP().eval())
    with pytest.raises(fxopt.CalibrationError, match="empty calibration"):
        fp.QuantizeDynamic(calibration=[], min_cosine=0.9)(gm)
    with pytest.raises(fxopt.CalibrationError, match="batch 1 .* does not fit"):
        fp.QuantizeDynamic(calibration=[torch.randn(2, 32), torch.randn(2, 7)], min_cosine=0.9)(gm)
    assert all(type(m) is nn.Linear for m in (gm.fc1, gm.fc2, gm.fc3))  # untouched: float outputs come first
    p = fp.QuantizeDynamic(calibration=[torch.randn(2, 32)], min_cosine=0.99)
    assert p.label() == "quantize-dynamic{min_cosine=0.99}"
    assert p == fp.QuantizeDynamic(calibration=[torch.randn(3, 32)], min_cosine=0.99)
    conv = fxopt.trace(nn.Sequential(nn.Conv2d(3, 4, 3)).eval())
    result = fp.QuantizeDynamic(calibration=[torch.randn(1, 3, 8, 8)], min_cosine=0.99)(conv)
    assert result.modified is False


def test_module_whose_weights_the_graph_reads_stays_float():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.fc(x) + torch.nn.functional.linear(x, self.fc.weight))

    model = ReadsWeight().eval()
    x = torch.randn(3, 4)
    q = fxopt.compile(model, [fp.QuantizeDynamic()], example_inputs=(x,))
    (record,) = fxopt.records(q)
    assert record.stats == {"Linear": 1}
    assert any(n.startswith("fc (Linear) left float: the graph reads its weights") for n in record.notes)
    assert type(q.fc) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=0.05, rtol=0)
