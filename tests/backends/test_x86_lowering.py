"""x86 kernel choices: oneDNN packing of wide grouped convs, conv+SiLU and conv+add(+ReLU) fusion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt import recipes
from fxopt.quant.nn.onednn import QConvPointwise, onednn_fusion_available
from fxopt.quant.nn import QConv
from fxopt.backends.x86 import X86Backend

pytestmark = pytest.mark.skipif(not onednn_fusion_available(), reason="needs oneDNN int8 kernels and a VNNI CPU")


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-20)))


def _prepared(model: nn.Module, size: int = 16, channels: int = 8, n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    calib = [torch.randn(2, channels, size, size, generator=gen) for _ in range(n)]
    prepared = fxopt.compile(model.eval(), recipes.static_int8(calib), example_inputs=(calib[0],))
    return prepared, calib


def _modules(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


class Depthwise(nn.Module):
    def __init__(self, channels: int = 116) -> None:
        super().__init__()
        self.expand = nn.Conv2d(8, channels, 1)
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.dw(torch.relu(self.expand(x))))


def test_wide_depthwise_conv_is_packed_with_onednn_and_matches_fbgemm():
    torch.manual_seed(0)
    prepared, calib = _prepared(Depthwise(116))
    fast = fxopt.lower(prepared, "x86")
    dw = [m for m in _modules(fast, QConv) if m.groups == 116]
    assert len(dw) == 1 and dw[0].engine == "onednn"
    assert all(m.engine != "onednn" for m in _modules(fast, QConv) if m.groups == 1)
    plain = X86Backend(onednn=False).lower(copy.deepcopy(prepared))
    assert [m.engine for m in _modules(plain, QConv) if m.groups == 116] != ["onednn"]
    with torch.no_grad():
        a, b = fast(calib[0]), plain(calib[0])
    # same int8 arithmetic, two libraries: equal up to a rounding step or two
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    assert _sqnr(b, a) > 35.0


class ConvSiLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.act1 = nn.SiLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.conv3(torch.nn.functional.silu(self.conv2(self.act1(self.conv1(x)))))


def test_conv_silu_becomes_one_int8_kernel_without_float_islands():
    torch.manual_seed(0)
    model = ConvSiLU().eval()
    prepared, calib = _prepared(model)
    lowered = fxopt.lower(prepared, "x86")
    fused = _modules(lowered, QConvPointwise)
    assert [m.post_op for m in fused] == ["swish", "swish"]
    # the depthwise one is on the backend's depthwise weight grid, like the simulation (and fbgemm)
    assert [m.groups for m in fused] == [1, 16]
    assert int(fused[1].weight.int_repr().abs().max()) <= 63 < int(fused[0].weight.int_repr().abs().max())
    code = lowered.graph_module.code
    assert "silu" not in code and code.count(".dequantize()") == 1  # only the output leaves int8
    # the conv's own output lives only inside the fused kernel: the check compares after the SiLU
    fxopt.lower(prepared, "x86", check=True)
    unfused = X86Backend(fuse_unary=False).lower(copy.deepcopy(prepared))
    assert "silu" in unfused.graph_module.code
    with torch.no_grad():
        ref, a, b = model(calib[1]), lowered(calib[1]), unfused(calib[1])
    assert _sqnr(ref, a) > 25.0
    assert abs(_sqnr(ref, a) - _sqnr(ref, b)) < 3.0


class Block(nn.Module):
    """A ResNet basic block; ``reuse`` also reads the identity after the add."""

    def __init__(self, reuse: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 16, 1)
        self.reuse = reuse

    def forward(self, x):
        x = self.head(x)
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        return y + x if self.reuse else y


@pytest.mark.parametrize("reuse", [False, True])
def test_conv_add_relu_fusion_in_place_only_when_the_identity_is_dead(reuse):
    torch.manual_seed(0)
    model = Block(reuse).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 16, 48, 48, generator=gen) for _ in range(4)]
    prepared = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(calib[0],))
    fused_model = X86Backend(fuse_add=True).lower(copy.deepcopy(prepared))
    fused = [m for m in _modules(fused_model, QConvPointwise) if m.accum_qparams is not None]
    assert len(fused) == 1 and fused[0].relu
    assert fused[0].accum_inplace is (not reuse)
    default = fxopt.lower(prepared, "x86")
    assert not [m for m in _modules(default, QConvPointwise) if m.accum_qparams is not None]
    with torch.no_grad():
        ref, a, b = model(calib[2]), fused_model(calib[2]), default(calib[2])
    assert _sqnr(ref, a) > 25.0
    # one rounding instead of two: the fused kernel is at least as close to float as conv then add
    assert _sqnr(ref, a) >= _sqnr(ref, b) - 0.5


def test_fused_module_survives_deepcopy_state_dict_and_fxopt_save(tmp_path):
    torch.manual_seed(0)
    model = ConvSiLU().eval()
    prepared, calib = _prepared(model)
    lowered = fxopt.lower(prepared, "x86")
    x = calib[0]
    with torch.no_grad():
        expected = lowered(x)
        assert torch.equal(copy.deepcopy(lowered)(x), expected)
        path = tmp_path / "silu.pt"
        fxopt.save(lowered, path)
        assert torch.equal(fxopt.load(path)(x), expected)
        fresh = copy.deepcopy(lowered)
        fresh.load_state_dict(lowered.state_dict())
        assert torch.equal(fresh(x), expected)
    size = fxopt.report(lowered).total_bytes
    assert size < sum(p.numel() * 4 for p in model.parameters()) / 2  # int8 weights are counted as int8


def test_packs_per_input_shape_and_runs_other_batch_sizes():
    torch.manual_seed(0)
    model = ConvSiLU().eval()
    prepared, calib = _prepared(model)
    lowered = fxopt.lower(prepared, "x86")
    conv = _modules(lowered, QConvPointwise)[0]
    assert list(conv._packs) == [(2, 8, 16, 16)]  # packed at lowering for the example input
    with torch.no_grad():
        out = lowered(torch.randn(5, 8, 16, 16))
    assert out.shape == (5, 8, 16, 16) and (5, 8, 16, 16) in conv._packs


def test_torchvision_efficientnet_and_shufflenet_have_no_float_islands():
    torch.manual_seed(0)
    for name in ("efficientnet_b0", "shufflenet_v2_x1_0"):
        model = torchvision.models.get_model(name, weights=None).eval()
        calib = [torch.randn(1, 3, 64, 64) for _ in range(2)]
        prepared = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(calib[0],))
        # layer by layer against the simulation; the fused depthwise conv+SiLU kernels use the simulation's
        # depthwise weight grid
        lowered = fxopt.lower(prepared, "x86", check=True)
        islands = fxopt.meta.float_islands(lowered.graph_module)
        if name == "efficientnet_b0":
            assert islands == [] and lowered.graph_module.code.count(".dequantize()") == 1
            assert len([m for m in _modules(lowered, QConvPointwise) if m.post_op == "swish"]) == 49
            # the 16 SE fc2 convs (on 1x1 maps) are packed with fbgemm, every other plain conv with the x86 engine
            assert len([m for m in _modules(lowered, QConv) if m.engine == "fbgemm"]) == 16
        else:  # only shape arithmetic (on ints) and the final mean stay float
            assert {i.op for i in islands} <= {"floordiv", "mean"}
            assert {m.engine for m in _modules(lowered, QConv) if m.groups > 100} == {"onednn"}


class SqueezeExcite(nn.Module):
    """conv -> SiLU -> squeeze-excitation (torchvision's block) -> project, as in EfficientNet."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.expand = nn.Conv2d(8, channels, 1)
        self.act = nn.SiLU()
        self.se = torchvision.ops.SqueezeExcitation(channels, 8, activation=nn.SiLU)
        self.project = nn.Conv2d(channels, 8, 1)

    def forward(self, x):
        return self.project(self.se(self.act(self.expand(x))))


@pytest.mark.parametrize("size", [7, 20])  # the gate times a small map (channels-last view) and a larger one
def test_squeeze_excitation_gate_float_on_request_and_both_match_the_simulation(size):
    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    prepared, calib = _prepared(model, size=size)
    lowered = fxopt.lower(prepared, X86Backend(float_unit_maps=True), check=True)  # NumericsError if a layer diverges
    islands = fxopt.meta.float_islands(lowered.graph_module)
    assert sorted(i.node for i in islands) == ["se_activation", "se_fc1", "se_fc2"]
    float_convs = [m for m in lowered.modules() if type(m) is nn.Conv2d]
    assert len(float_convs) == 2
    assert len(_modules(lowered, QConvPointwise)) == 1  # expand + SiLU, one oneDNN kernel
    assert all("1x1 map" in i.reason for i in islands if i.op == "conv2d")
    assert [i.reason for i in islands if i.op == "silu"] == [
        "silu runs in int8 only fused into the conv before it; its input se_fc1 is float"]
    all_int8 = fxopt.lower(prepared, "x86", check=True)  # the default: the gate in int8
    assert fxopt.meta.float_islands(all_int8.graph_module) == []
    assert not [m for m in all_int8.modules() if type(m) is nn.Conv2d]
    with torch.no_grad():
        x = calib[1]
        ref, a, b = model(x), lowered(x), all_int8(x)
        out = lowered(torch.randn(3, 8, size, size))  # other batch sizes too
    assert out.shape == (3, 8, size, size)
    assert _sqnr(ref, a) > 25.0
    assert _sqnr(ref, a) >= _sqnr(ref, b) - 0.5  # a float gate is never worse than an int8 one


@pytest.mark.parametrize("shape", [(1, 24, 7, 7), (2, 24, 14, 14), (2, 24, 20, 20)])
@pytest.mark.parametrize("gate_batch", [1, 2])
def test_qmul_channel_gate_equals_the_materialized_broadcast(shape, gate_batch):
    from fxopt.quant.nn.int8 import QMul, _broadcast_materialized, _gate_view

    gen = torch.Generator().manual_seed(0)
    x = torch.quantize_per_tensor(torch.randn(shape, generator=gen), 0.05, 128, torch.quint8)
    x = x.contiguous(memory_format=torch.channels_last)
    gate = torch.quantize_per_tensor(torch.rand(gate_batch if shape[0] > 1 else 1, shape[1], 1, 1, generator=gen),
                                     1 / 256, 0, torch.quint8)
    small = shape[2] * shape[3] <= 196
    assert (_gate_view(x, gate) is not None) is small and (_gate_view(gate, x) is not None) is small
    assert _gate_view(x.contiguous(), gate) is None  # only channels-last maps take the view
    for relu in (False, True):
        mul = QMul(0.03, 100, relu=relu)
        a, b = _broadcast_materialized(x, gate)
        expected = (torch.ops.quantized.mul_relu if relu else torch.ops.quantized.mul)(a, b, 0.03, 100)
        for out in (mul(x, gate), mul(gate, x)):
            assert out.shape == shape and out.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(out.int_repr(), expected.int_repr())
            assert (out.q_scale(), out.q_zero_point()) == (0.03, 100)


class ReLUSqueezeExcite(nn.Module):
    """MobileNetV3's gate: conv -> ReLU -> squeeze-excitation with ReLU (conv + ReLU, conv, sigmoid) -> project."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.expand = nn.Conv2d(8, channels, 1)
        self.se = torchvision.ops.SqueezeExcitation(channels, 8)
        self.project = nn.Conv2d(channels, 8, 1)

    def forward(self, x):
        return self.project(self.se(torch.relu(self.expand(x))))


def test_convs_on_unit_maps_are_packed_with_fbgemm_and_match_the_onednn_packing(tmp_path):
    torch.manual_seed(0)
    model = ReLUSqueezeExcite().eval()
    prepared, calib = _prepared(model, size=12)
    lowered = fxopt.lower(prepared, "x86", check=True)  # NumericsError if a layer diverges from the simulation
    convs = dict(lowered.graph_module.named_modules())
    assert (convs["se.fc1"].engine, convs["se.fc1"].relu) == ("fbgemm", True)
    assert convs["se.fc2"].engine == "fbgemm"
    assert convs["expand"].engine != "fbgemm" and convs["project"].engine != "fbgemm"  # 12x12 maps
    onednn = X86Backend(fbgemm_unit_maps=False).lower(copy.deepcopy(prepared))
    assert "fbgemm" not in {m.engine for m in _modules(onednn, QConv)}
    plain = X86Backend(onednn=False).lower(copy.deepcopy(prepared))  # the generic walk keeps the engine's choice
    assert "fbgemm" not in {m.engine for m in _modules(plain, QConv)}
    with torch.no_grad():
        x = calib[1]
        ref, a, b = model(x), lowered(x), onednn(x)
        out = lowered(torch.randn(3, 8, 12, 12))  # other batch sizes too
        fxopt.save(lowered, tmp_path / "se.pt")
        loaded = fxopt.load(tmp_path / "se.pt")
        assert torch.equal(loaded(x), a)
    assert dict(loaded.graph_module.named_modules())["se.fc2"].engine == "fbgemm"
    assert out.shape == (3, 8, 12, 12)
    # same int8 arithmetic on both libraries (int32 sums on a VNNI CPU): at most one output step apart
    step = lowered.graph_module.get_submodule("project").scale
    assert (a - b).abs().max() <= step + 1e-6
    assert _sqnr(ref, a) > 25.0
