"""``X86Backend(freeze=...)`` / ``QnnpackBackend(freeze=True)``: the lowered int8 graph runs as a frozen
TorchScript trace per input signature, bit-identical to the eager lowered graph, with an eager fallback.
x86's default is ``freeze="auto"`` (frozen, fallbacks logged instead of warned)."""

from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt import meta, recipes
from fxopt.backends.qnnpack import QnnpackBackend
from fxopt.backends.x86 import X86Backend
from fxopt.quant.nn import QConvPointwise, QuantizedModel
from fxopt.quant.nn.frozen import same_output
from fxopt.quant.nn.onednn import onednn_fusion_available

needs_onednn = pytest.mark.skipif(not onednn_fusion_available(), reason="needs oneDNN int8 kernels and a VNNI CPU")


def _prepared(model: nn.Module, shape: tuple, backend: str = "x86", n: int = 2):
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(2, *shape, generator=gen) for _ in range(n)]
    prepared = fxopt.compile(model.eval(), recipes.static_int8(calib, backend=backend), example_inputs=(calib[0][:1],))
    return prepared, calib


@pytest.fixture(scope="module")
def efficientnet():
    """EfficientNet-B0 at 48 px: conv+SiLU oneDNN kernels (the post-op scalars list), SE gates, residual adds."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None).eval()
    prepared, _ = _prepared(model, (3, 48, 48))
    return model, fxopt.lower(prepared, X86Backend(freeze=False)), fxopt.lower(prepared, X86Backend(freeze=True))


@needs_onednn
def test_frozen_efficientnet_is_bit_identical_at_two_batch_sizes(efficientnet):
    _, eager, frozen = efficientnet
    assert any(m.post_op == "swish" for m in frozen.modules() if isinstance(m, QConvPointwise))
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for batch in (1, 3, 1):
            x = torch.randn(batch, 3, 48, 48, generator=gen)
            assert torch.equal(frozen(x), eager(x))
    assert frozen.freeze_fallbacks == {}
    assert sorted(sig[0][0][0] for sig in frozen.frozen_signatures) == [1, 3]  # one trace per batch size
    for trace in frozen.frozen_traces.values():
        nodes = [n.kind() for n in trace.graph.nodes()]
        assert "onednn::qconv2d_pointwise" in nodes and "quantized::conv2d" in nodes
        assert "prim::CallMethod" not in nodes  # frozen: submodules inlined, weights are constants
        assert "onednn::qconv_prepack" not in nodes  # oneDNN weights packed once, read as attributes


@needs_onednn
def test_frozen_wrapper_keeps_the_graph_module_report_meta_and_state_dict(efficientnet):
    model, eager, frozen = efficientnet
    assert isinstance(frozen, QuantizedModel) and frozen.freeze and not eager.freeze
    assert isinstance(frozen.graph_module, torch.fx.GraphModule) and "freeze=True" in repr(frozen)
    assert meta.backend_of(frozen) == "x86"
    assert not any(isinstance(m, torch.jit.ScriptModule) for m in frozen.modules())  # traces are no submodules
    assert list(frozen.state_dict()) == list(eager.state_dict())
    assert fxopt.report(frozen).rows == fxopt.report(eager).rows
    assert fxopt.report(frozen).total_bytes < fxopt.report(model).total_bytes / 3
    # the user's float model is untouched
    assert not any(isinstance(m, QConvPointwise) for m in model.modules())


@needs_onednn
def test_frozen_model_save_load_and_load_state_dict_trace_again(efficientnet, tmp_path):
    _, eager, frozen = efficientnet
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        want = eager(x)
        assert torch.equal(frozen(x), want)
    fxopt.save(frozen, tmp_path / "m.pt")
    loaded = fxopt.load(tmp_path / "m.pt")
    assert isinstance(loaded, QuantizedModel) and loaded.freeze and loaded.frozen_signatures == []
    fxopt.save(eager, tmp_path / "e.pt")
    assert not fxopt.load(tmp_path / "e.pt").freeze
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    assert len(loaded.frozen_signatures) == 1
    # new weights invalidate the traces (they hold the old weights as constants)
    loaded.load_state_dict(eager.state_dict())
    assert loaded.frozen_signatures == []
    # a copy traces for itself (its own weights), the original's cache stays as it was
    twin = copy.deepcopy(frozen)
    assert twin.freeze and twin.frozen_signatures == [] and len(frozen.frozen_signatures) >= 1
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
        assert torch.equal(twin(x), want)
    assert twin.frozen_traces[twin.frozen_signatures[0]] is not frozen.frozen_traces[twin.frozen_signatures[0]]


class TwoHeads(nn.Module):
    """A residual conv net whose output holds a Python int next to the tensor (the tracer refuses it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x), 7


