"""Observers: ranges on known data, quantization error vs minmax and torch.ao, state, errors."""

from __future__ import annotations

import copy
import io
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.ao.quantization.observer as tao  # reference only (tests)
import torch.fx

import fxopt
from fxopt.errors import CalibrationError
from fxopt.quant.observers import (
    OBSERVER_KINDS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from fxopt.quant.spec import QSpec, dequantize, qparams_from_range, quantize

QUINT8 = QSpec()
QINT8_SYM = QSpec(torch.qint8, symmetric=True)
W_PER_CHANNEL = QSpec(torch.qint8, symmetric=True, axis=0)
KINDS = sorted(OBSERVER_KINDS)


def quant_mse(x, observer, spec=None):
    """Quantize→dequantize MSE of ``x`` with ``observer``'s qparams (ours or torch.ao's)."""
    spec = spec or observer.spec
    scale, zp = observer.calculate_qparams()
    return ((dequantize(quantize(x, scale, zp, spec), scale, zp, spec) - x) ** 2).mean().item()


def observe(observer, batches):
    for b in batches:
        observer(b)
    return observer


def gaussian_with_outliers(n_batches=8, n=40000, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(n, generator=g)
        idx = torch.randint(0, n, (n // 1000,), generator=g)
        x[idx] = torch.randn(len(idx), generator=g) * 25  # 0.1 % outliers
        out.append(x)
    return out


def student_t(n_batches=8, n=40000, seed=0):
    torch.manual_seed(seed)
    return [torch.distributions.StudentT(3.0).sample((n,)) for _ in range(n_batches)]


# -- kinds and the basics -------------------------------------------------------------------------


def test_make_observer_kinds():
    assert KINDS == ["histogram", "minmax", "moving_average", "mse", "percentile"]
    classes = {k: type(make_observer(k, QUINT8)) for k in KINDS}
    assert classes == {"histogram": HistogramObserver, "minmax": MinMaxObserver,
                       "moving_average": MovingAverageObserver, "mse": MSEObserver,
                       "percentile": PercentileObserver}
    with pytest.raises(ValueError, match="unknown observer kind 'kl'.*histogram.*minmax"):
        make_observer("kl", QUINT8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 5, 5)])
def test_forward_returns_input_and_qparams_are_valid(kind, shape):
    obs = make_observer(kind, QUINT8)
    assert not obs.calibrated
    x = torch.randn(shape, requires_grad=True)
    assert obs(x) is x
    assert obs.calibrated and not obs.min_val.requires_grad
    scale, zp = obs.calculate_qparams()
    assert scale.shape == () and zp.shape == () and scale.item() > 0 and 0 <= zp.item() <= 255


@pytest.mark.parametrize("kind", KINDS)
def test_non_float_inputs_pass_through_unobserved(kind):
    obs = make_observer(kind, QUINT8)
    idx = torch.tensor([1, 2, 3])
    mask = torch.tensor([True, False])
    assert obs(idx) is idx and obs(mask) is mask
    assert not obs.calibrated


@pytest.mark.parametrize("kind", KINDS)
def test_all_zero_values_get_scale_one_not_eps(kind):
    """A dead value (all zeros in calibration) or an all-zero weight channel: any scale holds 0 exactly, and the
    float32-eps floor made a reader's int32 bias overflow on qnnpack (tests/test_properties.py)."""
    obs = make_observer(kind, QUINT8)
    obs(torch.zeros(2, 3, 4, 4))
    scale, zero_point = obs.calculate_qparams()
    assert float(scale) == 1.0 and int(zero_point) == 0
    weights = make_observer("minmax", QSpec(torch.qint8, symmetric=True, axis=0))
    w = torch.randn(3, 4)
    w[1] = 0
    weights(w)
    scale, _ = weights.calculate_qparams()
    assert scale[1] == 1.0 and (scale[[0, 2]] < 0.1).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_raise_calibration_error(kind, bad):
    obs = make_observer(kind, QUINT8, name="layer1.conv_out")
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(CalibrationError, match=r"'layer1.conv_out' saw NaN or inf.*check the calibration data"):
        obs(x)


@pytest.mark.parametrize("kind", KINDS)
def test_calibrating_under_inference_mode_then_observing_outside(kind):
    obs = make_observer(kind, QUINT8)
    with torch.inference_mode():
        obs(torch.randn(100) * 3)
    obs(torch.randn(100) * 0.1)  # in range: no re-binning, buffers are updated
    obs(torch.randn(100) * 10)
    assert obs.num_batches.item() == 3 and obs.calculate_qparams()[0] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_qparams_before_data_raise_calibration_error(kind):
    obs = make_observer(kind, QUINT8, name="fxopt_obs_3")
    with pytest.raises(CalibrationError, match=r"'fxopt_obs_3' saw no data: run fxopt.passes.Calibrate"):
        obs.calculate_qparams()


def test_per_channel_shape_errors():
    obs = make_observer("minmax", W_PER_CHANNEL.with_axis(2))
    with pytest.raises(CalibrationError, match="per-channel along axis 2"):
        obs(torch.randn(4, 3))
    obs = make_observer("histogram", W_PER_CHANNEL, name="w")
    obs(torch.randn(4, 3))
    with pytest.raises(CalibrationError, match="saw 4 channels before and now 5"):
        obs(torch.randn(5, 3))


# -- minmax and moving average --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max")
@pytest.mark.parametrize("spec,ref", [
    (QUINT8, dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine)),
    (QINT8_SYM, dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)),
    (QSpec(reduce_range=True), dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=True)),
])
def test_minmax_matches_hand_values_and_torch_ao(spec, ref):
    batches = [torch.tensor([0.5, -0.25, 1.0]), torch.tensor([[3.0, -2.0]]), torch.tensor(0.1)]
    obs, theirs = observe(make_observer("minmax", spec), batches), observe(tao.MinMaxObserver(**ref), batches)
    assert obs.min_val.item() == -2.0 and obs.max_val.item() == 3.0
    scale, zp = obs.calculate_qparams()
    ref_scale, ref_zp = theirs.calculate_qparams()
    assert scale.item() == pytest.approx(ref_scale.item(), rel=1e-6) and zp.item() == ref_zp.item()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_minmax_per_channel(axis):
    x = torch.randn(4, 6, 5)
    spec = QSpec(torch.qint8, symmetric=True, axis=axis)
    obs = observe(make_observer("minmax", spec), [x, x * 0.5])
    dims = tuple(d for d in range(3) if d != axis % 3)
    torch.testing.assert_close(obs.min_val, x.amin(dims))
    torch.testing.assert_close(obs.max_val, x.amax(dims))
    ref = observe(tao.PerChannelMinMaxObserver(ch_axis=axis % 3, dtype=torch.qint8,
                                               qscheme=torch.per_channel_symmetric), [x, x * 0.5])
    scale, zp = obs.calculate_qparams()
    ref_scale, ref_zp = ref.calculate_qparams()
    torch.testing.assert_close(scale, ref_scale)
    assert torch.equal(zp, ref_zp.long())


