"""lower_int8 on small hand-built prepared graphs: structure, numerics vs float, errors, both engines."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import backends, meta
from fxopt.quant.nn import int8 as qm
from fxopt.backends.lowering import lower_int8
from fxopt.quant.nn import QuantizedModel
from fxopt.quant.stubs import DeQuantStub
from tests.helpers import calibrate, prepare_by_hand, sqnr

warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
BACKENDS = ["x86", "qnnpack"]


def lowered(model, example, backend, batches=None, **kw) -> QuantizedModel:
    gm = prepare_by_hand(model, example, backend, **kw)
    calibrate(gm, batches or [tuple(torch.randn_like(e) for e in example) for _ in range(4)] + [example])
    return backends.get(backend).lower(gm)


def modules_of(q: QuantizedModel, cls) -> list[nn.Module]:
    return [m for m in q.modules() if isinstance(m, cls)]


def call_targets(q: QuantizedModel) -> list:
    return [n.target for n in q.graph.nodes if n.op == "call_function"]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding="same")  # symmetric same
        self.c2 = nn.Conv2d(8, 8, 4, padding="same")  # asymmetric same: odd pixel after
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=8, bias=False)
        self.c3 = nn.Conv2d(8, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = self.c2(x).relu()
        x = F.relu6(self.dw(x))
        x = F.pad(x, (1, 1, 2, 2))  # symmetric: folded into c3
        x = self.c3(x)
        x = F.pad(x, (0, 1, 0, 1))  # asymmetric, before pooling: kept as a quantized pad
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_convnet_structure_and_numerics(backend):
    model = ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    q = lowered(model, (x,), backend)
    assert isinstance(q, QuantizedModel) and meta.backend_of(q) == backend
    convs = modules_of(q, qm.QConv)
    assert len(convs) == 4 and len(modules_of(q, qm.QLinear)) == 1
    assert [c.relu for c in convs] == [True, True, True, False]  # relu, relu, relu6 absorbed; c3 plain
    assert convs[3].padding == [2, 1]  # the F.pad folded into c3
    assert convs[1].padding == [1, 1]  # 'same' with k=4: 1 before, 2 after -> 1 + explicit pad
    assert call_targets(q).count(F.pad) == 2  # c2's extra pixel and the asymmetric pad
    assert call_targets(q).count(torch.quantize_per_tensor) == 1
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in q.modules())
    # the absorbed relu6 clamps at 6: conv output qparams cover at most [0, 6]
    assert convs[2].zero_point == 0 and convs[2].scale * 255 <= 6.0 + 1e-6
    with torch.no_grad():
        for batch in (1, 5):  # any batch size
            xb = torch.randn(batch, 3, 16, 16)
            assert sqnr(model(xb), q(xb)) > 25


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv1d_conv3d_bias_none(backend):
    m1 = nn.Sequential(nn.Conv1d(4, 8, 5, stride=2, padding=2, bias=False), nn.ReLU(), nn.Conv1d(8, 4, 3)).eval()
    x1 = torch.randn(2, 4, 32)
    q1 = lowered(m1, (x1,), backend)
    assert len(modules_of(q1, qm.QConv)) == 2
    with torch.no_grad():
        assert sqnr(m1(x1), q1(x1)) > 30
    m3 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU()).eval()
    x3 = torch.randn(1, 2, 6, 6, 6)
    q3 = lowered(m3, (x3,), backend)
    with torch.no_grad():
        assert sqnr(m3(x3), q3(x3)) > 30


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.ln = nn.LayerNorm(8)
        self.bn = nn.BatchNorm2d(4).eval()

    def forward(self, x):
        y = self.a(x)
        z = F.relu(y + self.b(x))  # add + relu -> add_relu
        z = self.bn(torch.relu(z))  # BN after ReLU: not foldable
        w = torch.cat([z, x * y], dim=1)  # mul, cat
        w = F.max_pool2d(w, 2)
        return self.ln(torch.sigmoid(w) + F.hardswish(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_mul_cat_norms_are_int8(backend):
    model = Residual().eval()
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 16, 16)
    model.ln = nn.LayerNorm(8)
    q = lowered(model, (x,), backend)
    names = {type(m).__name__ for m in q.modules()}
    assert {"QAdd", "QMul", "QCat", "QBatchNorm", "QHardswish", "QLayerNorm"} <= names
    adds = modules_of(q, qm.QAdd)
    assert [a.relu for a in adds if type(a) is qm.QAdd] == [True, False]
    assert meta.float_islands(q) == []
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 25


class DetectionHead(nn.Module):
    """Boxes in pixels concatenated with scores in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.box = nn.Linear(16, 4)
        self.score = nn.Linear(16, 3)
        with torch.no_grad():  # box coordinates: hundreds of pixels
            self.box.weight.mul_(400)
            self.box.bias.fill_(300)

    def forward(self, x):
        return torch.cat([self.box(x), torch.sigmoid(self.score(x))], dim=1)


def test_cat_of_very_different_ranges_stays_float():
    model = DetectionHead().eval()
    x = torch.randn(8, 16)
    q = lowered(model, (x,), "x86")
    islands = meta.float_islands(q)
    assert [i.op for i in islands] == ["cat"] and "max_range_ratio" in islands[0].reason
    assert not modules_of(q, qm.QCat)
    with torch.no_grad():
        ref, out = model(x), q(x)
    scores_ref, scores = ref[:, 4:], out[:, 4:]
    assert sqnr(scores_ref, scores) > 30  # the small branch survives
    # a lenient threshold forces the cat into int8: then the scores are wiped out
    spec = backends.get("x86").spec
    from dataclasses import replace

    gm = calibrate(prepare_by_hand(model, (x,), "x86"), [x])
    forced = lower_int8(gm, replace(spec, max_range_ratio=1e9))
    assert modules_of(forced, qm.QCat)
    with torch.no_grad():
        assert sqnr(scores_ref, forced(x)[:, 4:]) < 20


