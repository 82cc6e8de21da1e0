"""fuse-activations: fused modules/tags, unchanged numerics, skips, torchvision models."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxopt
from fxopt import meta
from fxopt import passes as fp
from fxopt.quant.nn import FusedAdd, FusedConv, FusedLinear


def fuse(model: nn.Module):
    model = model.eval()
    gm = torch.fx.symbolic_trace(model)
    result = fp.FuseActivations()(gm)
    fxopt.verify(gm)
    return model, gm, result


class _AllForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv1d(4, 4, 1)
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 8)
        self.relu, self.relu6, self.ht = nn.ReLU(inplace=True), nn.ReLU6(), nn.Hardtanh(0.0, 6.0)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        a = self.relu(self.c1(x))                      # conv + nn.ReLU (module shared below)
        b = F.hardtanh(self.c2(a), 0.0, 6.0)            # conv + hardtanh(0, 6) -> relu6
        c = self.relu(a + b)                            # add + relu
        d = self.c3(c.flatten(2)).relu()                # conv1d + method relu
        e = self.relu6(self.fc1(d.flatten(1)[:, :16]))  # linear + nn.ReLU6
        f = self.ht(self.fc2(e))                        # linear + nn.Hardtanh(0, 6)
        g = torch.relu(F.linear(f, self.w))             # functional linear: tagged only
        return g


def test_structure_and_numerics():
    x = torch.randn(2, 3, 4, 4)
    model, gm, result = fuse(_AllForms())
    assert result.modified
    assert result.stats == {"conv+relu": 2, "conv+relu6": 1, "add+relu": 1, "linear+relu6": 2, "linear+relu": 1}
    assert isinstance(gm.c1, FusedConv) and isinstance(gm.c1.conv, nn.Conv2d)
    assert isinstance(gm.c1.activation, nn.ReLU)
    assert isinstance(gm.c2.activation, nn.ReLU6) and isinstance(gm.c3, FusedConv)
    assert isinstance(gm.fc1, FusedLinear) and isinstance(gm.fc1.linear, nn.Linear)
    assert isinstance(gm.fc2.activation, nn.ReLU6)
    adds = [m for m in gm.modules() if isinstance(m, FusedAdd)]
    assert len(adds) == 1 and isinstance(adds[0].activation, nn.ReLU)
    # the activation modules nothing calls any more are gone
    assert not hasattr(gm, "relu") and not hasattr(gm, "relu6") and not hasattr(gm, "ht")
    assert not any(n.target in (operator.add, F.hardtanh, "relu") for n in gm.graph.nodes)
    tags = {n.name: (meta.fused_activation(n), meta.fusion_group(n)) for n in gm.graph.nodes}
    assert tags["c1"] == ("relu", "conv+relu") and tags["c2"] == ("relu6", "conv+relu6")
    linear = next(n for n in gm.graph.nodes if n.target is F.linear)
    act = next(iter(linear.users))
    assert meta.fused_activation(linear) == "relu" and meta.fusion_group(act) == "linear+relu"
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


class _Skips(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.shared = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu(y) + y                           # conv output used twice
        s = torch.relu(self.shared(z)) + self.shared(x)  # shared conv
        t = F.hardtanh(self.bn(s), -1.0, 1.0)           # bn between; other hardtanh bounds
        return torch.relu(t)


def test_invalid_cases_are_noted_and_unchanged():
    x = torch.randn(2, 3, 5, 5)
    model, gm, result = fuse(_Skips())
    assert result.stats == {} and result.modified is False
    joined = "\n".join(result.notes)
    assert "also used by add" in joined and "called more than once" in joined and "only (0, 6)" in joined
    assert isinstance(gm.conv, nn.Conv2d) and isinstance(gm.shared, nn.Conv2d)
    torch.testing.assert_close(gm(x), model(x))


def test_nothing_to_do_and_idempotent():
    model, gm, result = fuse(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sigmoid()))
    assert result.modified is False and result.stats == {}
    _, gm, first = fuse(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    assert first.modified
    code = gm.code
    again = fp.FuseActivations()(gm)
    assert again.modified is False and gm.code == code


def test_fused_modules_train_and_backprop():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2), nn.ReLU6())
    x = torch.randn(2, 3, 6, 6)
    out = fxopt.compile(model, passes=[fp.FuseActivations()], example_inputs=(x,), check=1e-6)
    assert isinstance(out.get_submodule("0"), FusedConv) and isinstance(out.get_submodule("3"), FusedLinear)
    out.train()
    out(x).sum().backward()
    assert out.get_submodule("0").conv.weight.grad is not None


@pytest.mark.parametrize("arch, expected", [
    ("resnet18", {"conv+relu": 9, "add+relu": 8}),
    ("mobilenet_v2", {"conv+relu6": 35}),
])
def test_torchvision_after_fold(arch, expected):
    model = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    out = fxopt.compile(model, passes=[fp.FoldBatchNorm(), fp.FuseActivations(), fp.EliminateDeadCode()])
    rec = fxopt.records(out)
    assert rec[1].stats == expected
    called = [out.get_submodule(n.target) for n in out.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in called)
    with torch.no_grad():
        ref, got = model(x), out(x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
