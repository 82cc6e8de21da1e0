"""backend="onnx" for dynamic int8 LSTM / GRU: a speaker-encoder-like model (stacked LSTM, projection, L2 norm)
exported to ONNX and run in ONNX Runtime, compared with fxopt's own dynamic int8 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import recipes
from fxopt.errors import UnsupportedError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class SpeakerEncoder(nn.Module):
    """GE2E-style: stacked LSTM (or GRU) over mel frames, the last step projected and L2-normalized."""

    def __init__(self, rnn: type[nn.RNNBase] = nn.LSTM, hidden: int = 64, layers: int = 2,
                 bidirectional: bool = False) -> None:
        super().__init__()
        self.rnn = rnn(40, hidden, layers, batch_first=True, bidirectional=bidirectional)
        self.proj = nn.Linear(hidden * (2 if bidirectional else 1), 32)

    def forward(self, mels):
        out, _ = self.rnn(mels)
        return F.normalize(torch.relu(self.proj(out[:, -1])), dim=1)


class WithStates(nn.Module):
    """An LSTM given initial states, returning its output sequence and final states."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(16, 24, 2)

    def forward(self, x, h0, c0):
        return self.rnn(x, (h0, c0))


def _cosine(a, b) -> float:
    return float(F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).min())


def _ops(module) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(module.model_bytes).graph.node]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_dynamic_lstm_exports_as_dynamic_quantize_lstm(bidirectional, tmp_path):
    torch.manual_seed(0)
    model = SpeakerEncoder(bidirectional=bidirectional).eval()
    x = torch.randn(2, 30, 40)
    dyn = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=(x,))
    ort = fxopt.lower(dyn, "onnx")
    assert ort.kind == "dynamic-int8"
    ops = _ops(ort)
    assert ops.count("DynamicQuantizeLSTM") == 2 and ops.count("MatMulInteger") == 1  # + the projection
    graph = onnx.load_from_string(ort.model_bytes).graph
    w = {i.name: i for i in graph.initializer}
    lstm = next(n for n in graph.node if n.op_type == "DynamicQuantizeLSTM")
    assert w[lstm.input[1]].data_type == onnx.TensorProto.INT8 and w[lstm.input[2]].data_type == onnx.TensorProto.INT8
    assert list(w[lstm.input[8]].dims) == [2 if bidirectional else 1, 4 * 64]  # per-row (per gate row) scales
    onnx.checker.check_model(onnx.load_from_string(ort.model_bytes), full_check=True)
    xs = torch.randn(5, 30, 40, generator=torch.Generator().manual_seed(1))  # another batch size
    with torch.no_grad():
        ours, theirs, ref = dyn(xs), ort(xs), model(xs)
    assert _cosine(ours, theirs) >= 0.999, _cosine(ours, theirs)
    assert _cosine(ref, theirs) >= 0.999
    fxopt.save(ort, tmp_path / "enc.onnx")
    again = fxopt.load(tmp_path / "enc.onnx")
    assert torch.equal(again(xs), theirs)


def test_dynamic_gru_unrolled_matches_fxopt():
    torch.manual_seed(0)
    model = SpeakerEncoder(nn.GRU, hidden=32).eval()
    x = torch.randn(1, 12, 40)
    dyn = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=(x,))
    ort = fxopt.lower(dyn, "onnx")
    ops = _ops(ort)
    # per layer: the input projection once, then W_hh per step (12 steps), + the projection
    assert ops.count("MatMulInteger") == 2 * (1 + 12) - 1 + 1  # layer 0's input projection is fp16: a MatMul
    assert ops.count("DynamicQuantizeLinear") == ops.count("MatMulInteger")
    xs = torch.randn(3, 12, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _cosine(dyn(xs), ort(xs)) >= 0.999, _cosine(dyn(xs), ort(xs))


def test_initial_states_and_state_outputs():
    torch.manual_seed(0)
    model = WithStates().eval()
    args = (torch.randn(7, 2, 16), torch.randn(2, 2, 24), torch.randn(2, 2, 24))
    dyn = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=args)
    ort = fxopt.lower(dyn, "onnx")
    with torch.no_grad():
        (out, (h, c)), (r_out, (r_h, r_c)) = ort(*args), dyn(*args)
    assert out.shape == r_out.shape and h.shape == r_h.shape == (2, 2, 24) and c.shape == r_c.shape
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        assert _cosine(b, a) >= 0.999


def test_unbatched_input_is_refused_with_what_to_do():
    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(8, 8)

        def forward(self, x):  # [T, F]: nn.LSTM's unbatched form
            return self.rnn(x)[0]

    x = torch.randn(5, 8)
    dyn = fxopt.compile(Unbatched().eval(), recipes.dynamic_int8(), example_inputs=(x,))
    with pytest.raises(UnsupportedError, match="batched 3-D tensor input"):
        fxopt.lower(dyn, "onnx")
