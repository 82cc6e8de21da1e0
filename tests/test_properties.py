"""Property tests: on random small conv/linear/bn/relu/add/cat graphs, every float pass (alone and in
sequence) keeps the graph valid (lint + fxopt.verify) and the outputs equal to the original model's."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxopt
from fxopt import passes as fp

STEPS = ["conv", "convT", "bn", "fbn", "relu", "relu-f", "relu6", "hardtanh", "add", "cat", "dropout",
         "identity", "mul1", "flatten-noop"]
HEAD = ["none", "linear", "linear-bn", "linear-bn-relu"]


class RandomNet(nn.Module):
    """A network built from ``recipe``: each step reads the last value (and maybe an earlier one)."""

    def __init__(self, recipe: list[tuple[str, int]], head: str, in_channels: int = 3, size: int = 5):
        super().__init__()
        self.recipe, self.head = [], head
        self.layers = nn.ModuleList()
        channels = [in_channels]  # channel count of every value so far
        for kind, pick in recipe:
            c = channels[-1]
            out = c
            if kind == "conv":
                out = 2 + pick % 5
                groups = c if pick % 3 == 0 and out % c == 0 else 1
                layer = nn.Conv2d(c, out, 1 + 2 * (pick % 2), padding=pick % 2, groups=groups, bias=pick % 4 != 1)
            elif kind == "convT":
                out = 2 + pick % 4
                layer = nn.ConvTranspose2d(c, out, 3, padding=1, bias=pick % 2 == 0)
            elif kind in ("bn", "fbn"):
                layer = nn.BatchNorm2d(c, affine=pick % 5 != 0)
            elif kind == "relu":
                layer = nn.ReLU(inplace=pick % 2 == 0)
            elif kind == "relu6":
                layer = nn.ReLU6()
            elif kind == "dropout":
                layer = nn.Dropout(0.5)
            elif kind == "identity":
                layer = nn.Identity()
            elif kind in ("add", "cat"):
                same = [i for i, ch in enumerate(channels) if ch == c]
                other = same[pick % len(same)] if kind == "add" else pick % len(channels)
                if kind == "cat":
                    out = c + channels[other]
                layer, pick = nn.Identity(), other
            else:
                layer = nn.Identity()
            self.layers.append(layer)
            self.recipe.append((kind, pick))
            channels.append(out)
        flat = channels[-1] * size * size
        self.fc = nn.Linear(flat, 6) if head != "none" else nn.Identity()
        self.bn1d = nn.BatchNorm1d(6) if "bn" in head else nn.Identity()

    def forward(self, x):
        values = [x]
        for (kind, pick), layer in zip(self.recipe, self.layers):
            y = values[-1]
            if kind == "fbn":
                y = F.batch_norm(y, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.1,
                                 layer.eps)
            elif kind == "relu-f":
                y = F.relu(y) if pick % 2 else y.relu()
            elif kind == "hardtanh":
                y = F.hardtanh(y, 0.0, 6.0) if pick % 2 else F.hardtanh(y, -1.0, 1.0)
            elif kind == "add":
                y = y + values[pick]
            elif kind == "cat":
                y = torch.cat([y, values[pick]], 1)
            elif kind == "mul1":
                y = y * 1 if pick % 2 else y + 0.0
            elif kind == "flatten-noop":
                y = torch.flatten(y, 3)
            else:
                y = layer(y)
            values.append(y)
        y = torch.flatten(values[-1], 1)
        if self.head != "none":
            y = self.bn1d(self.fc(y))
            if self.head.endswith("relu"):
                y = torch.relu(y)
        return y


@st.composite
def random_nets(draw):
    recipe = draw(st.lists(st.tuples(st.sampled_from(STEPS), st.integers(0, 59)), min_size=1, max_size=10))
    head = draw(st.sampled_from(HEAD))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = RandomNet(recipe, head)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.3, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


PIPELINES = {
    "eliminate-dead-code": [fp.EliminateDeadCode()],
    "remove-identities": [fp.RemoveIdentities()],
    "fold-bn": [fp.FoldBatchNorm()],
    "fuse-activations": [fp.FuseActivations()],
    "all": [fp.RemoveIdentities(), fp.FoldBatchNorm(), fp.FuseActivations(), fp.EliminateDeadCode()],
}


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=random_nets())
def test_passes_keep_graph_valid_and_numerics(pipeline, model):
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(x)
    notes: list[str] = []
    for p in PIPELINES[pipeline]:
        result = p(gm)
        notes += result.notes
        gm.graph.lint()
        fxopt.verify(gm, pass_name=p.name)
        again = p(gm)  # a second run finds nothing left to do
        assert again.modified is False, (p.name, again.stats)
    with torch.no_grad():
        out = gm(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= 1e-5 * scale, notes
    if "fold-bn" in [p.name for p in PIPELINES[pipeline]]:
        # Every BatchNorm left in the graph was skipped for a reason the pass wrote down.
        left = [n.name for n in gm.graph.nodes if n.target is F.batch_norm or (
            n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm))]
        assert all(any(note.startswith(name + ":") for note in notes) for name in left), (left, notes)


# ---- static int8: random graphs lowered for x86 / qnnpack stay within a few steps of the simulation ------

INT8_STEPS = ["conv", "conv-dw", "conv-reuse", "conv-dead", "linear", "linear-reuse", "bn", "relu", "relu-f", "add",
              "cat", "maxpool", "avgpool", "hardswish", "hardswish-f", "sigmoid", "mul", "reshape", "flatten"]
INT8_EXAMPLES = int(os.environ.get("FXOPT_INT8_EXAMPLES", "0")) or None
# each example compiles, lowers and checks a model (about a second): shrinking takes many minutes, and the
# failing example's recipe is printed by RandomInt8Net's repr anyway
_NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


class RandomInt8Net(nn.Module):
    """Like :class:`RandomNet`, with the int8 op set and modules called more than once (reused)."""

    def __init__(self, recipe: list[tuple[str, int]], width: int = 6):
        super().__init__()
        self.recipe, self.width = [], width
        self.layers = nn.ModuleList()
        channels = [3]
        convs: list[int] = []  # indices of layers that are c -> c convs (reusable)
        linears: list[int] = []
        for kind, pick in recipe:
            c, out, index = channels[-1], channels[-1], len(self.layers)
            if kind == "conv-reuse" and any(self.layers[i].in_channels == c for i in convs):
                index = [i for i in convs if self.layers[i].in_channels == c][pick % len(convs) % max(1, len(
                    [i for i in convs if self.layers[i].in_channels == c]))]
                layer = None
            elif kind == "linear-reuse" and linears:
                index, layer = linears[pick % len(linears)], None
            elif kind in ("conv", "conv-reuse", "conv-dw"):
                dw = kind == "conv-dw"
                out = c if dw or kind == "conv-reuse" else 2 + pick % 6
                k = 1 + 2 * (pick % 2)
                layer = nn.Conv2d(c, out, k, padding=k // 2, groups=c if dw else 1, bias=pick % 4 != 1)
                if out == c and not dw:
                    convs.append(index)
            elif kind == "conv-dead":  # conv + ReLU that is all zeros in calibration (a dead ReLU): scale ~1e-7
                out = 2 + pick % 6
                layer = nn.Sequential(nn.Conv2d(c, out, 1 + 2 * (pick % 2), padding=pick % 2), nn.ReLU())
                with torch.no_grad():  # -100: dead on every input; -3: dead in calibration, alive on some test inputs
                    layer[0].bias.fill_(-100.0 if pick % 3 else -3.0)
            elif kind in ("linear", "linear-reuse"):
                layer = nn.Linear(width, width)
                linears.append(index)
            elif kind == "bn":
                layer = nn.BatchNorm2d(c)
            elif kind == "relu":
                layer = nn.ReLU(inplace=pick % 2 == 0)
            elif kind == "maxpool":
                layer = nn.MaxPool2d(3, 1, 1)
            elif kind == "avgpool":
                layer = nn.AvgPool2d(3, 1, 1)
            elif kind == "hardswish":
                layer = nn.Hardswish()
            else:
                layer = nn.Identity()
            if kind in ("add", "mul"):
                same = [i for i, ch in enumerate(channels) if ch == c]
                pick = same[pick % len(same)]
            elif kind == "cat":
                pick = pick % len(channels)
                out = c + channels[pick]
            if layer is not None:
                self.layers.append(layer)
            self.recipe.append((kind, pick, index))
            channels.append(out)
        self.head = nn.Linear(channels[-1] * width * width, 5)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe}"

    def forward(self, x):
        values = [x]
        for kind, pick, index in self.recipe:
            y = values[-1]
            if kind == "relu-f":
                y = F.relu(y) if pick % 2 else y.relu()
            elif kind == "hardswish-f":
                y = F.hardswish(y)
            elif kind == "sigmoid":
                y = torch.sigmoid(y)
            elif kind == "add":
                y = y + values[pick]
            elif kind == "mul":
                y = y * values[pick]
            elif kind == "cat":
                y = torch.cat([y, values[pick]], 1)
            elif kind == "reshape":
                n, c, h, w = y.shape
                y = y.reshape(n, c, h * w).reshape(n, c, h, w)
            elif kind == "flatten":
                y = torch.flatten(y, 2).view(y.shape)
            else:
                y = self.layers[index](y)
            values.append(y)
        return self.head(torch.flatten(values[-1], 1))


@st.composite
def random_int8_nets(draw):
    recipe = draw(st.lists(st.tuples(st.sampled_from(INT8_STEPS), st.integers(0, 59)), min_size=1, max_size=10))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = RandomInt8Net(recipe)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.3, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval(), seed


def _int8_property(model, seed, backend):
    from fxopt import recipes
    from fxopt.backends.reference import ReferenceBackend
    from fxopt.lower_check import check_lowering

    gen = torch.Generator().manual_seed(seed)
    calib = [torch.randn(2, 3, 6, 6, generator=gen) for _ in range(3)]
    x = torch.randn(2, 3, 6, 6, generator=gen)
    prepared = fxopt.compile(model, recipes.static_int8(calib, backend=backend, observer="minmax"),
                             example_inputs=(calib[0],))
    q = fxopt.lower(prepared, backend, check=True, example_inputs=(x,))  # NumericsError names a bad layer
    sim = ReferenceBackend(fxopt.backends.get(backend).spec).lower(prepared)
    result = check_lowering(sim, q, (calib[1],))
    assert not result.unmatched, result.unmatched
    assert result.first_failure is None, str(result.first_failure)
    with torch.no_grad():
        out, ref, expected = q(x), sim(x), model(x)
    assert out.shape == expected.shape == ref.shape and torch.isfinite(out).all()
    return result


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_dead_values_lower_like_the_simulation(backend):
    """Values that are all zeros in calibration (dead ReLUs) read by a conv, a cat, a depthwise conv, an add and a
    mul stay within the check's steps. With the float32-eps scale such a value used to get, qnnpack's depthwise
    conv reading it came out 122 steps off (its int32 bias overflowed); the property run left such graphs out."""
    from fxopt import recipes
    from fxopt.quant.observers import Observer

    # conv-dead pick 4: bias -100 (dead everywhere), 6 channels; pick 3: bias -3 (dead in calibration only)
    model = RandomInt8Net([("conv-dead", 4), ("conv", 1), ("cat", 1), ("conv-dw", 0), ("conv-dead", 3),
                           ("conv", 4), ("add", 0), ("mul", 0), ("relu", 0)]).eval()
    calib = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    prepared = fxopt.compile(model, recipes.static_int8(calib, backend=backend, observer="minmax"),
                             example_inputs=(calib[0],))
    dead = [m for m in prepared.modules() if isinstance(m, Observer) and float(m.max_val.abs().max()) == 0]
    assert len(dead) >= 2, prepared  # both dead convs really are dead in calibration
    assert all(float(m.calculate_qparams()[0]) == 1.0 for m in dead)  # not float32 eps: see Observer
    result = _int8_property(model, 0, backend)
    assert len(result.layers) >= 6, [r.name for r in result.layers]  # the convs, cat, add and mul were compared


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
# the default run is a fixed set of graphs (derandomized: CI is repeatable); the slow run below explores afresh
@settings(max_examples=INT8_EXAMPLES or 25, deadline=None, phases=_NO_SHRINK, derandomize=INT8_EXAMPLES is None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=random_int8_nets())
def test_static_int8_lowering_matches_simulation(backend, net):
    """50 random graphs by default (25 per backend); FXOPT_INT8_EXAMPLES=500 for the slow run's 1,000."""
    _int8_property(*net, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
@settings(max_examples=500, deadline=None, phases=_NO_SHRINK,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=random_int8_nets())
def test_static_int8_lowering_matches_simulation_1000(backend, net):
    _int8_property(*net, backend)
