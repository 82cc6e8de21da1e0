"""The seeds' scale / zero-point math in fxopt/quant/spec.py against hand-computed values and torch."""

from __future__ import annotations

import warnings

import pytest
import torch

from fxopt.quant.spec import EPS, QSpec, dequantize, qparams_from_range, quantize

QUINT8 = QSpec()
QINT8_SYM = QSpec(torch.qint8, symmetric=True)


def _roundtrip(x, spec, scale, zp):
    return dequantize(quantize(x, scale, zp, spec), scale, zp, spec)


def test_default_ranges():
    assert QUINT8.qrange == (0, 255)
    assert QINT8_SYM.qrange == (-128, 127)
    assert QSpec(torch.qint8, bits=4).qrange == (-8, 7)
    assert QSpec(quant_min=0, quant_max=15).qrange == (0, 15)
    assert QSpec(torch.qint8, axis=0).per_channel and not QUINT8.per_channel


def test_reduce_range_halves_the_integer_range():
    assert QSpec(torch.quint8, reduce_range=True).qrange == (0, 127)
    assert QSpec(torch.qint8, reduce_range=True).qrange == (-64, 63)
    scale, zp = qparams_from_range(QSpec(reduce_range=True), torch.tensor(-1.0), torch.tensor(1.0))
    assert scale.item() == pytest.approx(2 / 127)
    assert zp.item() == 64  # 0 - round(-1 / (2/127)) = round(63.5) = 64


def test_minus_one_to_one_quint8_asymmetric():
    scale, zp = qparams_from_range(QUINT8, torch.tensor(-1.0), torch.tensor(1.0))
    assert scale.dtype == torch.float32 and zp.dtype == torch.int64
    assert scale.item() == pytest.approx(2 / 255, rel=1e-7)
    # By hand zp = 0 - round(-1 / (2/255)) = round(127.5). In float32, 2/255 rounds up, so -1/scale is
    # -127.49999 and rounds to -127: zp = 127 (torch.ao's MinMaxObserver gives 127 as well).
    assert zp.item() == 127
    x = torch.linspace(-1, 1, 10001)
    err = (_roundtrip(x, QUINT8, scale, zp) - x).abs().max()
    assert err <= scale / 2 + 1e-6
    # zero is exactly representable
    assert _roundtrip(torch.zeros(1), QUINT8, scale, zp).item() == 0.0


def test_qint8_symmetric():
    scale, zp = qparams_from_range(QINT8_SYM, torch.tensor(-0.5), torch.tensor(2.0))
    assert scale.item() == pytest.approx(2.0 / 127.5)  # max(|min|, |max|) / ((qmax - qmin) / 2)
    assert zp.item() == 0
    x = torch.linspace(-2, 2, 1001)
    assert (_roundtrip(x, QINT8_SYM, scale, zp) - x).abs().max() <= scale / 2 + 1e-6


def test_quint8_symmetric_zero_point_is_mid_range():
    scale, zp = qparams_from_range(QSpec(symmetric=True), torch.tensor(-3.0), torch.tensor(1.0))
    assert scale.item() == pytest.approx(3.0 / 127.5) and zp.item() == 128


def test_range_not_containing_zero_is_widened():
    scale, zp = qparams_from_range(QUINT8, torch.tensor(2.0), torch.tensor(3.0))
    assert scale.item() == pytest.approx(3.0 / 255) and zp.item() == 0
    scale, zp = qparams_from_range(QUINT8, torch.tensor(-3.0), torch.tensor(-2.0))
    assert scale.item() == pytest.approx(3.0 / 255) and zp.item() == 255
    x = torch.tensor([2.0, 2.5, 3.0])
    scale, zp = qparams_from_range(QUINT8, x.min(), x.max())
    assert (_roundtrip(x, QUINT8, scale, zp) - x).abs().max() <= scale / 2 + 1e-6


