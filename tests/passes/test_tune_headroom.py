"""TuneHeadroom: the histogram observers' range widening picked by 2-fold cross-validation on the batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import passes as fp
from fxopt.quant.observers import HistogramObserver


def _identity_net():
    fc = nn.Linear(16, 16)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(16))
        fc.bias.zero_()
    return nn.Sequential(fc).eval()


def _observed(model):
    gm = fxopt.trace(model, (torch.randn(2, 16),))
    fp.InsertQuantStubs("x86")(gm)
    fp.PlaceObservers(activation_options={"clip_weight": 16.0})(gm)
    return gm


def _headrooms(gm):
    return {m.headroom for m in gm.modules() if isinstance(m, HistogramObserver)}


def test_widens_where_held_out_batches_reach_past_the_fitted_range():
    gen = torch.Generator().manual_seed(0)
    # every other batch reaches 1.4x further: a range fitted on one half clips the other half's tails
    data = [torch.rand(64, 16, generator=gen) * (1.4 if i % 2 else 1.0) for i in range(4)]
    gm = _observed(_identity_net())
    res = fp.TuneHeadroom(data)(gm)
    assert res.modified and res.stats["headroom"] > 1.0 and _headrooms(gm) == {res.stats["headroom"]}
    scores = res.stats["sqnr_db"]
    assert scores[res.stats["headroom"]] > scores[1.0] + 1.0  # clipping a 1.4x tail costs more than coarser steps
    assert "2-fold over 4 batches" in res.notes[0]


def test_keeps_the_fitted_range_when_every_batch_spans_the_same_interval():
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):  # the same support [0, 1] in every batch, its ends included
        x = torch.rand(64, 16, generator=gen)
        x[0], x[1] = 0.0, 1.0
        data.append(x)
    gm = _observed(_identity_net())
    res = fp.TuneHeadroom(data)(gm)
    assert res.stats["headroom"] == 1.0 and not res.modified and _headrooms(gm) == {1.0}
    assert res.stats["sqnr_db"][1.0] > res.stats["sqnr_db"][1.25]


def test_order_checks_and_what_it_cannot_do():
    data = [torch.rand(8, 16) for _ in range(2)]
    gm = _observed(_identity_net())
    fp.Calibrate(data)(gm)
    with pytest.raises(fxopt.UnsupportedError, match="before Calibrate"):
        fp.TuneHeadroom(data)(gm)
    one = fp.TuneHeadroom(data[:1])(_observed(_identity_net()))
    assert not one.modified and "fewer than 2" in one.notes[0]
    with pytest.raises(ValueError, match=">= 1"):
        fp.TuneHeadroom(data, candidates=(0.9, 1.0))
    with pytest.raises(fxopt.CalibrationError, match="needs data"):
        fp.TuneHeadroom()
    with pytest.raises(ValueError, match="headroom"):
        fxopt.recipes.static_int8(data, headroom=0.5)


def test_recipe_auto_headroom_runs_before_calibration_and_lowers():
    gen = torch.Generator().manual_seed(2)
    data = [torch.rand(32, 16, generator=gen) * (1.4 if i % 2 else 1.0) for i in range(4)]
    model = _identity_net()
    steps = fxopt.recipes.static_int8(data, headroom="auto")
    names = [s.name for s in steps]
    assert names.index("tune-headroom") == names.index("place-observers") + 1 < names.index("calibrate")
    q = fxopt.compile(model, steps, example_inputs=(data[0][:2],), backend="x86")
    x = torch.rand(8, 16, generator=gen) * 1.4
    assert fxopt.compare(model, q, [x]).sqnr_db > 35
