"""backend="tflite": the ops added for Conv1d nets, grouped convs, SiLU nets and ShuffleNet's split + shuffle.

Each model is prepared for ``tflite``, written as a full-int8 ``.tflite``, run in LiteRT and compared with fxopt's
reference simulation of the same quantization; the EdgeTPU check reads the written file.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt import backends, recipes
from fxopt.errors import UnsupportedError

pytest.importorskip("ai_edge_litert")
from ai_edge_litert import schema_py_generated as schema  # noqa: E402

from fxopt.backends.tflite import TFLiteBackend, _collapse, _reshape_plan  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_onnx import sqnr, trained_looking  # noqa: E402


def _prepare(model, shape, n=3, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape)
    data = [torch.randn(shape) for _ in range(n)]
    return fxopt.compile(model.eval(), recipes.static_int8(data, backend="tflite"), example_inputs=(x,)), x


def _run(prepared, shape, batch=2, seed=1):
    """(tflite outputs, reference outputs) on held-out inputs of another batch size than the example's."""
    tfl, ref = fxopt.lower(prepared, "tflite"), fxopt.lower(prepared, "reference")
    x = torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return tfl, tfl(x), ref(x)


def _tpu_ok(prepared):
    """The EdgeTPU check passes on the written file and on the prepared graph (size reads and view chains
    are written static and on at most 3 dims, so neither is reported)."""
    tpu = backends.get("edgetpu")
    report = tpu.check(fxopt.lower(prepared, TFLiteBackend(int8_io=True)))
    assert report.ok, str(report)
    assert tpu.check(prepared).ok, str(tpu.check(prepared))


class KeywordSpotter(nn.Module):
    """A DS-CNN style keyword spotter on 40 MFCCs x 49 frames: Conv1d-BN-ReLU (stride 2), max pool, depthwise +
    pointwise Conv1d, a residual add, global average pool, linear; also returns the last feature map (3-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv1d(40, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32)
        self.pool = nn.MaxPool1d(2)
        self.dw, self.bn1 = nn.Conv1d(32, 32, 3, padding=1, groups=32), nn.BatchNorm1d(32)
        self.pw, self.bn2 = nn.Conv1d(32, 32, 1), nn.BatchNorm1d(32)
        self.gap, self.fc = nn.AdaptiveAvgPool1d(1), nn.Linear(32, 12)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn0(self.stem(x))))
        z = torch.relu(self.bn2(self.pw(torch.relu(self.bn1(self.dw(y))))) + y)
        return self.fc(torch.flatten(self.gap(z), 1)), z


def test_conv1d_keyword_spotter():
    torch.manual_seed(0)
    prepared, _ = _prepare(KeywordSpotter(), (1, 40, 49))
    tfl, (logits, feats), (ref_logits, ref_feats) = _run(prepared, (1, 40, 49), batch=3)
    ops = tfl.meta["ops"]
    assert ops["CONV_2D"] == 2 and ops["DEPTHWISE_CONV_2D"] == 1 and ops["MAX_POOL_2D"] == 1 and ops["MEAN"] == 1
    assert "TRANSPOSE" not in ops  # the input is quantized straight into NWC; the module transposes at the edge
    assert tfl.info["input_layouts"] == [[0, 2, 1]] and tfl.info["output_layouts"][1] == [0, 2, 1]
    assert logits.shape == (3, 12) and feats.shape == (3, 32, 12)
    assert sqnr(ref_logits, logits) >= 30 and sqnr(ref_feats, feats) >= 30, (sqnr(ref_logits, logits),
                                                                            sqnr(ref_feats, feats))
    _tpu_ok(prepared)


class SequenceHead(nn.Module):
    """Conv1d features flattened (channels x time) into a linear layer, and returned flattened too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(10, 6, 3, stride=2), nn.Linear(6 * 7, 4)

    def forward(self, x):
        flat = torch.flatten(torch.relu(self.conv(x)), 1)
        return self.fc(flat), flat


def test_flattened_sequence_reads_in_stored_order():
    torch.manual_seed(0)
    prepared, _ = _prepare(SequenceHead(), (1, 10, 16))
    tfl, (logits, flat), (ref_logits, ref_flat) = _run(prepared, (1, 10, 16), batch=3)
    assert tfl.meta["ops"]["TRANSPOSE"] == 1  # only for the flattened output, put back in torch order
    assert sqnr(ref_logits, logits) >= 30 and sqnr(ref_flat, flat) >= 30


