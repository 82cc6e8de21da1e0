"""PlaceObservers (where observers go, shared qparams) and Calibrate (data handling, errors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import meta
from fxopt import passes as fp
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
