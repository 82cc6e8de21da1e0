"""PrepareQAT: structure, the fused Conv+BN scheme, fake-quant placement, schedules, LSQ, N-bit weights, lowering."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import passes as fp
from fxopt import recipes
from fxopt.compare import sqnr_db
from fxopt.quant.fake_quant import FakeQuantize, set_fake_quant
from fxopt.quant.observers import Observer
from fxopt.quant.nn.qat import QATConv, QATFakeQuantize, QATLearnableFakeQuantize, QATLinear, freeze_bn


class Net(nn.Module):
    """conv+bn+relu, a residual add+relu, a depthwise conv+bn, a conv without BN, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Conv2d(8, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.bn(self.conv(y)) + y)
        y = self.pw(self.dw(y))
        return self.fc(torch.flatten(self.pool(y), 1))


def _warm(model):
    """Give BatchNorms non-trivial running statistics, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 12, 12) * 2 + 0.5)
    return model.eval()


@pytest.fixture
def net():
    torch.manual_seed(0)
    return _warm(Net())


def _prepare(model, **options):
    return fxopt.compile(model, [fp.PrepareQAT(**options)], example_inputs=(torch.randn(2, 3, 12, 12),))


def _sqnr(reference, candidate, x):
    with torch.no_grad():
        return sqnr_db(reference(x), candidate(x))


def _train(q, steps=4, lr=1e-2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(8, 3, 12, 12, generator=g)
        loss = q(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q.eval()


def test_structure_conv_bn_act_fused_and_fake_quant_where_ptq_observes(net):
    q = _prepare(net)
    rec = fxopt.records(q)[-1]
    assert rec.modified and rec.stats["conv_bn"] == 3 and rec.stats["conv"] == 1 and rec.stats["linear"] == 1
    mods = dict(q.named_modules())
    assert isinstance(mods["stem.0"], QATConv) and isinstance(mods["stem.0"].bn, nn.BatchNorm2d)
    assert isinstance(mods["stem.0"].activation, nn.ReLU)
    assert isinstance(mods["dw.0"].activation, nn.ReLU6)
    assert mods["pw"].bn is None and isinstance(mods["fc"], QATLinear)
    assert not any(isinstance(m, nn.BatchNorm2d) and name.count(".") == 0 for name, m in mods.items())
    # activation fake quantizers exactly where static PTQ puts observers
    static = fxopt.compile(net, recipes.static_int8([torch.randn(2, 3, 12, 12)]), example_inputs=(torch.randn(2, 3, 12, 12),))
    observed = sorted(n.args[0].name for n in static.graph.nodes
                      if n.op == "call_module" and isinstance(static.get_submodule(n.target), Observer))
    faked = sorted(n.args[0].name for n in q.graph.nodes
                   if n.op == "call_module" and isinstance(q.get_submodule(n.target), FakeQuantize))
    assert len(faked) == len(observed) == rec.stats["activation_fake_quant"]
    assert {n.split("_")[0] for n in faked} == {n.split("_")[0] for n in observed}
    # weights: per channel on x86
    assert mods["stem.0"].weight_fake_quant.scale.shape == (8,)
    assert mods["fc"].weight_fake_quant.scale.shape == (5,)
    # the user's model is untouched
    assert isinstance(net.stem[0], nn.Conv2d) and isinstance(net.stem[1], nn.BatchNorm2d)


def test_nothing_to_quantize_is_not_modified():
    class Plain(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x).mean(1)

    q = fxopt.compile(Plain(), [fp.PrepareQAT()], example_inputs=(torch.randn(2, 3),))
    assert not fxopt.records(q)[-1].modified


def test_fused_scheme_without_fake_quant_is_the_float_model(net):
    """With fake quant off, the QAT graph computes what the float model does, in eval AND in train mode."""
    q = _prepare(net)
    set_fake_quant(q, False)
    x = torch.randn(6, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(q.eval()(x), net.eval()(x), atol=1e-5, rtol=1e-5)
        ref = copy.deepcopy(net).train()
        out_ref = ref(x)
        out = q.train()(x)  # batch statistics + running-stat update, as BatchNorm does
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q.get_submodule("stem.0").bn.running_var, ref.stem[1].running_var, atol=1e-6,
                               rtol=1e-6)


def test_gradients_flow_to_weights_bn_and_bias(net):
    q = _prepare(net).train()
    q(torch.randn(4, 3, 12, 12)).square().mean().backward()
    stem = q.get_submodule("stem.0")
    for p in (stem.conv.weight, stem.bn.weight, stem.bn.bias, q.get_submodule("fc").linear.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_freeze_bn_and_observers_after_n_steps(net):
    q = _prepare(net, freeze_bn_after=2, freeze_observers_after=3)
    stem = q.get_submodule("stem.0")
    fq = next(m for m in q.modules() if isinstance(m, QATFakeQuantize) and m is not stem.weight_fake_quant)
    history = []
    for _ in range(5):
        _train(q, steps=1, seed=len(history))
        history.append((stem.bn.running_mean.clone(), fq.scale.clone(), stem.bn_frozen, fq.observer_enabled))
    assert not torch.equal(history[0][0], history[1][0])  # BN statistics move for 2 steps ...
    assert torch.equal(history[1][0], history[4][0]) and history[2][2]  # ... then stay
    assert not torch.equal(history[1][1], history[2][1])  # ranges move for 3 steps ...
    assert torch.equal(history[2][1], history[4][1]) and not history[3][3]  # ... then stay
    assert freeze_bn(q, False) == 3 and not stem.bn_frozen


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_lowered_matches_qat_eval_within_one_step(net, backend):
    q = _train(_prepare(net, backend=backend))
    low = fxopt.lower(q, backend)
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        expected, got = q(x), low(x)
    out_scale = float(list(m for m in q.modules() if isinstance(m, FakeQuantize))[-1].scale)
    steps = (got - expected).abs() / out_scale
    # same output grid; an int8 kernel can round a tie the other way, which may carry one step further
    assert (steps < 1.001).float().mean() >= 0.98 and steps.max() < 3.001
    assert _sqnr(q, low, x) > 35
    codes = [m.weight_bias()[0].int_repr() for m in low.modules() if hasattr(m, "weight_bias")]
    assert len(codes) == 5


@pytest.mark.parametrize("backend,grid", [("x86", (-8, 7)), ("qnnpack", (-7, 7))])
def test_four_bit_weights_are_int8_on_the_four_bit_grid(net, backend, grid, tmp_path):
    q = _train(_prepare(net, backend=backend, weight_bits=4))
    assert any("4-bit grid" in n for n in fxopt.records(q)[-1].notes)
    low = fxopt.lower(q, backend)
    layers = [m for m in low.modules() if hasattr(m, "weight_bias")]
    for m in layers:
        codes = m.weight_bias()[0].int_repr()
        assert codes.dtype == torch.int8 and grid[0] <= int(codes.min()) and int(codes.max()) <= grid[1]
        assert m.weight_bits == 4
    assert str(fxopt.report(low)).count("int8 storage of 4-bit weights") == len(layers)
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert _sqnr(q, low, x) > 35
    fxopt.save(low, tmp_path / "int4.pt")  # the grid survives saving
    restored = fxopt.load(tmp_path / "int4.pt")
    with torch.no_grad():
        assert torch.equal(restored(x), low(x))
    assert str(fxopt.report(restored)).count("int8 storage of 4-bit weights") == len(layers)


def test_learnable_scales_are_trained_and_lowered(net):
    q = _prepare(net, learnable=True)
    fqs = [m for m in q.modules() if isinstance(m, QATLearnableFakeQuantize)]
    assert fqs and all(isinstance(m.scale, nn.Parameter) for m in fqs)
    params = {id(p) for p in q.parameters()}
    assert all(id(m.scale) in params for m in fqs)  # an optimizer over q.parameters() learns them
    with torch.no_grad():
        q.train()(torch.randn(4, 3, 12, 12))  # activation scales initialised from the first batch
    before = [m.scale.detach().clone() for m in fqs]
    _train(q, steps=3, lr=1e-2)
    assert sum(not torch.equal(b, m.scale) for b, m in zip(before, fqs)) >= len(fqs) // 2
    low = fxopt.lower(q, "x86")
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert _sqnr(q, low, x) > 35


def test_lowering_a_training_mode_qat_model_switches_to_eval_and_says_so(net):
    q = _train(_prepare(net)).train()
    with pytest.warns(UserWarning, match="training mode; lowering switches it to eval"):
        low = fxopt.lower(q, "x86")
    assert q.training  # the caller's module is not switched
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert _sqnr(q.eval(), low, x) > 35
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxopt.lower(q, "x86")  # eval mode: no warning


def test_prepare_qat_on_a_calibrated_graph_is_a_clear_error(net):
    calibrated = fxopt.compile(net, recipes.static_int8([torch.randn(2, 3, 12, 12)]),
                               example_inputs=(torch.randn(2, 3, 12, 12),))
    before = copy.deepcopy(calibrated.state_dict())
    with pytest.raises(fxopt.UnsupportedError, match="already statically calibrated.*start QAT from the float model"):
        fp.PrepareQAT()(calibrated)
    with pytest.raises(fxopt.UnsupportedError, match="already statically calibrated.*from the float model"):
        fxopt.compile(calibrated, recipes.qat())
    assert all(torch.equal(v, calibrated.state_dict()[k]) for k, v in before.items())
    q = _prepare(net)
    with pytest.raises(fxopt.UnsupportedError, match="already prepared for QAT"):
        fp.PrepareQAT()(q)
    with pytest.raises(fxopt.UnsupportedError, match="already prepared for QAT"):
        fxopt.compile(q, recipes.qat())


def test_sub_eight_bit_activations_do_not_lower(net):
    q = _train(_prepare(net, activation_bits=4), steps=1)
    with pytest.raises(fxopt.UnsupportedError, match="activations were fake-quantized to 4 bits"):
        fxopt.lower(q, "x86")


def test_bad_options():
    with pytest.raises(ValueError, match="activation observer 'histogram'"):
        fp.PrepareQAT(activation="histogram")
    with pytest.raises(ValueError, match="weight_bits must be an int in"):
        fp.PrepareQAT(weight_bits=1)
    with pytest.raises(ValueError, match="freeze_bn_after"):
        fp.PrepareQAT(freeze_bn_after=-1)


def test_qat_then_finetune_with_distillation_then_lower(net):
    q = fxopt.compile(net, recipes.qat(weight_bits=4, freeze_bn_after=0), example_inputs=(torch.randn(1, 3, 12, 12),))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(3)]
    before = q.get_submodule("stem.0").conv.weight.detach().clone()
    fxopt.finetune(q, data, steps=3, teacher=net, alpha=1.0, progress=False)
    assert not torch.equal(before, q.get_submodule("stem.0").conv.weight)
    assert not q.training
    low = fxopt.lower(q, "x86")
    assert _sqnr(q, low, data[0]) > 35


def test_recipe_is_a_plain_list_with_the_options():
    passes = recipes.qat(weight_bits=4, learnable=True, freeze_bn_after=3, freeze_observers_after=5)
    assert passes == [fp.PrepareQAT(weight_bits=4, learnable=True, freeze_bn_after=3, freeze_observers_after=5)]
    assert passes[0].target == "x86" and fp.PrepareQAT(backend="qnnpack").target == "qnnpack"


def test_follows_the_pipeline_backend_unless_pinned(net):
    from fxopt import meta
    from fxopt.pass_base import PassContext

    gm = fxopt.trace(net, (torch.randn(1, 3, 12, 12),))
    fp.PrepareQAT()(gm, PassContext("qnnpack"))
    assert meta.backend_of(gm) == "qnnpack"
    assert int(gm.get_submodule("stem.0").weight_fake_quant.spec.qmin) == -127  # qnnpack's weight range
    with pytest.raises(ValueError, match="prepares the graph for backend 'x86' but compile was asked"):
        fp.PrepareQAT(backend="x86").with_context(PassContext("qnnpack"))
