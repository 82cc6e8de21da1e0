"""eliminate-dead-code: unused nodes and attributes go; side effects, parents and leaves stay."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import fxopt
from fxopt import passes as fp


class _Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.unused = nn.Linear(4, 4)                        # never called
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))  # only block.0 is called
        self.dead_call = nn.Conv2d(4, 4, 1)                  # called, result unused
        self.scale = nn.Parameter(torch.tensor(2.0))         # read, result unused
        self.register_buffer("stale", torch.zeros(3))       # never read
        self.register_buffer("offset", torch.ones(1))        # read and used

    def forward(self, x):
        y = self.used(x)
        _ = self.dead_call(y)
        _ = self.scale * 3
        _ = y.sum(dim=1)
        return self.block[0](y) + self.offset


def test_structure_and_numerics():
    model, x = _Dead().eval(), torch.randn(2, 3, 6, 6)
    gm = torch.fx.symbolic_trace(model)
    result = fp.EliminateDeadCode()(gm)
    fxopt.verify(gm)
    assert result.modified
    assert result.stats["nodes"] == 4  # dead_call, the read of scale, the mul, the sum
    names = {n for n, _ in gm.named_modules()}
    assert {"used", "used.0", "used.1", "block", "block.0"} <= names
    assert not names & {"unused", "block.1", "dead_call"}
    assert not hasattr(gm, "scale") and not hasattr(gm, "stale") and hasattr(gm, "offset")
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_side_effects_are_kept():
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.custom = Custom()
            self.bn = nn.BatchNorm1d(3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = x + 1
            y.add_(1)                       # in-place, result unused: must stay
            torch._assert(True, "checked")  # impure
            self.custom(x)                  # unknown module: kept with a note
            self.bn(x)                      # training-mode BN updates running stats
            self.act(y)                     # inplace module writes into y
            return y

    tracer = torch.fx.Tracer()
    tracer.is_leaf_module = lambda m, qualname: type(m) is Custom or type(m).__module__.startswith("torch.nn")
    model = M().train()
    gm = torch.fx.GraphModule(model, tracer.trace(model))
    before = len(gm.graph.nodes)
    result = fp.EliminateDeadCode()(gm)
    assert result.modified is False and len(gm.graph.nodes) == before
    assert any("custom" in note and "side effects" in note for note in result.notes)
    x = torch.randn(4, 3)
    torch.testing.assert_close(gm(x), torch.relu(x + 2))


def test_nothing_to_do_is_not_modified():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    code = gm.code
    result = fp.EliminateDeadCode()(gm)
    assert result.modified is False and result.stats == {"nodes": 0, "modules": 0, "attributes": 0}
    assert gm.code == code


def test_cleans_up_after_a_graph_edit_on_resnet():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = fxopt.trace(model)
    fc = next(n for n in gm.graph.nodes if n.target == "fc")
    fc.replace_all_uses_with(fc.args[0])  # cut the classifier off: fc is now dead
    result = fp.EliminateDeadCode()(gm)
    fxopt.verify(gm)
    assert result.stats["nodes"] == 1 and result.stats["modules"] == 1 and not hasattr(gm, "fc")
    assert hasattr(gm, "layer4")
    with torch.no_grad():
        feats = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
        torch.testing.assert_close(gm(x), feats, atol=1e-5, rtol=1e-5)


def test_through_compile_after_fold_and_fuse():
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    out = fxopt.compile(model, passes=[fp.RemoveIdentities(), fp.FoldBatchNorm(), fp.FuseActivations(),
                                       fp.EliminateDeadCode()], example_inputs=(x,), check=1e-4)
    recs = fxopt.records(out)
    assert [r.name for r in recs] == ["remove-identities", "fold-bn", "fuse-activations", "eliminate-dead-code"]
    assert recs[-1].modified is False  # the other passes already deleted what they made unused
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in out.modules())