def test_moving_average_semantics():
    obs = make_observer("moving_average", QUINT8, averaging_constant=0.5)
    obs(torch.tensor([-1.0, 1.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 1.0)  # first batch as is
    obs(torch.tensor([-3.0, 5.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-2.0, 3.0)
    obs(torch.tensor([0.0, 1.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 2.0)
    assert make_observer("moving_average", QUINT8).averaging_constant == 0.01
    with pytest.raises(ValueError, match="averaging_constant"):
        make_observer("moving_average", QUINT8, averaging_constant=0.0)


def test_moving_average_matches_torch_ao_per_tensor_and_per_channel():
    batches = [torch.randn(3, 8) * (1 + i) for i in range(5)]
    ours = observe(make_observer("moving_average", QUINT8), batches)
    theirs = observe(tao.MovingAverageMinMaxObserver(), batches)
    torch.testing.assert_close(ours.min_val, theirs.min_val)
    torch.testing.assert_close(ours.max_val, theirs.max_val)
    ours = observe(make_observer("moving_average", QUINT8.with_axis(1)), batches)
    theirs = observe(tao.MovingAveragePerChannelMinMaxObserver(ch_axis=1), batches)
    torch.testing.assert_close(ours.min_val, theirs.min_val)
    torch.testing.assert_close(ours.max_val, theirs.max_val)


# -- percentile -----------------------------------------------------------------------------------


def test_percentile_each_tail_matches_quantiles():
    batches = [torch.rand(50000) * 4 - 1 for _ in range(4)]  # uniform [-1, 3]
    obs = observe(make_observer("percentile", QUINT8, percentile=99.0), batches)
    lo, hi = obs._range()
    data = torch.cat(batches)
    assert lo.item() == pytest.approx(torch.quantile(data, 0.01).item(), abs=0.01)
    assert hi.item() == pytest.approx(torch.quantile(data, 0.99).item(), abs=0.01)


def test_percentile_symmetric_uses_abs_and_clips_outliers():
    batches = gaussian_with_outliers(4)
    obs = observe(make_observer("percentile", QINT8_SYM, percentile=99.0), batches)
    lo, hi = obs._range()
    expected = torch.quantile(torch.cat(batches).abs(), 0.99).item()
    assert hi.item() == pytest.approx(expected, rel=0.02) and lo.item() == -hi.item()
    assert hi.item() < obs.max_val.item() / 5


def test_percentile_per_channel():
    x = torch.randn(3, 20000) * torch.tensor([[0.1], [1.0], [10.0]])
    obs = observe(make_observer("percentile", QSpec(axis=0), percentile=99.9), [x])
    lo, hi = obs._range()
    torch.testing.assert_close(hi, torch.quantile(x, 0.999, dim=1), rtol=0.03, atol=0)
    torch.testing.assert_close(lo, torch.quantile(x, 0.001, dim=1), rtol=0.03, atol=0)


# -- histogram and mse ----------------------------------------------------------------------------


def test_histogram_keeps_mass_and_grows_its_range():
    obs = make_observer("histogram", QUINT8)
    obs(torch.rand(10000))
    obs(torch.rand(10000) * 10 - 5)  # falls outside: re-bin onto [-5, 5]
    assert obs.histogram.sum().item() == pytest.approx(20000)
    assert obs.hist_min.item() <= -4.99 and obs.hist_max.item() >= 4.99
    # the first batch's mass stays inside [0, 1] after re-binning
    left, width = obs.hist_min.item(), (obs.hist_max - obs.hist_min).item() / obs.bins
    centers = left + width * (torch.arange(obs.bins) + 0.5)
    inside = obs.histogram[0][(centers > -width) & (centers < 1 + width)].sum().item()
    assert inside == pytest.approx(10000 + 1000, rel=0.05)


@settings(max_examples=30, deadline=None)
@given(
    scales=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=4),
    shift=st.floats(-50.0, 50.0),
    kind=st.sampled_from(["histogram", "mse", "percentile"]),
    spec=st.sampled_from([QUINT8, QINT8_SYM, QSpec(torch.qint8, bits=4)]),
)
def test_histogram_observers_keep_mass_and_choose_ranges_inside_the_data(scales, shift, kind, spec):
    torch.manual_seed(0)
    obs = make_observer(kind, spec)
    batches = [torch.randn(500) * s + shift for s in scales]
    observe(obs, batches)
    assert obs.histogram.sum().item() == pytest.approx(500 * len(scales))
    lo, hi = obs._range()
    data = torch.cat(batches)
    # inside the data's range widened to include 0 (qparams_from_range widens it anyway)
    assert min(data.min(), 0) - 1e-4 <= lo <= hi <= max(data.max(), 0) + 1e-4 or (
        spec.symmetric and -lo == hi <= data.abs().max() + 1e-4
    )
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale) and scale > 0 and spec.qmin <= zp <= spec.qmax
    assert quant_mse(data, obs) <= quant_mse(data, observe(make_observer("minmax", spec), batches)) * (
        1.05 if kind != "percentile" else 10.0
    )


@pytest.mark.parametrize("kind", ["histogram", "mse"])
@pytest.mark.parametrize("spec", [QUINT8, QINT8_SYM], ids=["quint8", "qint8_sym"])
def test_search_beats_minmax_on_heavy_tails(kind, spec):
    batches = student_t()
    data = torch.cat(batches)
    ours = quant_mse(data, observe(make_observer(kind, spec), batches))
    minmax = quant_mse(data, observe(make_observer("minmax", spec), batches))
    assert ours < 0.6 * minmax


@pytest.mark.parametrize("kind", ["histogram", "mse"])
@pytest.mark.parametrize("spec,qscheme", [(QUINT8, torch.per_tensor_affine),
                                          (QINT8_SYM, torch.per_tensor_symmetric)], ids=["quint8", "qint8_sym"])
@pytest.mark.parametrize("data", [gaussian_with_outliers, student_t])
def test_within_5_percent_of_torch_ao_histogram_observer(kind, spec, qscheme, data):
    batches = data()
    x = torch.cat(batches)
    ours = quant_mse(x, observe(make_observer(kind, spec), batches))
    ref = quant_mse(x, observe(tao.HistogramObserver(dtype=spec.dtype, qscheme=qscheme), batches), spec)
    print(f"{kind} {data.__name__} {spec.dtype}: ours/torch.ao quant MSE = {ours / ref:.3f}")
    assert ours <= 1.05 * ref, (ours, ref, ours / ref)


@pytest.mark.parametrize("kind", ["histogram", "mse"])
def test_relu_outputs_beat_torch_ao(kind):
    batches = [torch.relu(torch.distributions.Laplace(0.0, 1.0).sample((40000,))) for _ in range(6)]
    x = torch.cat(batches)
    ours = observe(make_observer(kind, QUINT8), batches)
    assert ours.calculate_qparams()[1].item() == 0  # all >= 0: zero point at the bottom
    ref = quant_mse(x, observe(tao.HistogramObserver(), batches), QUINT8)
    print(f"{kind} relu-laplace: ours/torch.ao quant MSE = {quant_mse(x, ours) / ref:.3f}")
    assert quant_mse(x, ours) <= 1.05 * ref


@pytest.mark.parametrize("kind", ["histogram", "mse", "percentile"])
def test_per_channel_histogram_observers_on_weights(kind):
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((16, 8, 3, 3)) * torch.logspace(-3, 0, 16)[:, None, None, None]
    ours = observe(make_observer(kind, W_PER_CHANNEL), [w])
    scale, zp = ours.calculate_qparams()
    assert scale.shape == (16,) and torch.equal(zp, torch.zeros(16, dtype=torch.int64))
    minmax = observe(make_observer("minmax", W_PER_CHANNEL), [w])
    err = (dequantize(quantize(w, scale, zp, W_PER_CHANNEL), scale, zp, W_PER_CHANNEL) - w) ** 2
    ms, mz = minmax.calculate_qparams()
    err_mm = (dequantize(quantize(w, ms, mz, W_PER_CHANNEL), ms, mz, W_PER_CHANNEL) - w) ** 2
    per_ch, per_ch_mm = err.mean((1, 2, 3)), err_mm.mean((1, 2, 3))
    if kind != "percentile":  # the searches never lose much to minmax on any channel, and win overall
        assert (per_ch <= per_ch_mm * 1.1).all()
        assert per_ch.sum() < per_ch_mm.sum()
    else:  # 99.99th percentile of a few hundred values: (close to) the max
        assert (per_ch <= per_ch_mm * 1.5).all()
    assert (scale > 0).all() and torch.isfinite(scale).all()


def test_mse_observer_is_close_to_brute_force_search_on_data():
    w = torch.distributions.StudentT(3.0).sample((4, 2000))
    obs = observe(make_observer("mse", W_PER_CHANNEL), [w])
    scale, zp = obs.calculate_qparams()
    ours = ((dequantize(quantize(w, scale, zp, W_PER_CHANNEL), scale, zp, W_PER_CHANNEL) - w) ** 2).mean(1)
    bound = w.abs().amax(1, keepdim=True)
    best = torch.full((4,), float("inf"))
    for f in torch.linspace(0.01, 1, 400):
        s, z = qparams_from_range(W_PER_CHANNEL, -(bound * f)[:, 0], (bound * f)[:, 0])
        err = ((dequantize(quantize(w, s, z, W_PER_CHANNEL), s, z, W_PER_CHANNEL) - w) ** 2).mean(1)
        best = torch.minimum(best, err)
    assert (ours <= best * 1.03).all(), (ours / best)


# -- state, copies, tracing -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", [QUINT8, W_PER_CHANNEL], ids=["per_tensor", "per_channel"])
def test_state_dict_roundtrip_and_deepcopy(kind, spec):
    obs = observe(make_observer(kind, spec), [torch.randn(6, 50), torch.randn(6, 50) * 3])
    expected = obs.calculate_qparams()
    buf = io.BytesIO()
    torch.save(obs.state_dict(), buf)
    buf.seek(0)
    fresh = make_observer(kind, spec)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.calibrated
    for clone in (fresh, copy.deepcopy(obs)):
        got = clone.calculate_qparams()
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
    # the clone keeps observing on its own
    clone = copy.deepcopy(obs)
    clone(torch.randn(6, 50) * 100)
    assert obs.max_val.max().item() < clone.max_val.max().item()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.obs = make_observer("histogram", QUINT8, name="obs")

    def forward(self, x):
        return torch.relu(self.obs(self.conv(x)))


def test_observer_is_a_leaf_under_fx_tracing():
    gm = fxopt.trace(_Net(), leaf_modules=(Observer,))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["conv", "obs"]
    x = torch.randn(2, 3, 8, 8)
    gm(x)
    assert gm.obs.calibrated
    # inserted by graph surgery (as PlaceObservers does), then re-traced as a leaf
    gm2 = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    gm2.add_submodule("fxopt_obs_0", make_observer("minmax", QUINT8))
    out = next(n for n in gm2.graph.nodes if n.op == "output")
    with gm2.graph.inserting_before(out):
        obs_node = gm2.graph.call_module("fxopt_obs_0", (out.args[0],))
    out.replace_input_with(out.args[0], obs_node)
    gm2.recompile()
    y = torch.randn(3, 4)
    torch.testing.assert_close(gm2(y), gm2.get_submodule("0")(y))
    assert gm2.fxopt_obs_0.calibrated


@pytest.mark.slow
def test_histogram_calibration_is_not_dominated_by_observer_time():
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    obs = {m: make_observer("histogram", QUINT8) for m in convs}
    data = [torch.randn(8, 3, 112, 112) for _ in range(8)]
    with torch.no_grad():
        t0 = time.perf_counter()
        for x in data:
            model(x)
        plain = time.perf_counter() - t0
        handles = [m.register_forward_hook(lambda m, i, o: obs[m](o)) for m in convs]
        t0 = time.perf_counter()
        for x in data:
            model(x)
        observed = time.perf_counter() - t0
        for h in handles:
            h.remove()
    t0 = time.perf_counter()
    for o in obs.values():
        o.calculate_qparams()
    search = time.perf_counter() - t0
    assert observed + search < 2.0 * plain, (plain, observed, search)


def test_histogram_clip_weight_widens_the_range_on_heavy_tails():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)) ** 3
    ranges = {}
    for weight in (1.0, 4.0, 64.0):
        obs = make_observer("histogram", QUINT8, clip_weight=weight)
        obs(x)
        scale, _ = obs.calculate_qparams()
        ranges[weight] = float(scale) * 255
    assert ranges[1.0] < ranges[4.0] < ranges[64.0] <= float(x.max() - x.min()) * 1.001, ranges
    with pytest.raises(ValueError, match="clip_weight"):
        make_observer("histogram", QUINT8, clip_weight=0.0)


def test_place_observers_passes_activation_options_and_checks_them():
    from fxopt import passes as fp

    assert fp.PlaceObservers(activation_options={"clip_weight": 2.0}).activation_options == {"clip_weight": 2.0}
    with pytest.raises(ValueError, match="do not fit"):
        fp.PlaceObservers(activation="minmax", activation_options={"clip_weight": 2.0})


def test_histogram_headroom_widens_the_chosen_range():
    x = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 4 - 1  # [-1, 3]
    ranges = {}
    for headroom in (1.0, 1.25):
        obs = make_observer("histogram", QUINT8, clip_weight=16.0, headroom=headroom)
        obs(x)
        scale, zero_point = obs.calculate_qparams()
        ranges[headroom] = (-float(zero_point) * float(scale), (255 - float(zero_point)) * float(scale))
    (lo1, hi1), (lo2, hi2) = ranges[1.0], ranges[1.25]
    assert hi1 == pytest.approx(3.0, rel=0.01) and lo1 == pytest.approx(-1.0, rel=0.02)
    assert hi2 == pytest.approx(1.25 * hi1, rel=0.01) and lo2 == pytest.approx(1.25 * lo1, rel=0.02)
    with pytest.raises(ValueError, match="headroom must be >= 1"):
        make_observer("histogram", QUINT8, headroom=0.8)