def test_untraceable_output_falls_back_to_the_eager_graph_with_a_warning():
    prepared, calib = _prepared(TwoHeads(), (8, 12, 12))
    eager, frozen = fxopt.lower(prepared, X86Backend(freeze=False)), fxopt.lower(prepared, X86Backend(freeze=True))
    x = calib[1]
    with torch.no_grad(), pytest.warns(UserWarning, match="runs the eager int8 graph: tracing failed"):
        out = frozen(x)
    assert out[1] == 7 and torch.equal(out[0], eager(x)[0])
    assert frozen.frozen_signatures == [] and "tracing failed" in next(iter(frozen.freeze_fallbacks.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per signature, then the eager graph runs silently
        with torch.no_grad():
            assert torch.equal(frozen(x)[0], eager(x)[0])
    with torch.no_grad(), pytest.warns(UserWarning, match="keyword or non-tensor arguments"):
        assert torch.equal(frozen(x=x)[0], eager(x)[0])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the direct trace below reads the input's shape
def test_fused_conv_add_silu_and_hardtanh_kernels_trace_exactly():
    """The oneDNN kernels with a post-op scalar list (hardtanh) and the binary sum form, traced and frozen."""
    if not onednn_fusion_available():
        pytest.skip("needs oneDNN int8 kernels and a VNNI CPU")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(32, 32, 3, padding=1)
            self.b = nn.Conv2d(32, 32, 3, padding=1)  # 5.3 M MACs on 24x24: enough for the add fusion
            self.c = nn.Conv2d(32, 32, 3, padding=1, groups=32)

        def forward(self, x):
            y = torch.relu(self.b(torch.relu(self.a(x))) + x)
            return nn.functional.silu(self.c(y))

    prepared, calib = _prepared(Block(), (32, 24, 24))
    eager = fxopt.lower(prepared, X86Backend(fuse_add=True, freeze=False))
    frozen = fxopt.lower(prepared, X86Backend(fuse_add=True, freeze=True))
    fused = [m for m in frozen.modules() if isinstance(m, QConvPointwise)]
    assert any(m.accum_qparams is not None for m in fused) and any(m.post_op == "swish" for m in fused)
    with torch.no_grad():
        for x in (calib[0], calib[1][:1]):
            assert torch.equal(frozen(x), eager(x))
    assert len(frozen.frozen_signatures) == 2 and frozen.freeze_fallbacks == {}
    # a post-op with a non-empty scalar list (hardtanh's bounds), traced on its own
    conv = nn.Conv2d(8, 8, 3, padding=1)
    w_scale = conv.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
    relu6 = QConvPointwise.from_float(conv, (w_scale, torch.zeros(8, dtype=torch.int64)), (0.05, 128), (0.03, 0),
                                      post_op="hardtanh", post_scalars=(0.0, 6.0))
    qx = torch.quantize_per_tensor(torch.randn(1, 8, 6, 6), 0.05, 128, torch.quint8)
    with torch.no_grad():
        want = relu6(qx)  # packs the weight for this shape first, as the frozen runtime's eager run does
        traced = torch.jit.freeze(torch.jit.trace(relu6, (qx,), check_trace=False).eval())
        assert "onednn::qconv_prepack" not in [n.kind() for n in traced.graph.nodes()]
        assert same_output(traced(qx), want)
        qy = torch.quantize_per_tensor(torch.randn(1, 8, 6, 6), 0.05, 128, torch.quint8)
        assert same_output(traced(qy), relu6(qy))  # the input's data is read, not baked in


def test_qnnpack_frozen_resnet18_is_bit_identical():
    torch.manual_seed(0)
    prepared, _ = _prepared(torchvision.models.resnet18(weights=None), (3, 32, 32), backend="qnnpack")
    eager, frozen = fxopt.lower(prepared, "qnnpack"), fxopt.lower(prepared, QnnpackBackend(freeze=True))
    assert frozen.engine == "qnnpack" and frozen.freeze
    with torch.no_grad():
        for batch in (1, 2):
            x = torch.randn(batch, 3, 32, 32)
            assert torch.equal(frozen(x), eager(x))
    assert len(frozen.frozen_signatures) == 2 and frozen.freeze_fallbacks == {}


def test_same_output_compares_structure_and_bits():
    q = torch.quantize_per_tensor(torch.rand(2, 3), 0.1, 2, torch.quint8)
    r = torch.quantize_per_tensor(torch.rand(2, 3), 0.2, 2, torch.quint8)
    pair = collections.namedtuple("pair", "a b")
    t = torch.tensor([1.0, float("nan")])
    assert same_output((q, {"t": t}), (q.clone(), {"t": t.clone()}))
    assert not same_output(q, torch.quantize_per_tensor(q.dequantize(), 0.05, 2, torch.quint8))
    assert not same_output(q, r) and not same_output(t, t + 1e-6)
    assert not same_output(pair(t, t), (t, t))  # a namedtuple turned into a tuple by the tracer
    assert not same_output([t], [t, t]) and not same_output({"a": t}, {"b": t})


ZOO = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0",
       "densenet121", "googlenet", "regnet_x_400mf", "squeezenet1_1"]  # the README's 10 classifiers


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
@pytest.mark.parametrize("name", ZOO)
def test_frozen_zoo_is_bit_identical_without_fallback(name, backend):
    """What x86's frozen default rests on: every classifier traces, freezes and matches bit for bit."""
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    with torch.no_grad():  # BatchNorm statistics that have seen data, so that activation ranges are realistic
        model.train()(torch.randn(4, 3, 64, 64))
    prepared, _ = _prepared(model, (3, 64, 64), backend=backend)
    cls = X86Backend if backend == "x86" else QnnpackBackend
    eager, frozen = fxopt.lower(prepared, cls(freeze=False)), fxopt.lower(prepared, cls(freeze=True))
    with torch.no_grad():
        for batch in (1, 2):
            x = torch.randn(batch, 3, 64, 64)
            assert torch.equal(frozen(x), eager(x))
    assert len(frozen.frozen_signatures) == 2 and frozen.freeze_fallbacks == {}


def test_x86_default_is_the_quiet_frozen_runtime(caplog):
    """``backend="x86"`` runs frozen traces; what it cannot trace runs eagerly, logged, with no warning."""
    prepared, calib = _prepared(TwoHeads(), (8, 12, 12))
    default = fxopt.lower(prepared, "x86")
    eager = fxopt.lower(prepared, X86Backend(freeze=False))
    assert default.freeze == "auto" and eager.freeze is False and "freeze='auto'" in repr(default)
    assert fxopt.backends.get("x86").freeze == "auto"
    x = calib[1]
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="fxopt.quant.nn.frozen"):
        warnings.simplefilter("error")  # no warning from the default, even when it falls back
        with torch.no_grad():
            out = default(x)
            assert torch.equal(out[0], eager(x)[0]) and out[1] == 7
            assert torch.equal(default(x=x)[0], eager(x)[0])
    assert "tracing failed" in caplog.text and "keyword or non-tensor arguments" in caplog.text
    assert "call" in default.freeze_fallbacks and len(default.freeze_fallbacks) == 2  # kwargs call + the signature
    with pytest.raises(ValueError, match="freeze must be True, False or 'auto'"):
        X86Backend(freeze="yes")


def test_x86_default_freezes_and_round_trips_the_mode(tmp_path):
    prepared, calib = _prepared(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)), (3, 10, 10))
    default, eager = fxopt.lower(prepared, "x86"), fxopt.lower(prepared, X86Backend(freeze=False))
    with torch.no_grad():
        assert torch.equal(default(calib[0]), eager(calib[0]))
    assert len(default.frozen_signatures) == 1 and default.freeze_fallbacks == {}
    fxopt.save(default, tmp_path / "d.pt")
    assert fxopt.load(tmp_path / "d.pt").freeze == "auto"
