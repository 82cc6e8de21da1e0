"""AdaRound (learned weight rounding) on cases where its math is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import passes as fp
from fxopt import recipes
from fxopt.errors import CalibrationError, UnsupportedError
from passes.adaround import adaround_weight, rectified_sigmoid


def _correlated_inputs(k: int, n: int, seed: int = 0) -> torch.Tensor:
    """``[k, n]`` columns with correlated channels and a non-zero mean (one fixed mixing matrix)."""
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(0)) / k**0.5
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(n, k, generator=gen) @ mix + 0.5).t()


def test_rectified_sigmoid_reaches_0_and_1_and_inverts():
    v = torch.tensor([-20.0, 0.0, 20.0])
    torch.testing.assert_close(rectified_sigmoid(v), torch.tensor([0.0, 0.5, 1.0]))


def test_adaround_beats_nearest_at_4_bits_on_a_linear_layer():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.1
    x, x_test = _correlated_inputs(64, 2048), _correlated_inputs(64, 1024, seed=1)
    s = w.abs().amax(1) / 7.5  # 4-bit symmetric grid [-8, 7] per output channel
    mse = {}
    for iters in (0, 600):
        codes = adaround_weight(w, s, -8, 7, x, w @ x, iters=iters)
        assert codes.min() >= -8 and codes.max() <= 7 and torch.equal(codes, codes.round())
        if iters == 0:
            torch.testing.assert_close(codes, torch.clamp(torch.round(w / s[:, None]), -8, 7))
        else:  # every learned code is floor or ceil of w / s
            assert bool(((codes - torch.floor(w / s[:, None])).abs() <= 1).all())
        mse[iters] = float(((codes * s[:, None]) @ x_test - w @ x_test).pow(2).mean())
    assert mse[600] < 0.75 * mse[0], mse  # held-out layer output error: a clear margin


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def _net_and_data():
    torch.manual_seed(0)
    model = _ConvNet().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 12, 12, generator=gen) for _ in range(4)]
    return model, calib, torch.randn(8, 3, 12, 12, generator=gen)


def _prepared(model, calib, rounding):
    passes = [fp.FoldBatchNorm(), fp.FuseActivations(), fp.InsertQuantStubs("x86"), fp.PlaceObservers(),
              fp.Calibrate(calib), rounding]
    return fxopt.compile(model, passes, example_inputs=(calib[0],))


def test_adaround_pass_at_4_bits_beats_nearest_on_a_conv_net():
    model, calib, test = _net_and_data()
    nearest = _prepared(model, calib, fp.AdaRound(calib, iters=0, weight_bits=4))
    learned = _prepared(model, calib, fp.AdaRound(calib, iters=300, weight_bits=4))
    for gm in (nearest, learned):  # weights on a 4-bit grid: at most 16 values per output channel
        w = gm.conv2.conv.weight if hasattr(gm.conv2, "conv") else gm.conv2.weight
        assert max(len(torch.unique(row)) for row in w.flatten(1)) <= 16
    with torch.no_grad():
        ref = model(test)
        err = {k: float((gm(test) - ref).pow(2).mean()) for k, gm in (("nearest", nearest), ("learned", learned))}
    assert err["learned"] < 0.8 * err["nearest"], err
    rec = [r for r in fxopt.records(learned) if r.name.startswith("adaround")][0]
    assert rec.stats["rounded"] == 3 and rec.stats["flipped"] > 0
    assert model.conv2.weight.grad is None and not torch.equal(model.conv2.weight, learned.conv2.conv.weight)


def test_adaround_int8_rounding_survives_lowering_exactly():
    model, calib, test = _net_and_data()
    prepared = fxopt.compile(model, recipes.static_int8(calib, adaround=40), example_inputs=(calib[0],))
    rec = [r for r in fxopt.records(prepared) if r.name.startswith("adaround")][0]
    assert rec.stats["rounded"] == 3, rec.notes
    int8 = fxopt.lower(prepared, "x86")
    float_w = prepared.conv2.conv.weight.detach()
    packed = [m.weight_bias()[0] for m in int8.modules() if hasattr(m, "weight_bias")]
    w_q = [w for w in packed if w.shape == float_w.shape][0]
    # every weight but the one fixing each channel's range (kept as is, so the scale stays) is s * code
    inner = float_w.abs() < float_w.abs().flatten(1).amax(1)[:, None, None, None]
    torch.testing.assert_close(w_q.dequantize()[inner], float_w[inner], rtol=0, atol=0)
    assert int(inner.sum()) == float_w.numel() - float_w.shape[0]
    with torch.no_grad():
        assert fxopt.compare(model, int8, [test]).sqnr_db > 25


def test_adaround_errors_and_nothing_to_do():
    model, calib, _ = _net_and_data()
    with pytest.raises(CalibrationError):
        fp.AdaRound(None)
    with pytest.raises(ValueError):
        fp.AdaRound(calib, weight_bits=1)
    with pytest.raises(fxopt.PassError) as info:
        fxopt.compile(model, [fp.AdaRound(calib)], example_inputs=(calib[0],))
    assert isinstance(info.value.__cause__, UnsupportedError) or "InsertQuantStubs" in str(info.value)
    x = [torch.randn(2, 2, 8)]
    conv1d = nn.Sequential(nn.Conv1d(2, 2, 3)).eval()
    out = fxopt.compile(conv1d, [fp.InsertQuantStubs("x86"), fp.PlaceObservers(), fp.Calibrate(x),
                                 fp.AdaRound(x)], example_inputs=(x[0],))
    rec = [r for r in fxopt.records(out) if r.name.startswith("adaround")][0]
    assert not rec.modified and any("only Conv2d and Linear" in n for n in rec.notes)
