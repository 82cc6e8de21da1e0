"""Fake quantization: forward = quantize→dequantize, clipped straight-through gradient, the module."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from fxopt.errors import CalibrationError
from fxopt.quant.fake_quant import FakeQuantize, LearnableFakeQuantize, fake_quantize, set_fake_quant, set_observers
from fxopt.quant.observers import make_observer
from fxopt.quant.spec import QSpec, dequantize, qparams_from_range, quantize

QUINT8 = QSpec()
QINT8_SYM = QSpec(torch.qint8, symmetric=True)
W_PER_CHANNEL = QSpec(torch.qint8, symmetric=True, axis=0)


@pytest.mark.parametrize("spec", [QUINT8, QINT8_SYM, QSpec(reduce_range=True), QSpec(torch.qint8, bits=4)],
                         ids=["quint8", "qint8_sym", "reduce_range", "int4"])
def test_forward_equals_quantize_dequantize(spec):
    x = torch.randn(4, 8, 5) * 2
    scale, zp = qparams_from_range(spec, torch.tensor(-1.5), torch.tensor(2.5))  # clips part of x
    out = fake_quantize(x, scale, zp, spec)
    assert torch.equal(out, dequantize(quantize(x, scale, zp, spec), scale, zp, spec))
    # and agrees with torch's ATen kernel
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), spec.qmin, spec.qmax)
    assert ((out - ref).abs() <= scale * 1.001).all() and (out != ref).float().mean() < 1e-3


def test_clipped_straight_through_gradient():
    spec = QUINT8
    scale, zp = torch.tensor(0.1), torch.tensor(10)  # representable range [-1.0, 24.5]
    x = torch.tensor([-3.0, -1.04, -1.06, 0.0, 0.33, 24.5, 24.54, 24.56, 30.0], requires_grad=True)
    fake_quantize(x, scale, zp, spec).backward(torch.ones_like(x))
    # inside (after rounding) -> 1, clamped -> 0
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # the same mask as torch's kernel
    y = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(y, 0.1, 10, 0, 255).sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_gradient_passes_upstream_values():
    x = torch.linspace(-2, 2, 11, requires_grad=True)
    g = torch.arange(11.0)
    fake_quantize(x, torch.tensor(1 / 127.5), torch.tensor(0), QINT8_SYM).backward(g)
    inside = (x.abs() <= 1.0).float()
    assert torch.equal(x.grad, g * inside)


def test_per_channel():
    w = torch.randn(6, 3, 3, 3) * torch.logspace(-2, 1, 6)[:, None, None, None]
    flat = w.reshape(6, -1)
    scale, zp = qparams_from_range(W_PER_CHANNEL, flat.amin(1), flat.amax(1))
    scale = scale * 0.5  # clip half of each channel's range
    w.requires_grad_()
    out = fake_quantize(w, scale, zp, W_PER_CHANNEL)
    assert torch.equal(out, dequantize(quantize(w, scale, zp, W_PER_CHANNEL), scale, zp, W_PER_CHANNEL))
    out.sum().backward()
    v = torch.round(w.detach() / scale[:, None, None, None])
    assert torch.equal(w.grad, ((v >= -128) & (v <= 127)).float())
    # per-channel along axis 1 (activations laid out NCHW)
    spec1 = QSpec(axis=1)
    x = torch.rand(2, 3, 4) * torch.tensor([1.0, 10.0, 100.0])[None, :, None]
    s1, z1 = qparams_from_range(spec1, x.amin((0, 2)), x.amax((0, 2)))
    ref = torch.fake_quantize_per_channel_affine(x, s1, z1.int(), 1, 0, 255)
    torch.testing.assert_close(fake_quantize(x, s1, z1, spec1), ref, atol=float(s1.max()) * 1.001, rtol=0)


def test_qparams_that_do_not_fit_are_rejected():
    with pytest.raises(CalibrationError, match="one scale and zero point per channel, got 4"):
        fake_quantize(torch.randn(3, 2), torch.ones(4), torch.zeros(4), W_PER_CHANNEL)
    with pytest.raises(CalibrationError, match="per-tensor fake quantization needs one scale"):
        fake_quantize(torch.randn(3, 2), torch.ones(3), torch.zeros(3), QUINT8)


def test_keeps_dtype():
    x = torch.randn(16, dtype=torch.float64)
    assert fake_quantize(x, torch.tensor(0.05), torch.tensor(128), QUINT8).dtype == torch.float64
    h = torch.randn(16).half()
    assert fake_quantize(h, torch.tensor(0.05), torch.tensor(128), QUINT8).dtype == torch.float16


# -- the module -----------------------------------------------------------------------------------


def test_module_observes_in_training_and_freezes_in_eval():
    fq = FakeQuantize(spec=QUINT8, kind="minmax", name="act")
    x = torch.randn(100) * 3
    out = fq(x)
    scale, zp = qparams_from_range(QUINT8, x.min(), x.max())
    assert torch.equal(out, dequantize(quantize(x, scale, zp, QUINT8), scale, zp, QUINT8))
    torch.testing.assert_close(fq.calculate_qparams()[0], scale)
    fq.eval()
    fq(x * 10)  # eval: no observation
    torch.testing.assert_close(fq.calculate_qparams()[0], scale)
    fq.train()
    fq(x * 10)
    assert fq.calculate_qparams()[0] > scale * 5


def test_toggles():
    fq = FakeQuantize(make_observer("minmax", QUINT8))
    x = torch.randn(50)
    fq.disable_fake_quant()
    assert fq(x) is x and fq.calibrated  # still observes
    fq.enable_fake_quant().disable_observer()
    before = fq.calculate_qparams()
    out = fq(x * 100)
    assert torch.equal(fq.calculate_qparams()[0], before[0])
    assert out.abs().max() <= x.abs().max() * 1.05  # clipped to the old range
    assert set_observers(torch.nn.Sequential(fq, torch.nn.ReLU()), True) == 1 and fq.observer_enabled
    assert set_fake_quant(torch.nn.Sequential(fq), False) == 1 and not fq.fake_quant_enabled


def test_module_errors_and_passthrough():
    fq = FakeQuantize(spec=QUINT8, name="blk.out").disable_observer()
    with pytest.raises(CalibrationError, match="'blk.out' inside FakeQuantize has no qparams"):
        fq(torch.randn(3))
    idx = torch.arange(4)
    assert fq(idx) is idx
    with pytest.raises(ValueError, match="needs an observer or a spec"):
        FakeQuantize()


def test_module_per_channel_state_dict_and_deepcopy():
    fq = FakeQuantize(spec=W_PER_CHANNEL, kind="minmax")
    w = torch.randn(5, 4)
    expected = fq(w)
    buf = io.BytesIO()
    torch.save(fq.state_dict(), buf)
    buf.seek(0)
    fresh = FakeQuantize(spec=W_PER_CHANNEL, kind="minmax").eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.scale.shape == (5,)
    assert torch.equal(fresh(w), expected) and torch.equal(copy.deepcopy(fq)(w), expected)


def test_qat_step_trains_through_fake_quant():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 1)
    fq_in, fq_w = FakeQuantize(spec=QUINT8), FakeQuantize(spec=W_PER_CHANNEL, kind="minmax")
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    x = torch.randn(256, 8)
    y = x @ torch.linspace(-1, 1, 8)[:, None]
    losses = []
    for _ in range(60):
        out = torch.nn.functional.linear(fq_in(x), fq_w(lin.weight), lin.bias)
        loss = ((out - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_learnable_scale_gets_lsq_gradient_and_learns():
    spec = QSpec(torch.qint8, bits=4, symmetric=True)  # [-8, 7]: minmax's range is far from optimal
    fq = LearnableFakeQuantize(spec=spec, kind="minmax")
    x = torch.distributions.Laplace(0.0, 1.0).sample((4000,))
    fq(x)
    assert not fq.observer_enabled and isinstance(fq.scale, torch.nn.Parameter)
    init = fq.scale.item()
    assert init == pytest.approx(x.abs().max().item() / 7.5)
    # forward value equals plain fake quantization with the current scale
    torch.testing.assert_close(fq(x), fake_quantize(x, fq.scale.detach(), fq.zero_point, spec))
    opt = torch.optim.Adam([fq.scale], lr=0.01)
    for _ in range(100):
        loss = ((fq(x) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fq.scale.item() < 0.75 * init
    with torch.no_grad():
        learned = ((fq(x) - x) ** 2).mean()
        initial = ((fake_quantize(x, torch.tensor(init), torch.tensor(0), spec) - x) ** 2).mean()
        best = make_observer("mse", spec)
        best(x)
        optimum = ((fake_quantize(x, *best.calculate_qparams(), spec) - x) ** 2).mean()
    assert learned < 0.6 * initial and learned < 1.05 * optimum
    # the input gradient is LSQ's clipped straight-through one: 1 where x / scale lies in [qmin, qmax]
    xg = x.clone().requires_grad_()
    fq(xg).sum().backward()
    v = x / fq.scale.detach()
    assert torch.equal(xg.grad, ((v >= -8) & (v <= 7)).float())
    assert 0 < (xg.grad == 0).sum() < len(x) // 10