def test_lowered_model_runs_under_any_global_engine():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    q = lowered(model, (x,), "qnnpack")
    before = torch.backends.quantized.engine
    outs = []
    for engine in ("qnnpack", backends.get("x86").spec.engine):
        torch.backends.quantized.engine = engine
        try:
            with torch.no_grad():
                outs.append(q(x))
            assert torch.backends.quantized.engine == engine  # restored
        finally:
            torch.backends.quantized.engine = before
    assert torch.equal(outs[0], outs[1])


def test_deepcopy_report_and_islands_of_lowered_model():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.GELU(), nn.Flatten()).eval()
    x = torch.randn(1, 3, 10, 10)
    q = lowered(model, (x,), "x86")
    copied = copy.deepcopy(q)
    with torch.no_grad():
        assert torch.equal(copied(x), q(x))
    from fxopt.report import report

    # int8 weights counted as int8 (per-channel qparams and float biases weigh a lot in a model this small)
    assert report(q).total_bytes < 0.35 * report(model).total_bytes
    assert meta.backend_of(copied) == "x86" and meta.float_islands(copied) == meta.float_islands(q)
    q.load_state_dict(copied.state_dict())
    with torch.no_grad():
        assert torch.equal(copied(x), q(x))


def test_errors_uncalibrated_and_unprepared():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = prepare_by_hand(model, (x,), "x86")
    with pytest.raises(fxopt.CalibrationError, match="Calibrate"):
        backends.get("x86").lower(gm)
    with pytest.raises(fxopt.UnsupportedError, match="InsertQuantStubs.*PlaceObservers.*Calibrate"):
        backends.get("x86").lower(fxopt.trace(model, (x,)))


def test_embedding_is_weight_only_int8():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 64)
            self.fc = nn.Linear(64, 4)

        def forward(self, idx):
            return self.fc(self.emb(idx))

    model = M().eval()
    idx = torch.randint(0, 30, (2, 5))
    gm = prepare_by_hand(model, (idx,), "x86", inputs_from=("emb",))
    q = backends.get("x86").lower(calibrate(gm, [torch.randint(0, 30, (4, 5)) for _ in range(3)] + [idx]))
    from fxopt.quant.nn.dynamic import DynamicEmbedding
    from fxopt.report import report

    assert len(modules_of(q, DynamicEmbedding)) == 1 and len(modules_of(q, qm.QLinear)) == 1
    assert not modules_of(q, nn.Embedding)
    assert report(q).total_bytes < 0.4 * report(model).total_bytes
    with torch.no_grad():
        assert sqnr(model(idx), q(idx)) > 30


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(6) * 0.1)
        self.lw = nn.Parameter(torch.randn(4, 6) * 0.3)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w, self.b, stride=1, padding="same"))
        return F.linear(F.adaptive_avg_pool2d(y, 1).flatten(1), self.lw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_conv_and_linear(backend):
    model = Functional().eval()
    x = torch.randn(2, 3, 9, 9)
    q = lowered(model, (x,), backend)
    convs, linears = modules_of(q, qm.QConv), modules_of(q, qm.QLinear)
    assert len(convs) == 1 and convs[0].relu and convs[0].padding == [1, 1] and len(linears) == 1
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 30


def test_padding_modes_and_shared_pre_activation():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
            self.replicate = nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate")

        def forward(self, x):
            y = self.reflect(x)
            return torch.relu(y) + y, self.replicate(y)

    model = M().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = prepare_by_hand(model, (x,), "x86")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):  # the helper dequantizes one output: dequantize the tuple's items
        gm.add_submodule("fxopt_dequant_1", DeQuantStub())
        items = out.args[0].args[0]
        deqs = [gm.graph.call_module("fxopt_dequant_1", (i,)) for i in items]
    out.args = (tuple(deqs),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    q = backends.get("x86").lower(calibrate(gm, [x]))
    convs = modules_of(q, qm.QConv)
    assert len(convs) == 1 and not convs[0].relu  # y has two readers: relu not absorbed
    assert call_targets(q).count(F.pad) == 1  # reflect padding on the quantized tensor
    assert [i.reason for i in meta.float_islands(q)] == ["padding_mode='replicate' has no int8 kernel"]
    with torch.no_grad():
        for r, o in zip(model(x), q(x)):
            assert sqnr(r, o) > 28


class _ChannelShuffle(torch.nn.Module):
    """shufflenet's channel shuffle: transpose makes the tensor non-contiguous, contiguous() must stay."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.size()
        y = y.view(b, 2, c // 2, h, w)
        y = torch.transpose(y, 1, 2).contiguous()
        return y.view(b, -1, h, w)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_contiguous_after_transpose_is_kept(backend):
    import fxopt
    from fxopt import recipes

    model = _ChannelShuffle().eval()
    x = torch.randn(2, 4, 5, 5)
    q = fxopt.compile(model, recipes.static_int8([x], backend=backend), example_inputs=(x,), backend=backend)
    assert fxopt.compare(model, q, x).sqnr_db > 30
