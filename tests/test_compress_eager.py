"""compile returns the user's (eager) model with the new layers when the passes only swapped layers
(fxopt/compress/eager.py): same outputs as the graph, report/save/load/compare work, fallbacks to the graph."""

from __future__ import annotations

import dataclasses
import operator
from typing import ClassVar

import pytest
import torch
import torchvision
from torch import nn

import fxopt
from fxopt import passes as fp
from fxopt.compress.eager import graph_form


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def test_pruned_resnet_is_the_eager_model_and_matches_its_graph(tmp_path):
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    out = fxopt.compile(model, [fp.PruneChannels(0.3)], example_inputs=(x,))
    assert type(out) is torchvision.models.ResNet
    gm = graph_form(out)
    assert isinstance(gm, torch.fx.GraphModule)
    assert out.layer1[0].conv1 is gm.get_submodule("layer1.0.conv1")  # one set of parameters
    assert out.layer1[0].conv1.out_channels < 64
    assert sum(p.numel() for p in out.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(out(xb), gm(xb), rtol=0, atol=0)
    # the user's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # records, report notes, compare, save/load
    assert fxopt.records(out)[0].name.startswith("prune-channels") and fxopt.records(out)[0].modified
    notes = {row["name"]: row["notes"] for row in fxopt.report(out).rows}
    assert "protected" in notes["conv1"]
    assert fxopt.compare(gm, out, [x]) is not None
    for suffix in (".pt", ".pt2"):
        path = tmp_path / f"pruned{suffix}"
        fxopt.save(out, path)
        loaded = fxopt.load(path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), out(x), rtol=0, atol=0)


def test_low_rank_eager_and_shared_layer_swapped_under_every_name():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)
            self.again = self.fc  # the same layer under a second name
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(torch.relu(self.again(torch.relu(self.fc(x)))))

    torch.manual_seed(0)
    model = Shared().eval()
    x = torch.randn(2, 32)
    out = fxopt.compile(model, [fp.LowRankFactorize(rank=4)], example_inputs=(x,))
    assert type(out) is Shared
    assert isinstance(out.fc, nn.Sequential) and out.again is out.fc
    with torch.no_grad():
        torch.testing.assert_close(out(x), graph_form(out)(x))
    assert isinstance(model.fc, nn.Linear)


def test_graph_passes_and_no_inputs_keep_the_graph_module():
    model = _resnet()
    x = torch.randn(1, 3, 64, 64)
    folded = fxopt.compile(model, [fp.FoldBatchNorm(), fp.PruneChannels(0.3)], example_inputs=(x,))
    assert isinstance(folded, torch.fx.GraphModule)  # fold-bn rewrote the graph
    mlp = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    assert isinstance(fxopt.compile(mlp, [fp.LowRankFactorize(rank=4)]), torch.fx.GraphModule)  # nothing to check with
    assert isinstance(fxopt.compile(nn.Sequential(nn.ReLU()), [fp.LowRankFactorize(rank=4)],
                                    example_inputs=(torch.randn(1, 64),)), torch.fx.GraphModule)  # nothing done


@dataclasses.dataclass(frozen=True)
class _LyingSwap(fxopt.Pass):
    """Claims to only swap layers, but changes a constant in the graph: the output check must catch it."""

    name = "lying-swap"
    swaps_modules: ClassVar[bool] = True

    def call(self, gm):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is operator.add:
                node.args = (node.args[0], 2.0)
        gm.recompile()
        return fxopt.PassResult(gm, True)


def test_outputs_that_differ_from_the_graph_fall_back_to_the_graph():
    class AddOne(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + 1.0

    out = fxopt.compile(AddOne(), [_LyingSwap()], example_inputs=(torch.randn(1, 4),))
    assert isinstance(out, torch.fx.GraphModule)


def test_graph_form_follows_layers_swapped_after_compile(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    pruned = fxopt.compile(model, [fp.PruneMagnitude(0.5)], example_inputs=(x,))
    assert type(pruned) is nn.Sequential
    fp.ApplyMasks().apply(pruned)  # bakes the masks by swapping layers of the eager model itself
    form = graph_form(pruned)
    assert form.get_submodule("0") is pruned[0] and not hasattr(pruned[0], "parametrizations")
    path = tmp_path / "baked.pt"
    fxopt.save(pruned, path)  # stores the graph over the baked layers (parametrized ones cannot be stored)
    with torch.no_grad():
        torch.testing.assert_close(fxopt.load(path)(x), pruned(x), rtol=0, atol=0)


def test_an_eager_result_compiles_again_and_goes_to_lower_as_its_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    masked = fxopt.compile(model, [fp.PruneMagnitude(0.5)], example_inputs=(x,))
    baked = fxopt.compile(masked, [fp.ApplyMasks()], example_inputs=(x,))
    assert type(baked) is nn.Sequential and not hasattr(baked[0], "parametrizations")
    assert [r.name for r in fxopt.records(baked)] == ["apply-masks"]
    with torch.no_grad():
        torch.testing.assert_close(baked(x), masked(x))
    # lower takes an eager result through its graph form: a float graph gets the backend's own advice
    with pytest.raises(fxopt.UnsupportedError, match="no quant stubs"):
        fxopt.lower(baked, "reference")