class GroupedBlock(nn.Module):
    """A ResNeXt bottleneck: 1x1, grouped 3x3 (4 groups of 8, stride 2), 1x1, projection shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.b, self.bn_b = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=4, bias=False), nn.BatchNorm2d(32)
        self.c, self.bn_c = nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.short = nn.Conv2d(16, 32, 1, stride=2)

    def forward(self, x):
        y = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))
        return torch.relu(self.bn_c(self.c(y)) + self.short(x))


def test_grouped_conv_is_split_into_per_group_convs():
    torch.manual_seed(0)
    prepared, _ = _prepare(trained_looking(GroupedBlock()), (1, 16, 16, 16))
    tfl, out, ref = _run(prepared, (1, 16, 16, 16))
    ops = tfl.meta["ops"]
    assert ops["SPLIT"] == 1 and ops["CONCATENATION"] == 1 and ops["CONV_2D"] == 3 + 4 and ops["PAD"] == 1
    model = schema.ModelT.InitFromPackedBuf(tfl.model_bytes, 0)
    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    convs = [op for op in graph.operators if codes[model.operatorCodes[op.opcodeIndex].builtinCode] == "CONV_2D"]
    weights = [graph.tensors[op.inputs[1]] for op in convs]
    group_weights = [w for w in weights if list(w.shape) == [8, 3, 3, 8]]
    assert len(group_weights) == 4 and all(len(w.quantization.scale) == 8 for w in group_weights)  # per channel
    assert sqnr(ref, out) >= 30, sqnr(ref, out)
    _tpu_ok(prepared)


class SiLUNet(nn.Module):
    """EfficientNet's pieces: conv-BN-SiLU, depthwise conv-SiLU, squeeze-excitation (mean, SiLU, sigmoid gate,
    broadcast multiply), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.dw, self.bn_dw = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.act, self.fc = nn.SiLU(), nn.Linear(16, 10)

    def forward(self, x):
        y = self.act(self.bn(self.stem(x)))
        y = self.act(self.bn_dw(self.dw(y)))
        gate = torch.sigmoid(self.se2(self.act(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.fc((y * gate).mean((2, 3)))


def test_silu_as_logistic_times_input():
    torch.manual_seed(0)
    prepared, _ = _prepare(trained_looking(SiLUNet()), (1, 3, 32, 32))
    tfl, out, ref = _run(prepared, (1, 3, 32, 32))
    ops = tfl.meta["ops"]
    assert ops["LOGISTIC"] == 3 + 1 and ops["MUL"] == 3 + 1  # three SiLUs, the SE gate and its multiply
    model = schema.ModelT.InitFromPackedBuf(tfl.model_bytes, 0)
    sig = [t for t in model.subgraphs[0].tensors if b"sigmoid" in t.name]
    assert sig and all(abs(t.quantization.scale[0] - 1 / 256) < 1e-9 and t.quantization.zeroPoint[0] == -128
                       for t in sig)
    assert sqnr(ref, out) >= 30, sqnr(ref, out)
    _tpu_ok(prepared)


def test_shufflenet_split_and_channel_shuffle():
    torch.manual_seed(0)
    model = trained_looking(torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10))
    prepared, _ = _prepare(model, (1, 3, 32, 32), n=2)
    tfl, out, ref = _run(prepared, (1, 3, 32, 32))
    ops = tfl.meta["ops"]
    # 16 channel shuffles, each one TRANSPOSE on [N, H*W, 2, C/2]; 13 chunks as SPLIT; no 5-D tensor in the file
    assert ops["TRANSPOSE"] == 16 and ops["SPLIT"] == 13
    model_t = schema.ModelT.InitFromPackedBuf(tfl.model_bytes, 0)
    assert max(len(t.shape) for t in model_t.subgraphs[0].tensors) <= 4
    assert sqnr(ref, out) >= 30, sqnr(ref, out)
    _tpu_ok(prepared)


class UnevenSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 32, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(24, 8, 1)

    def forward(self, x):
        small, big = torch.split(self.conv(x), [8, 24], dim=1)
        return self.a(small) + self.b(big)


def test_uneven_split_runs_and_the_edgetpu_check_names_split_v():
    torch.manual_seed(0)
    prepared, _ = _prepare(UnevenSplit(), (1, 3, 8, 8))
    tfl, out, ref = _run(prepared, (1, 3, 8, 8))
    assert tfl.meta["ops"]["SPLIT_V"] == 1 and sqnr(ref, out) >= 30
    report = backends.get("edgetpu").check(fxopt.lower(prepared, TFLiteBackend(int8_io=True)))
    assert [(i.op, i.kind) for i in report.issues] == [("SPLIT_V", "unsupported-op")]
    assert "not in the EdgeTPU's supported op list" in report.issues[0].reason


class TokenMixer(nn.Module):
    """Reshapes and permutes of NHWC maps: patches to tokens (permute + reshape), a linear on tokens, and back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(3, 8, 2, stride=2), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)  # [N, 8, 4, 4]
        n, c, h, w = y.shape
        t = torch.relu(self.fc(y.permute(0, 2, 3, 1).reshape(n, h * w, c)))  # tokens [N, 16, 8]
        back = t.transpose(1, 2).reshape(n, c, h, w)
        return self.out(back), y.flatten(2).transpose(1, 2)


def test_permutes_and_reshapes_follow_the_stored_order():
    torch.manual_seed(0)
    prepared, _ = _prepare(TokenMixer(), (1, 3, 8, 8))
    tfl, (out, tokens), (ref, ref_tokens) = _run(prepared, (1, 3, 8, 8), batch=3)
    assert "TRANSPOSE" not in tfl.meta["ops"]  # NHWC permuted to NHWC order and back: no data moves
    assert sqnr(ref, out) >= 30 and sqnr(ref_tokens, tokens) >= 30


def test_reshape_plan_and_collapse():
    # NHWC [1, 8, 8, 116] split into 2 groups: a view, stored [1, 8, 8, 2, 58]
    assert _reshape_plan((1, 116, 8, 8), (0, 2, 3, 1), (1, 2, 58, 8, 8)) == ((0, 2, 3, 1), (0, 3, 4, 1, 2))
    # the shuffled order cannot merge back without moving data: the input must be re-ordered first
    assert _reshape_plan((1, 58, 2, 8, 8), (0, 3, 4, 2, 1), (1, 116, 8, 8)) == ((0, 3, 4, 1, 2), (0, 2, 3, 1))
    # that move on [N, 8, 8, 2, 58]: one transpose of [N, 64, 2, 58], the batch kept apart
    assert _collapse((1, 8, 8, 2, 58), [0, 1, 2, 4, 3]) == ((1, 64, 2, 58), [0, 1, 3, 2])
    assert _reshape_plan((2, 3, 4), (0, 1, 2), (3, 2, 4)) is None  # the batch changes


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.enc, self.head = nn.TransformerEncoder(layer, 1), nn.Linear(32, 5)

    def forward(self, x):
        return torch.softmax(self.head(self.enc(x)), -1)


def test_transformer_encoder_is_refused_naming_each_op_and_what_to_do():
    prepared, _ = _prepare(TinyEncoder(), (1, 8, 32), n=1)
    with pytest.raises(UnsupportedError) as err:
        fxopt.lower(prepared, "tflite")
    text = str(err.value)
    assert "(layer_norm): runs in float" in text and "no int8 LayerNorm kernel" in text
    assert "(scaled_dot_product_attention): runs in float" in text and "BATCH_MATMUL" in text
    assert "(softmax): runs in float" in text and "apply softmax on the host" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shufflenet_v2_x1_0", "efficientnet_b0", "regnet_x_400mf", "resnext50_32x4d"])
def test_zoo_full_int8(name):
    torch.manual_seed(0)
    model = trained_looking(getattr(torchvision.models, name)(weights=None))
    prepared, _ = _prepare(model, (1, 3, 64, 64), n=4)
    _, out, ref = _run(prepared, (1, 3, 64, 64))
    assert sqnr(ref, out) >= 30, sqnr(ref, out)
    _tpu_ok(prepared)
