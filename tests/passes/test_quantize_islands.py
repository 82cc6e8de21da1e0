"""QuantizeIslands: static int8 gives the Linear layers inside float islands (modules the tracer kept as opaque
calls, e.g. Faster R-CNN's roi_heads) dynamic int8, on the backends that run PyTorch modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import recipes
from fxopt.passes import QuantizeIslands
from fxopt.quant.nn import DynamicLinear


class _Branchy(nn.Module):
    """Data-dependent control flow: the tracer keeps it as a float island."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x) if bool(x.sum() > -1e9) else -self.fc(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.branchy = _Branchy()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.branchy(x)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = _Net().eval()
    calib = [torch.randn(8, 3, 4, 4) for _ in range(4)]
    return model, calib


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_island_linear_goes_dynamic_int8_and_check_passes(net, backend):
    model, calib = net
    q = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(calib[0],), backend=backend, check=True)
    assert fxopt.untraced(q) == ["branchy"]
    island = q.graph_module.get_submodule("branchy")
    assert isinstance(island.fc, DynamicLinear)  # before: nn.Linear, float
    assert type(model.branchy.fc) is nn.Linear  # the user's model is not changed
    x = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        assert _cosine(q(x), model(x)) > 0.999


def test_islands_float_keeps_them_float(net):
    model, calib = net
    q = fxopt.compile(model, recipes.static_int8(calib, islands="float"), example_inputs=(calib[0],), backend="x86")
    assert type(q.graph_module.get_submodule("branchy").fc) is nn.Linear
    with pytest.raises(ValueError, match="islands='int8'"):
        recipes.static_int8(calib, islands="int8")


def test_pass_alone_reports_what_it_did(net):
    model, calib = net
    gm = fxopt.compile(model, example_inputs=(calib[0],))
    result = QuantizeIslands()(gm)
    assert result.modified and result.intended_change and result.stats == {"Linear": 1}
    assert isinstance(gm.get_submodule("branchy").fc, DynamicLinear)
    assert isinstance(gm.get_submodule("head"), nn.Linear)  # traced layers are static int8's business
    # an export backend cannot carry dynamic int8 modules: nothing changes, and the note says why
    gm = fxopt.compile(model, example_inputs=(calib[0],))
    result = QuantizeIslands(backend="onnx")(gm)
    assert not result.modified and "onnx backend exports the graph" in result.notes[0]
    # a graph without islands: nothing to do, nothing to say
    plain = fxopt.compile(nn.Sequential(nn.Linear(4, 4)).eval(), example_inputs=(torch.randn(1, 4),))
    result = QuantizeIslands()(plain)
    assert not result.modified and result.notes == []
