"""fold-bn: structure, exact numerics, every 'do not fold' case, torchvision models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxopt
from fxopt import passes as fp


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running stats and affine parameters for every BatchNorm of ``model``."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def count(gm: torch.fx.GraphModule, kind: type) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind))


def fold(model: nn.Module, *inputs: torch.Tensor):
    model = randomize_bn(model).eval()
    gm = torch.fx.symbolic_trace(model)
    if inputs:
        ShapeProp(gm).propagate(*inputs)
    result = fp.FoldBatchNorm()(gm)
    fxopt.verify(gm)
    return model, gm, result


@pytest.mark.parametrize(
    "layer, bn, shape",
    [
        (nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), (2, 4, 10)),
        (nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 9, 9)),
        (nn.Conv3d(3, 5, 2, padding_mode="reflect", padding=1), nn.BatchNorm3d(5), (1, 3, 5, 5, 5)),
        (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 7)),
        (nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), (2, 4, 6, 6)),
        (nn.ConvTranspose3d(2, 4, 2, bias=False), nn.BatchNorm3d(4), (1, 2, 3, 3, 3)),
        (nn.Linear(8, 5), nn.BatchNorm1d(5), (6, 8)),
        (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), (2, 3, 8, 8)),
    ],
)
def test_folds_and_matches(layer, bn, shape):
    x = torch.randn(shape)
    model, gm, result = fold(nn.Sequential(layer, bn), x)
    assert result.modified and result.stats["folded"] == 1 and not result.notes
    assert count(gm, nn.modules.batchnorm._BatchNorm) == 0
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())  # module deleted
    assert gm.get_submodule("0") is not layer  # a new module, the original is untouched
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_functional_batch_norm_with_attribute_stats():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)
            self.gamma = nn.Parameter(torch.rand(4) + 0.5)
            self.beta = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)

    x = torch.randn(2, 3, 8, 8)
    model, gm, result = fold(M(), x)
    assert result.stats["folded"] == 1
    assert not any(n.target is F.batch_norm for n in gm.graph.nodes)
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)
    assert not hasattr(gm, "mean") and not hasattr(gm, "gamma")
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


class _ConvBNUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _ReLUBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class _SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class _Linear3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):  # x: [N, 5, 6] -> fc -> [N, 5, 5]; BN1d normalizes dim 1 = positions
        return self.bn(self.fc(x))


@pytest.mark.parametrize(
    "model, shape, why",
    [
        (_ConvBNUsedTwice(), (2, 3, 8, 8), "also used by add"),
        (_ReLUBetween(), (2, 3, 8, 8), "not a Conv/ConvTranspose/Linear"),
        (_SharedConv(), (2, 4, 8, 8), "called more than once"),
        (_Linear3D(), (2, 5, 6), "3-D"),
    ],
)
def test_invalid_cases_are_left_with_a_note(model, shape, why):
    x = torch.randn(shape)
    model, gm, result = fold(model, x)
    assert not result.modified and result.stats["folded"] == 0
    assert any(why in note for note in result.notes), result.notes
    assert count(gm, nn.modules.batchnorm._BatchNorm) == 1
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_training_mode_and_no_running_stats_are_not_folded():
    seq = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                     nn.BatchNorm2d(4, track_running_stats=False))).eval()
    seq[1].train()
    gm = torch.fx.symbolic_trace(seq)
    result = fp.FoldBatchNorm()(gm)
    assert not result.modified
    assert any("training mode" in n for n in result.notes) and any("running statistics" in n for n in result.notes)


def test_channel_mismatch_is_reported():
    seq = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    gm = torch.fx.symbolic_trace(seq)
    gm.get_submodule("0").out_features = 3
    gm.get_submodule("1").running_mean = torch.zeros(7)
    gm.get_submodule("1").running_var = torch.ones(7)
    result = fp.FoldBatchNorm()(gm)
    assert not result.modified and "channel mismatch" in result.notes[0]


def test_linear_rank_unknown_without_shapes_but_known_after_flatten():
    seq = randomize_bn(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))).eval()
    result = fp.FoldBatchNorm()(torch.fx.symbolic_trace(seq))
    assert not result.modified and "unknown" in result.notes[0]
    seq = randomize_bn(nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.BatchNorm1d(3))).eval()
    gm = torch.fx.symbolic_trace(seq)
    assert fp.FoldBatchNorm()(gm).stats["folded"] == 1
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(gm(x), seq(x), atol=1e-5, rtol=1e-5)


def test_hooked_conv_is_not_folded():
    seq = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    seen = []
    seq[0].register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    gm = torch.fx.symbolic_trace(seq)
    result = fp.FoldBatchNorm()(gm)
    assert not result.modified and "forward hooks" in result.notes[0]


def test_nothing_to_do_is_not_modified():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    code = gm.code
    result = fp.FoldBatchNorm()(gm)
    assert result.modified is False and result.stats["folded"] == 0 and gm.code == code


def test_user_model_untouched_through_compile():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    weight = model[0].weight.clone()
    x = torch.randn(2, 3, 16, 16)
    out = fxopt.compile(model, passes=[fp.FoldBatchNorm()], example_inputs=(x,), check=1e-5)
    assert torch.equal(model[0].weight, weight) and isinstance(model[1], nn.BatchNorm2d)
    assert fxopt.records(out)[0].stats["folded"] == 1
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_all_bns_folded(arch):
    model = randomize_bn(getattr(torchvision.models, arch)(weights=None)).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    model, gm, result = fold(model)
    assert result.stats["folded"] == n_bn and not result.notes
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf"])
def test_torchvision_zoo_slow(arch):
    model = randomize_bn(getattr(torchvision.models, arch)(weights=None)).eval()
    x = torch.randn(2, 3, 64, 64)
    model, gm, result = fold(model)
    assert result.stats["folded"] > 0
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4
