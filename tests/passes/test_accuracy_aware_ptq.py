"""Cross-layer equalization, bias correction and sensitivity-guided float fallback on hand-made cases."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import passes as fp
from fxopt import recipes
from passes.correct_bias import expected_shift


def _sqnr(ref, out) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


class Chain(nn.Module):
    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.act = act if act is not None else nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def _imbalanced(act=None) -> Chain:
    """Output channel 0 of conv1 is 100x the others, input channel 0 of conv2 1/100: same function."""
    torch.manual_seed(0)
    model = Chain(act).eval()
    with torch.no_grad():
        model.conv1.weight[0] *= 100
        model.conv1.bias[0] *= 100
        model.conv2.weight[:, 0] /= 100
    return model


def _data(n=4, shape=(2, 4, 12, 12), seed=1, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) + offset for _ in range(n)]


def test_cle_recovers_at_least_10db_on_a_100x_channel_imbalance_per_tensor():
    model = _imbalanced()
    calib, test = _data(), _data(seed=2)[0]
    plain = fxopt.compile(model, recipes.static_int8(calib, per_channel=False), example_inputs=(calib[0],),
                          backend="x86")
    equalized = fxopt.compile(model, recipes.static_int8(calib, per_channel=False, equalize=True),
                              example_inputs=(calib[0],), backend="x86")
    with torch.no_grad():
        ref = model(test)
        gain = _sqnr(ref, equalized(test)) - _sqnr(ref, plain(test))
    assert gain >= 10.0, gain


def test_cle_keeps_float_numerics_and_balances_ranges():
    model = _imbalanced()
    gm = fxopt.trace(model, (_data()[0],))
    result = fp.EqualizeCrossLayer()(gm)
    assert result.modified and result.stats["pairs"] == 1
    x = _data(seed=3)[0]
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-4, atol=1e-4)
    r1 = gm.conv1.weight.abs().flatten(1).amax(1)
    r2 = gm.conv2.weight.abs().transpose(0, 1).flatten(1).amax(1)
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-6)  # both ranges are sqrt(r1 * r2) after CLE
    assert model.conv1.weight[0].abs().max() > 10  # the user's model is untouched
    again = fp.EqualizeCrossLayer()(result.graph_module)
    assert not again.modified  # already equalized


def test_cle_skips_relu6_and_equalizes_depthwise_chains():
    gm = fxopt.trace(_imbalanced(nn.ReLU6()), (_data()[0],))
    result = fp.EqualizeCrossLayer()(gm)
    assert not result.modified and any("ReLU6" in n for n in result.notes)

    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 8, 1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.dw(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model = DW().eval()
    with torch.no_grad():
        model.a.weight[3] *= 50
    gm = fxopt.trace(model, (_data()[0],))
    result = fp.EqualizeCrossLayer()(gm)
    assert result.stats["pairs"] == 2 and result.stats["sweeps"] > 1
    x = _data(seed=4)[0]
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_bias_correction_matches_the_formula_and_removes_the_mean_shift():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8)).eval()
    calib = _data(shape=(4, 8, 10, 10), offset=3.0)
    prepared = fxopt.compile(model, recipes.static_int8(calib, per_channel=False), example_inputs=(calib[0],))
    corrected = fxopt.compile(model, recipes.static_int8(calib, per_channel=False, bias_correction=True),
                              example_inputs=(calib[0],))
    rec = [r for r in fxopt.records(corrected) if r.name.startswith("correct-bias")][0]
    assert rec.modified and rec.stats["corrected"] == 1
    conv = model[0]
    mean_in = torch.cat(calib).mean((0, 2, 3))
    from fxopt.quant.weight_sim import fake_quantize_weight
    # a depthwise conv: on x86 its weights sit on the narrower [-63, 63] grid, in lowering and in the correction
    delta = fake_quantize_weight(conv.weight, fxopt.meta.quant_config(prepared), False, True) - conv.weight
    expected = conv.bias.double() - expected_shift(conv, delta.detach(), mean_in)
    got = corrected.get_submodule("0").bias.double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    test = _data(n=1, shape=(16, 8, 10, 10), seed=9, offset=3.0)[0]
    with torch.no_grad():
        ref = model(test)
        err_plain = (fxopt.lower(prepared, "x86")(test) - ref).mean((0, 2, 3)).abs().mean()
        err_fixed = (fxopt.lower(corrected, "x86")(test) - ref).mean((0, 2, 3)).abs().mean()
    assert err_fixed < 0.5 * err_plain, (err_fixed, err_plain)


class Outlier(nn.Module):
    """conv2's output has one channel 1000x the others (undone by conv3): its int8 value loses the rest."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.conv4 = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.conv2.weight[0] *= 1000
            self.conv2.bias[0] *= 1000
            self.conv3.weight[:, 0] /= 1000

    def forward(self, x):
        return self.conv4(torch.relu(self.conv3(self.conv2(torch.relu(self.conv1(x))))))


def test_float_fallback_keeps_the_damaging_ops_float_until_the_target_holds():
    torch.manual_seed(0)
    model = Outlier().eval()
    calib, test = _data(), _data(seed=5)[0]
    plain = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(calib[0],), backend="x86")
    guarded = fxopt.compile(model, recipes.static_int8(calib, min_sqnr=30, max_float_fraction=0.5),
                            example_inputs=(calib[0],), backend="x86")
    rec = [r for r in fxopt.records(guarded) if r.name.startswith("float-fallback")][0]
    assert set(rec.stats["kept_float"]) <= {"conv2", "conv3"} and rec.stats["kept_float"]
    assert rec.stats["score"] >= 30 and rec.stats["extra_weight_bytes"] > 0
    assert any("kept float by float-fallback" in n for n in rec.notes)
    islands = {i.node for i in fxopt.meta.float_islands(guarded.graph_module)}
    assert set(rec.stats["kept_float"]) <= islands
    with torch.no_grad():
        ref = model(test)
        assert _sqnr(ref, plain(test)) < 25
        assert _sqnr(ref, guarded(test)) >= 28