@pytest.mark.parametrize("value", [0.0, 1.5, -4.0])
def test_constant_tensor_gives_valid_positive_scale(value):
    for spec in (QUINT8, QINT8_SYM):
        scale, zp = qparams_from_range(spec, torch.tensor(value), torch.tensor(value))
        assert torch.isfinite(scale) and scale.item() > 0
        assert spec.qmin <= zp.item() <= spec.qmax
        x = torch.full((4,), value)
        assert (_roundtrip(x, spec, scale, zp) - x).abs().max() <= scale / 2 + 1e-6
    scale, _ = qparams_from_range(QUINT8, torch.tensor(0.0), torch.tensor(0.0))
    assert scale.item() == EPS


def test_per_channel_qparams_are_elementwise():
    spec = QSpec(torch.qint8, symmetric=True, axis=0)
    lo, hi = torch.tensor([-1.0, -0.1, 0.0]), torch.tensor([0.5, 0.2, 4.0])
    scale, zp = qparams_from_range(spec, lo, hi)
    assert scale.shape == (3,) and torch.equal(zp, torch.zeros(3, dtype=torch.int64))
    torch.testing.assert_close(scale, torch.tensor([1.0, 0.2, 4.0]) / 127.5)
    w = torch.randn(3, 5) * torch.tensor([[0.3], [0.05], [2.0]])
    scale, zp = qparams_from_range(spec, w.amin(1), w.amax(1))
    err = (_roundtrip(w, spec, scale, zp) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    # per-channel along axis 1
    spec1 = QSpec(torch.quint8, axis=1)
    x = torch.randn(4, 3, 2)
    s1, z1 = qparams_from_range(spec1, x.amin((0, 2)), x.amax((0, 2)))
    q = quantize(x, s1, z1, spec1)
    for c in range(3):
        torch.testing.assert_close(q[:, c], quantize(x[:, c], s1[c], z1[c], QUINT8))


def test_min_greater_than_max_is_rejected():
    with pytest.raises(ValueError, match="min_val must be <= max_val"):
        qparams_from_range(QUINT8, torch.tensor(1.0), torch.tensor(0.0))


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError, match="dtype"):
        QSpec(torch.float32)
    with pytest.raises(ValueError, match="bits"):
        QSpec(bits=9)
    with pytest.raises(ValueError, match="empty"):
        QSpec(quant_min=5, quant_max=5)


@pytest.mark.parametrize("spec", [QUINT8, QINT8_SYM, QSpec(torch.qint8), QSpec(reduce_range=True)])
def test_codes_match_torch_quantize_per_tensor(spec):
    x = torch.randn(20000) * 3 + 0.7
    scale, zp = qparams_from_range(spec, x.min(), x.max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.quantize_per_tensor(x, float(scale), int(zp), spec.dtype).int_repr().long()
    ref = ref.clamp(spec.qmin, spec.qmax)  # reduce_range only narrows the float range, not torch's clamp
    assert torch.equal(quantize(x, scale, zp, spec), ref)
    torch.testing.assert_close(
        dequantize(ref, scale, zp, spec), _roundtrip(x, spec, scale, zp), rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype,symmetric", [(torch.qint8, True), (torch.quint8, False)])
def test_codes_match_torch_quantize_per_channel(dtype, symmetric):
    spec = QSpec(dtype, symmetric=symmetric, axis=0)
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-2, 1, 8)[:, None, None, None]
    flat = w.reshape(8, -1)
    scale, zp = qparams_from_range(spec, flat.amin(1), flat.amax(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.quantize_per_channel(w, scale.double(), zp, 0, dtype).int_repr().long()
    ours = quantize(w, scale, zp, spec)
    # torch's per-channel kernel multiplies by 1/scale: only exact .5 ties (the symmetric extremes,
    # max|w| / scale = 127.5) may round the other way, by one code.
    differ = ours != ref
    v = w / scale[:, None, None, None]
    assert ((ours - ref).abs() <= 1).all()
    assert ((v[differ] - v[differ].floor() - 0.5).abs() < 1e-4).all()
    assert differ.sum() <= 8
