"""remove-identities: which no-ops go, which look-alikes stay (dtype, broadcasting, training, aliasing)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxopt
from fxopt import passes as fp


def run(model: nn.Module, *inputs: torch.Tensor, shapes: bool = True):
    gm = torch.fx.symbolic_trace(model)
    if shapes and inputs:
        ShapeProp(gm).propagate(*inputs)
    result = fp.RemoveIdentities()(gm)
    fxopt.verify(gm)
    return gm, result


def ops(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


class _NoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop, self.drop2d, self.ident = nn.Dropout(0.3), nn.Dropout2d(), nn.Identity()

    def forward(self, x):
        y = self.drop2d(self.ident(self.conv(x)))
        y = 1 * (y * 1.0) + 0
        y = (y - 0) / 1
        y = F.dropout(y, 0.5, training=False)
        y = y.reshape(y.shape).view(2, 4, 6, 6).contiguous()
        y = torch.flatten(y, 3).flatten(2, 2)
        return self.drop(y).add(0)


def test_structure_and_numerics():
    model, x = _NoOps().eval(), torch.randn(2, 3, 8, 8)
    gm, result = run(model, x)
    assert result.modified
    assert fp.EliminateDeadCode()(gm).stats["nodes"] == 1  # the ``y.shape`` read that fed reshape
    assert ops(gm) == ["conv"], ops(gm)
    assert result.stats["dropout"] == 2 and result.stats["mul"] == 2 and result.stats["identity"] == 1
    assert not hasattr(gm, "drop") and not hasattr(gm, "ident") and not hasattr(gm, "drop2d")
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_training_mode_dropout_stays_with_a_note():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout()).train()
    gm, result = run(model)
    assert not result.modified and "training mode" in result.notes[0]

    class Functional(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, self.training)

    gm, result = run(Functional().train())
    assert not result.modified and "training=True" in result.notes[0]


def test_dtype_changing_and_broadcasting_lookalikes_stay():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("zeros", torch.zeros(3, 4))
            self.register_buffer("ones", torch.ones(4))

        def forward(self, x, i, b):
            return (x + self.zeros,     # broadcasts [4] to [3, 4]: not a no-op
                    x * self.ones,      # same shape and dtype: a no-op
                    i * 1.0,            # int tensor times a float: becomes float
                    i + 0,              # int tensor plus an int: a no-op
                    b + 0,              # bool tensor plus an int: becomes int64
                    i / 1,              # true division of an int tensor: becomes float
                    0 - x)              # not x

    args = (torch.randn(4), torch.arange(4), torch.tensor([True, False, True, False]))
    gm, result = run(M(), *args)
    assert result.stats == {"mul": 1, "add": 1}
    assert [n.args[1].target if isinstance(n.args[1], torch.fx.Node) else n.args[1]
            for n in gm.graph.nodes if n.target in (operator.add, operator.mul)] == ["zeros", 1.0, 0]
    for got, ref in zip(gm(*args), M()(*args)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got, ref)


def test_without_shapes_only_provable_cases_go():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * 1, x * 1, x.reshape(-1, 4)

    gm, result = run(M())
    assert result.stats == {"mul": 1}  # fc's output is float; x's dtype and shapes are unknown
    assert operator.mul in ops(gm) and "reshape" in ops(gm)


def test_inplace_writes_keep_the_copy():
    class M(nn.Module):
        def forward(self, x):
            y = x + 0
            y.relu_()
            return x, y

    x = torch.randn(5)
    gm, result = run(M(), x)
    assert not result.modified and "in-place" in result.notes[0]
    got = gm(x.clone())
    torch.testing.assert_close(got[0], x)

    class Chain(nn.Module):  # the identity is the only reader of a fresh value: safe to drop
        def __init__(self):
            super().__init__()
            self.conv, self.drop, self.act = nn.Conv2d(3, 3, 1), nn.Dropout(), nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.drop(self.conv(x)))

    model, x = Chain().eval(), torch.randn(1, 3, 4, 4)
    gm, result = run(model, x)
    assert result.stats == {"dropout": 1}
    torch.testing.assert_close(gm(x), model(x))

    class ThroughView(nn.Module):
        def forward(self, x):
            y = x * 1
            y.view(-1).add_(1)
            return x, y

    x = torch.randn(2, 3)
    gm, result = run(ThroughView(), x)
    assert not result.modified
    torch.testing.assert_close(gm(x.clone())[0], x)


def test_nothing_to_do_is_not_modified():
    gm, result = run(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), torch.randn(1, 3, 4, 4))
    assert result.modified is False and result.stats == {} and result.notes == []


def test_torchvision_mobilenet_dropout_through_compile():
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    out = fxopt.compile(model, passes=[fp.RemoveIdentities()], example_inputs=(x,))
    assert fxopt.records(out)[0].stats == {"dropout": 1}
    assert not any(isinstance(m, nn.Dropout) for m in out.modules())
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


class _Block(nn.Module):
    """An efficientnet-style residual block: torchvision's StochasticDepth before the skip add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = torchvision.ops.StochasticDepth(0.2, "row")

    def forward(self, x):
        return self.drop(self.conv(x)) + x


def test_stochastic_depth_is_dropped_in_eval_and_kept_in_training():
    from torchvision.ops import stochastic_depth

    x = torch.randn(2, 3, 6, 6)
    model = _Block().eval()
    gm, result = run(model, x)
    assert result.stats == {"stochastic_depth": 1}
    assert not any(n.target is stochastic_depth for n in gm.graph.nodes)
    assert torch.equal(gm(x), model(x))
    trained, result = run(_Block().train(), x)
    assert not result.modified and any(n.target is stochastic_depth for n in trained.graph.nodes)
    assert "stochastic_depth kept, called with training=True" in result.notes[0]


def test_efficientnet_b0_loses_every_stochastic_depth():
    model = torchvision.models.efficientnet_b0(weights=None).eval()
    x = torch.randn(1, 3, 48, 48)
    out = fxopt.compile(model, passes=[fp.RemoveIdentities()], example_inputs=(x,))
    assert fxopt.records(out)[0].stats["stochastic_depth"] == 9
    assert all(n.op != "call_function" or "stochastic_depth" not in str(n.target) for n in out.graph.nodes)
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


class _FlattenLeading(nn.Module):
    """transformers' Conv1D: ``x.view(-1, x.size(-1))`` is a no-op on 2-D inputs only."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        return self.fc(x.view(-1, x.size(-1))).view(x.size()[:-1] + (8,))


def test_reshape_with_inferred_dim_stays_when_examples_are_2d():
    model, x = _FlattenLeading().eval(), torch.randn(3, 4)
    gm, result = run(model, x)
    assert "view" in ops(gm)
    y = torch.randn(2, 3, 4)  # another rank than the example
    torch.testing.assert_close(gm(y), model(y), atol=1e-5, rtol=1e-5)