def test_float_fallback_with_a_metric_callback_and_when_nothing_is_needed():
    torch.manual_seed(0)
    model = Chain().eval()
    calib = _data()

    def neg_max_error(outputs, reference):
        return -max(float((o - r).abs().max()) for o, r in zip(outputs, reference))

    prepared = fxopt.compile(model, recipes.static_int8(calib, metric=neg_max_error, min_metric=-10.0),
                             example_inputs=(calib[0],))
    rec = [r for r in fxopt.records(prepared) if r.name.startswith("float-fallback")][0]
    assert not rec.modified and rec.stats["kept_float"] == []
    with pytest.raises(ValueError, match="exactly one target"):
        fp.FloatFallback(calib)
    with pytest.raises(fxopt.CalibrationError):
        fp.FloatFallback(None, min_sqnr=30)


class ConvBNReLUConv(nn.Module):
    """conv1 is the identity, so bn1's output is exactly N(beta, gamma²) per channel for N(0, 1) inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(6, 6, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def test_analytical_bias_correction_removes_the_expected_shift_from_batchnorm_statistics():
    torch.manual_seed(0)
    model = ConvBNReLUConv().eval()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.eye(6).reshape(6, 6, 1, 1))
        model.bn1.weight.copy_(torch.linspace(0.5, 2.0, 6))
        model.bn1.bias.copy_(torch.linspace(-1.0, 1.5, 6))
        model.conv2.weight.mul_(3.0)  # coarse per-tensor grid: a visible rounding error
    calib = _data(shape=(2, 6, 8, 8))
    options = dict(per_channel=False)
    plain = fxopt.compile(model, recipes.static_int8(calib, **options), example_inputs=(calib[0],))
    fixed = fxopt.compile(model, recipes.static_int8(calib, bias_correction="analytical", **options),
                          example_inputs=(calib[0],))
    rec = [r for r in fxopt.records(fixed) if r.name.startswith("correct-bias")][0]
    assert rec.modified and rec.stats["corrected"] == 1  # conv2; conv1 reads the model input: no statistics
    assert any("conv1" in n and "no folded BatchNorm" in n for n in rec.notes)
    # closed form: E[relu(z)], z ~ N(mu, sigma²) = mu Phi(mu/sigma) + sigma phi(mu/sigma)
    mu, sigma = model.bn1.bias.detach().double(), model.bn1.weight.detach().double()
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    mean_in = mu * normal.cdf(mu / sigma) + sigma * normal.log_prob(mu / sigma).exp()
    from fxopt.quant.weight_sim import fake_quantize_weight
    w = model.conv2.weight.detach()
    delta = (fake_quantize_weight(w, fxopt.meta.quant_config(plain), False) - w).double()
    shift = delta.sum((2, 3)) @ mean_in
    assert float(shift.abs().max()) > 1e-3
    torch.testing.assert_close(fixed.conv2.bias.double(), model.conv2.bias.double() - shift, rtol=1e-5, atol=1e-6)
    # on data that follows the BatchNorm model, the mean output error of the int8-weight conv2 goes away
    gen = torch.Generator().manual_seed(7)
    x = torch.relu(torch.randn(64, 6, 8, 8, generator=gen) * sigma.float().view(1, -1, 1, 1)
                   + mu.float().view(1, -1, 1, 1))
    wq = fake_quantize_weight(w, fxopt.meta.quant_config(plain), False)
    b = model.conv2.bias.detach()
    ref = torch.nn.functional.conv2d(x, w, b)
    before = (torch.nn.functional.conv2d(x, wq, b) - ref).mean((0, 2, 3))
    after = (torch.nn.functional.conv2d(x, wq, fixed.conv2.bias.detach()) - ref).mean((0, 2, 3))
    torch.testing.assert_close(before.double(), shift, rtol=0.05, atol=2e-3)
    assert float(after.abs().max()) < 0.1 * float(before.abs().max()), (after, before)


def test_correct_bias_mode_is_checked_and_analytical_needs_no_data():
    with pytest.raises(ValueError, match="empirical' or 'analytical"):
        fp.CorrectBias(None, mode="bogus")
    fp.CorrectBias(None, mode="analytical")  # no data needed


def test_static_int8_recipe_options_analytical_bias_correction_and_adaround():
    from fxopt import recipe_args

    torch.manual_seed(0)
    model = ConvBNReLUConv().eval()
    calib = _data(shape=(2, 6, 8, 8))
    steps = recipe_args.build("static_int8", recipe_args.parse(
        "static_int8:bias_correction='analytical':adaround=20")[0][1], calibration=calib)
    names = [p.name for p in steps]
    assert names.index("correct-bias") < names.index("calibrate") < names.index("adaround")
    assert [p for p in steps if p.name == "correct-bias"][0].mode == "analytical"
    assert [p for p in steps if p.name == "adaround"][0].iters == 20
    int8 = fxopt.compile(model, steps, example_inputs=(calib[0],), backend="x86")
    recs = {r.name.split("{")[0]: r for r in fxopt.records(int8)}
    assert recs["correct-bias"].modified and recs["adaround"].modified
    x = _data(n=1, shape=(2, 6, 8, 8), seed=3)[0]
    with torch.no_grad():
        assert _sqnr(model(x), int8(x)) > 30
