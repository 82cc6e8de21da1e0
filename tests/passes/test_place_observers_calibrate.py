"""PlaceObservers (where observers go, shared qparams) and Calibrate (data handling, errors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import meta
from fxopt import passes as fp
from fxopt.compare import sqnr_db
from fxopt.quant.observers import Observer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = self.pool(y) + self.pool(y)
        return torch.sigmoid(self.fc(torch.flatten(y, 1)))


def _observed(model, x, **kwargs):
    gm = fxopt.trace(model, (x,))
    fp.InsertQuantStubs("x86")(gm)
    res = fp.PlaceObservers(**kwargs)(gm)
    return gm, res


def _observed_inputs(gm):
    return [n.args[0].name for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Observer)]


def test_observers_follow_region_entries_and_compute_ops_only():
    x = torch.randn(2, 3, 8, 8)
    gm, res = _observed(Net().eval(), x)
    # quant stub, conv, add, fc get observers; relu/pool/flatten share; sigmoid has fixed qparams
    assert _observed_inputs(gm) == ["fxopt_quant_0", "conv", "add", "fc"]
    assert res.stats == {"observers": 4}
    cfg = meta.quant_config(gm)
    assert cfg.backend == "x86" and cfg.per_channel and cfg.weight_spec.axis == 0
    assert cfg.activation == "histogram"


def test_observer_options_and_validation():
    x = torch.randn(2, 3, 8, 8)
    gm, _ = _observed(Net().eval(), x, activation="minmax", per_channel=False)
    cfg = meta.quant_config(gm)
    assert cfg.activation == "minmax" and cfg.weight_spec.axis is None
    with pytest.raises(ValueError, match="activation observer 'bogus'"):
        fp.PlaceObservers(activation="bogus")


def test_place_observers_needs_stubs_and_is_idempotent():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(fxopt.UnsupportedError, match="InsertQuantStubs"):
        fp.PlaceObservers()(fxopt.trace(Net()))
    gm, _ = _observed(Net().eval(), x)
    assert fp.PlaceObservers()(gm).modified is False


def test_calibrate_fills_observers_and_keeps_outputs():
    model = Net().eval()
    x = torch.randn(4, 3, 8, 8)
    gm, _ = _observed(model, x)
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    res = fp.Calibrate(data)(gm)
    assert res.modified and res.stats["batches"] == 3 and res.stats["unreached"] == 0
    obs = [m for m in gm.modules() if isinstance(m, Observer)]
    assert all(o.calibrated for o in obs)
    torch.testing.assert_close(gm(x), model(x))


def test_calibrate_accepts_tuples_dicts_and_caps_batches():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, a, b):
            return self.fc(a) + b

    gm = fxopt.trace(Two().eval(), (torch.randn(2, 4), torch.randn(2, 4)))
    fp.InsertQuantStubs("x86")(gm)
    fp.PlaceObservers(activation="minmax")(gm)
    data = [(torch.randn(2, 4), torch.randn(2, 4)), {"a": torch.randn(2, 4), "b": torch.randn(2, 4)}] * 3
    assert fp.Calibrate(data, num_batches=2)(gm).stats["batches"] == 2


def test_calibration_errors_are_clear():
    x = torch.randn(2, 3, 8, 8)
    gm, _ = _observed(Net().eval(), x)
    with pytest.raises(fxopt.CalibrationError, match="empty"):
        fp.Calibrate([])(gm)
    with pytest.raises(fxopt.CalibrationError, match="no data"):
        fp.Calibrate()(gm)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(fxopt.CalibrationError, match="NaN"):
        fp.Calibrate([bad])(gm)
    with pytest.raises(fxopt.CalibrationError, match=r"batch 0 \(input shapes \[\(2, 5, 8, 8\)\]\) does not fit"):
        fp.Calibrate([torch.randn(2, 5, 8, 8)])(gm)
    with pytest.raises(fxopt.CalibrationError, match="no observers"):
        fp.Calibrate([x])(fxopt.trace(Net()))
    # through compile the same errors surface unchanged
    with pytest.raises(fxopt.CalibrationError, match="NaN"):
        fxopt.compile(Net().eval(), fxopt.recipes.static_int8([bad]), backend="x86")


# ---- share_cat: one set of qparams for a cat and the inputs computed only for it ----------------------------

class Inception(nn.Module):
    """Three conv branches (one behind a max pool) concatenated, then a 1x1 conv; ``tap=True`` also reads
    the first branch outside the cat, ``boost`` scales the second branch's weights."""

    def __init__(self, tap: bool = False, boost: float = 1.0):
        super().__init__()
        self.tap = tap
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.b3 = nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(14, 5, 1)
        with torch.no_grad():
            self.b2.weight.mul_(boost)
            self.b2.bias.mul_(boost)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = torch.relu(self.b1(x))
        y = torch.cat([a, torch.relu(self.b2(x)), torch.relu(self.b3(self.pool(x)))], 1)
        y = self.head(y)
        return y + a.mean(1, keepdim=True) if self.tap else y


