"""prune-channels: every coupling kind removes the right channels exactly, reasons for groups left alone,
errors, and the torchvision zoo (small inputs by default, the heavy models under -m slow)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxopt
from fxopt import passes as fp
from fxopt.errors import FxoptError


def _zero(layer: nn.Module, rows) -> None:
    """Make output channels ``rows`` of ``layer`` exactly zero (so L1 ranks them last and removing them is exact)."""
    with torch.no_grad():
        layer.weight[list(rows)] = 0
        if layer.bias is not None:
            layer.bias[list(rows)] = 0


def _zero_bn(bn: nn.BatchNorm2d, rows) -> None:
    with torch.no_grad():  # bn(0) == 0 on these channels
        bn.running_mean[list(rows)] = 0
        bn.bias[list(rows)] = 0


class Head(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 6, 1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1), \
            nn.Conv2d(16, 16, 3, padding=1), Head(16)
        _zero(self.a, range(0, 16, 2))
        _zero(self.b, range(0, 16, 2))
        _zero(self.head.conv, [1, 4, 5])

    def forward(self, x):
        a = self.a(torch.relu(self.stem(x)))
        return self.head(torch.relu(self.b(torch.relu(a))) + a)


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1), nn.Conv2d(8, 10, 1)
        self.bn, self.head = nn.BatchNorm2d(16), Head(16)
        _zero(self.a, [0, 1, 2])
        _zero(self.b, [5, 6, 7, 8, 9])
        _zero_bn(self.bn, [0, 1, 2, 6 + 5, 6 + 6, 6 + 7, 6 + 8, 6 + 9])
        _zero(self.head.conv, [0, 2, 3])

    def forward(self, x):
        s = torch.relu(self.stem(x))
        return self.head(torch.relu(self.bn(torch.cat([self.a(s), self.b(s)], 1))))


class Depthwise(nn.Module):
    def __init__(self, groups: int = 16):
        super().__init__()
        self.stem, self.pw = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=False)
        self.head = Head(16)
        if groups == 16:
            _zero(self.pw, range(8, 16))
        else:  # grouped: the same local channels in every group of 4
            _zero(self.pw, [i for i in range(16) if i % 4 in (1, 3)])
            _zero(self.dw, [i for i in range(16) if i % 4 in (0, 2)])
        _zero(self.head.conv, [0, 1, 2])

    def forward(self, x):
        return self.head(torch.relu(self.dw(torch.relu(self.pw(torch.relu(self.stem(x)))))))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 32), nn.Linear(32, 10)
        _zero(self.a, [1, 3, 5])
        _zero(self.fc1, range(16))

    def forward(self, x):
        y = torch.relu(self.a(torch.relu(self.stem(x))))
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1)
        self.fc1, self.fc2, self.head = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1), Head(16)
        _zero(self.a, range(8))
        _zero(self.fc2, range(8))
        _zero(self.fc1, [0, 1])
        _zero(self.head.conv, [3, 4, 5])

    def forward(self, x):
        y = torch.relu(self.a(torch.relu(self.stem(x))))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * s)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.head = Head(16)
        _zero(self.a, [0, 2, 4, 6])
        _zero(self.b, [0, 2, 4, 6])
        _zero(self.head.conv, [0, 1, 2])

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.cat([self.a(s), self.b(s)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)  # channel shuffle
        return self.head(y)


CASES = {
    "residual-add": (Residual, {"a": 8, "b": 8, "head.conv": 3}),
    "cat-offsets+bn": (Cat, {"a": 3, "b": 5, "bn": 8, "head.conv": 3}),
    "depthwise": (Depthwise, {"pw": 8, "dw": 8, "head.conv": 3}),
    "grouped": (lambda: Depthwise(groups=4), {"pw": 8, "dw": 8, "head.conv": 3}),
    "flatten-linear": (FlattenLinear, {"a": 3, "fc1": 16}),
    "squeeze-excite": (SqueezeExcite, {"a": 8, "fc1": 2, "fc2": 8, "head.conv": 3}),
    "channel-shuffle": (Shuffle, {"a": 4, "b": 4, "head.conv": 3}),
}


def _channels(m: nn.Module) -> int:
    return getattr(m, "out_channels", None) or getattr(m, "out_features", None) or m.num_features


@pytest.mark.parametrize("case", list(CASES))
def test_coupled_channels_are_removed_together_and_exactly(case):
    build, expected = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxopt.compile(model, [fp.PruneChannels(0.5)], example_inputs=(x,))
    for name, channels in expected.items():
        assert _channels(gm.get_submodule(name)) == channels, name
    for batch in (1, 2, 5):  # the zeroed channels went: the function is unchanged, at any batch size
        xb = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(gm(xb), model(xb), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in gm.parameters()) < sum(p.numel() for p in model.parameters())
    assert _channels(gm.get_submodule("stem")) == 8  # the first conv is protected


def test_grouped_conv_keeps_groups_and_equal_channels_per_group():
    gm = fxopt.compile(Depthwise(groups=4).eval(), [fp.PruneChannels(0.5)], example_inputs=(torch.randn(1, 3, 8, 8),))
    dw = gm.get_submodule("dw")
    assert (dw.groups, dw.in_channels, dw.out_channels, tuple(dw.weight.shape[:2])) == (4, 8, 8, (8, 2))


class WithIsland(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), \
            nn.Conv2d(8, 8, 1)
        self.island = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        kept_by_island = self.island(self.a(s))
        cumulative = torch.cumsum(self.b(s), 1)
        y = torch.cat([kept_by_island, cumulative], 1).mean((2, 3))
        return self.fc(y), self.c(s)


def test_groups_touching_islands_unknown_ops_and_outputs_are_left_alone_with_reasons():
    model = WithIsland().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxopt.compile(model, [fp.PruneChannels(0.5)], example_inputs=(x,), leaf_modules=("island",))
    notes = "\n".join(fxopt.records(gm)[0].notes)
    assert "group a: left alone, consumed by the float island island" in notes
    assert "group b: left alone, consumed by function cumsum" in notes
    assert "group c: left alone, reaches a graph output" in notes
    assert "classifier fc" in notes
    rows = {r["name"]: r["notes"] for r in fxopt.report(gm).rows}
    assert "channels kept: consumed by function cumsum" in rows["b"]
    assert fxopt.records(gm)[0].modified is False  # everything was left alone
    torch.testing.assert_close(gm(x), model(x))


def test_layer_ratios_protect_and_importance_choices():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxopt.compile(model, [fp.PruneChannels(0.5, layer_ratios={"head": 0.0})], example_inputs=(x,))
    assert (gm.get_submodule("a").out_channels, gm.get_submodule("head.conv").out_channels) == (8, 6)
    gm = fxopt.compile(model, [fp.PruneChannels(0.5, protect=("b",))], example_inputs=(x,))
    assert gm.get_submodule("a").out_channels == 16
    assert any("protected by protect" in n for n in fxopt.records(gm)[0].notes)
    gm = fxopt.compile(model, [fp.PruneChannels(0.5, protect_ends=False)], example_inputs=(x,))
    assert gm.get_submodule("stem").out_channels == 4


def test_bn_scale_ranks_by_batchnorm_gamma():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 0.3, 2.0, 0.4]))
    gm = fxopt.compile(model.eval(), [fp.PruneChannels(0.5, importance="bn_scale")],
                       example_inputs=(torch.randn(1, 3, 9, 9),))
    assert sorted(gm.get_submodule("2").weight.tolist()) == [2.0, 3.0, 4.0, 5.0]


def test_bad_input():
    for bad in (1.0, -0.2, "x"):
        with pytest.raises(ValueError, match="ratio"):
            fp.PruneChannels(bad)
    with pytest.raises(ValueError, match="importance"):
        fp.PruneChannels(0.3, importance="taylor")
    with pytest.raises(ValueError, match="layer_ratios"):
        fp.PruneChannels(0.3, layer_ratios={"a": 1.5})
    gm = torch.fx.symbolic_trace(Residual())
    with pytest.raises(FxoptError, match="example_inputs"):
        fp.PruneChannels(0.3)(gm)
    only_head = fxopt.compile(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), [fp.PruneChannels(0.5)],
                              example_inputs=(torch.randn(1, 3, 2, 2),))
    assert fxopt.records(only_head)[0].modified is False


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def _check_zoo(name: str, size: int) -> None:
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    gm = fxopt.compile(model, fxopt.recipes.prune(0.3, structured=True), example_inputs=(x,))
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in gm.parameters())
    assert 0.4 * before < after < 0.7 * before  # ~ (1 - 0.3)^2 for convs pruned on both sides
    assert _flops(gm, x) < 0.7 * _flops(model, x)
    for batch in (1, 3):
        with torch.no_grad():
            assert gm(torch.randn(batch, 3, size, size)).shape == (batch, 1000)
    stats = fxopt.records(gm)[0].stats
    assert stats["pruned_groups"] >= stats["groups"] - (2 if name != "shufflenet_v2_x0_5" else 3)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_small(name):
    _check_zoo(name, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "regnet_x_400mf", "densenet121",
                                  "shufflenet_v2_x0_5"])
def test_zoo_slow(name):
    _check_zoo(name, 96)


class _GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.c2(torch.relu(self.gn(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def test_group_norm_loses_whole_groups_exactly():
    torch.manual_seed(0)
    model = _GroupNormNet().eval()
    _zero(model.c1, range(4, 8))  # groups 1 and 3 produce zeros ...
    _zero(model.c1, range(12, 16))
    with torch.no_grad():  # ... and GroupNorm maps them to zero: removing those groups is exact
        model.gn.weight[4:8] = model.gn.weight[12:16] = 0
        model.gn.bias[4:8] = model.gn.bias[12:16] = 0
    x = torch.randn(2, 3, 12, 12)
    out = fxopt.compile(model, [fp.PruneChannels(0.5, protect=("c2",))], example_inputs=(x[:1],))
    assert (out.gn.num_groups, out.gn.num_channels, out.c1.out_channels, out.c2.in_channels) == (2, 8, 8, 8)
    assert out.gn.weight.shape == (8,) and out.gn.num_channels // out.gn.num_groups == 4
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


def test_layer_norm_over_the_last_dim_prunes_with_the_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 16),
                          nn.Linear(16, 3)).eval()
    wide = nn.Sequential(nn.Linear(16, 16), nn.Unflatten(1, (4, 4)), nn.LayerNorm([4, 4]))
    out = fxopt.compile(model, [fp.PruneChannels(0.25)], example_inputs=(torch.randn(1, 5, 16),))
    assert out[2].normalized_shape == (24,) and out[2].weight.shape == (24,) and out[2].bias.shape == (24,)
    assert (out[1].out_features, out[4].in_features) == (24, 24)
    for shape in ((1, 5, 16), (3, 7, 16)):
        with torch.no_grad():
            assert out(torch.randn(shape)).shape == model(torch.randn(shape)).shape
    # a LayerNorm over two dimensions is left alone, with the reason
    gm = fxopt.compile(wide, [fp.PruneChannels(0.5, protect_ends=False)], example_inputs=(torch.randn(1, 16),))
    assert gm.get_submodule("0").out_features == 16
    assert any("LayerNorm over 2 dimensions" in n for n in fxopt.records(gm)[0].notes)


class _ConvNeXtLike(nn.Module):
    """torchvision's ConvNeXt pieces: CNBlocks (channels-last LayerNorm, layer_scale) and LayerNorm2d."""

    def __init__(self) -> None:
        from torchvision.models.convnext import CNBlock, LayerNorm2d

        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.proj = nn.Conv2d(16, 32, 1)
        self.blocks = nn.Sequential(CNBlock(32, 1e-6, 0.0), CNBlock(32, 1e-6, 0.0))
        self.norm = LayerNorm2d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.norm(self.blocks(self.proj(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_convnext_blocks_prune_layer_scale_and_both_layer_norms():
    torch.manual_seed(0)
    model = _ConvNeXtLike().eval()
    for block in model.blocks:
        nn.init.ones_(block.layer_scale)
    out = fxopt.compile(model, [fp.PruneChannels(0.25)], example_inputs=(torch.randn(1, 3, 32, 32),))
    assert out.get_submodule("proj").out_channels == 24
    assert out.get_submodule("blocks.0").layer_scale.shape == (24, 1, 1)
    assert out.get_submodule("blocks.1.block.2").normalized_shape == (24,)
    assert out.get_submodule("blocks.1.block.3").out_features == 96  # the MLP's hidden 128 lost 25% too
    norm_node = next(n for n in out.graph.nodes if n.target is F.layer_norm and "norm" in n.name)
    assert norm_node.args[1] == (24,)  # LayerNorm2d's literal shape follows the channels kept
    for batch in (1, 3):
        with torch.no_grad():
            assert out(torch.randn(batch, 3, 32, 32)).shape == (batch, 10)


@pytest.mark.slow
def test_convnext_tiny_prunes_and_runs_at_several_batch_sizes():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None).eval()
    out = fxopt.compile(model, [fp.PruneChannels(0.3)], example_inputs=(torch.randn(1, 3, 64, 64),))
    params = sum(p.numel() for p in out.parameters())
    assert params < 0.6 * sum(p.numel() for p in model.parameters())
    assert out.get_submodule("features.3.0.block.2").normalized_shape[0] < 192
    for batch in (1, 2, 5):
        with torch.no_grad():
            assert out(torch.randn(batch, 3, 64, 64)).shape == (batch, 1000)
