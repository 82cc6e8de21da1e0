"""lower(..., tune=True): per-region int8-vs-float choice (timings stubbed: tests never assert wall-clock)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import recipes
from fxopt.backends import tune


class TwoRegions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.nn.functional.gelu(y)  # no int8 kernel: splits the graph into two int8 regions
        return self.b(y)


def _prepared():
    torch.manual_seed(0)
    calib = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    model = TwoRegions().eval()
    return model, fxopt.compile(model, recipes.static_int8(calib), example_inputs=(calib[0],)), calib


def test_regions_are_the_connected_int8_parts():
    _, prepared, _ = _prepared()
    regions = tune.int8_regions(prepared)
    assert len(regions) == 2
    assert any(n.name == "a" for n in regions[0] + regions[1]) and any(n.name == "b" for n in regions[0] + regions[1])


@pytest.mark.parametrize("float_wins", [True, False])
def test_tune_keeps_float_exactly_where_float_is_faster(monkeypatch, float_wins):
    model, prepared, calib = _prepared()

    def fake_timing(modules, args, rounds):
        return {"int8": 2.0, "float": 1.0} if float_wins else {"int8": 1.0, "float": 2.0}

    monkeypatch.setattr(tune, "_median_ms", fake_timing)
    lowered = fxopt.lower(prepared, "x86", tune=True, example_inputs=(calib[0],))
    code = lowered.graph_module.code
    assert ("quantize_per_tensor" in code) is (not float_wins)
    islands = [i for i in fxopt.meta.float_islands(lowered.graph_module) if i.op == "int8 region"]
    assert len(islands) == (2 if float_wins else 0)
    with torch.no_grad():
        ref, out = model(calib[1]), lowered(calib[1])
    if float_wins:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-2


def test_tune_needs_example_inputs():
    model, prepared, calib = _prepared()
    # compile recorded the inputs it traced with: tune times on those
    tuned = fxopt.lower(prepared, "x86", tune=True)
    with torch.no_grad():
        ref, got = model(calib[1]), tuned(calib[1])
    assert 10 * torch.log10(ref.pow(2).sum() / (got - ref).pow(2).sum()) > 20
    fxopt.meta.set_example_inputs(prepared, ())
    with pytest.raises(ValueError, match="example_inputs"):
        fxopt.lower(prepared, "x86", tune=True)