def _cat_prepared(model, share_cat=True, backend="x86"):
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 12, 12) for _ in range(3)]
    prepared = fxopt.compile(model.eval(), fxopt.recipes.static_int8(data, share_cat=share_cat, backend=backend),
                             example_inputs=(data[0][:1],))
    cat = next(n for n in prepared.graph.nodes if n.target is torch.cat)
    return prepared, cat


def _observer_targets(cat):
    return [t.target for t in cat.args[0]], next(iter(cat.users)).target


def test_share_cat_ties_the_inputs_to_the_cat_observer():
    prepared, cat = _cat_prepared(Inception())
    inputs, out = _observer_targets(cat)
    assert inputs == [out] * 3  # every branch's observer node calls the cat's own observer
    assert meta.quant_config(prepared).share_cat
    rec = next(r for r in fxopt.records(prepared) if r.name.startswith("calibrate"))
    assert rec.stats["cats_sharing_qparams"] == 1 and "cat: 3 inputs share its qparams" in rec.notes[-1]
    separate, cat2 = _cat_prepared(Inception(), share_cat=False)
    inputs2, out2 = _observer_targets(cat2)
    assert len({*inputs2, out2}) == 4 and not meta.quant_config(separate).share_cat
    n_obs = lambda gm: sum(isinstance(m, Observer) for m in gm.modules())  # noqa: E731
    assert n_obs(separate) - n_obs(prepared) == 3


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_share_cat_lowered_cat_is_a_copy(backend):
    model = Inception().eval()
    prepared, _ = _cat_prepared(model, backend=backend)
    q = fxopt.lower(prepared, backend)
    seen = []

    def check(mod, inputs, out):  # same qparams in and out, and the output's integers are the inputs' own
        seen.append(all(t.q_scale() == mod.scale and t.q_zero_point() == mod.zero_point for t in inputs))
        torch.testing.assert_close(out.int_repr(), torch.cat([t.int_repr() for t in inputs], mod.dim))

    cats = [m for m in q.modules() if type(m).__name__ == "QCat"]
    assert len(cats) == 1
    cats[0].register_forward_hook(check)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 12, 12)
    out = q(x)
    assert seen and all(seen)  # the hook fires in the eager graph (x86's frozen default runs it once, to trace)
    assert fxopt.compare(model, q, [x]).sqnr_db > 30
    ref = fxopt.lower(prepared, "reference")(x)  # the float simulation agrees with the int8 kernels
    assert sqnr_db(ref, out) > 35


def test_share_cat_leaves_inputs_read_elsewhere_alone():
    prepared, cat = _cat_prepared(Inception(tap=True))
    inputs, out = _observer_targets(cat)
    assert len({*inputs, out}) == 4  # branch a is also read by the tap: nothing is tied
    rec = next(r for r in fxopt.records(prepared) if r.name.startswith("calibrate"))
    assert rec.stats["cats_sharing_qparams"] == 0


def test_share_cat_keeps_inputs_apart_when_ranges_differ_by_orders_of_magnitude():
    prepared, cat = _cat_prepared(Inception(boost=5000.0))
    inputs, out = _observer_targets(cat)
    assert len({*inputs, out}) == 4
    rec = next(r for r in fxopt.records(prepared) if r.name.startswith("calibrate"))
    assert any("ranges differ by" in n and "max_range_ratio=100" in n for n in rec.notes)
    q = fxopt.lower(prepared, "x86")  # as without sharing, lowering keeps that cat float
    assert not [m for m in q.modules() if type(m).__name__ == "QCat"]


def test_share_cat_simulation_switches_each_call_site_on_its_own():
    from fxopt.passes.float_fallback import simulation_of

    prepared, cat = _cat_prepared(Inception())
    sim = simulation_of(prepared)
    obs_names = [t.name for t in cat.args[0]]
    out_name = next(iter(cat.users)).name
    sim.configure(["b1"])  # only the first branch int8: its own output is rounded, not the other branches'
    enabled = {name for name, s in sim.sims.items() if s.enabled}
    assert obs_names[0] in enabled and not enabled & {*obs_names[1:], out_name}
    sim.configure(["cat"])
    enabled = {name for name, s in sim.sims.items() if s.enabled}
    assert {*obs_names, out_name} <= enabled  # an int8 cat reads its quantized inputs and writes its output
    torch.manual_seed(3)
    x = torch.randn(2, 3, 12, 12)
    sim.configure(sim.units)  # all int8: the simulation matches the reference backend's
    ref = fxopt.lower(prepared, "reference")(x)
    assert sqnr_db(ref, sim.run([((x,), {})])[0]) > 30
