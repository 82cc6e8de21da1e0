"""A model whose root no frontend traces: module-level passes still run, graph passes say they had no graph."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import fxopt
from fxopt import meta, recipes
from fxopt import passes as fp
from fxopt.quant.nn import DynamicLinear


class NumpyRoot(nn.Module):
    """The root's forward leaves torch (numpy): neither torch.fx nor torch.export can follow it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x, shift=0.0):
        y = self.fc(x) * self.scale
        y = torch.from_numpy(y.detach().numpy().copy()) + shift
        out = self.head(y)
        return {"logits": out if not self.training else out * 0}


def test_graph_only_pipeline_still_raises_and_trace_never_keeps_the_root():
    x = torch.randn(3, 8)
    with pytest.raises(fxopt.TraceError, match="torch.export failed too.*untraced root"):
        fxopt.compile(NumpyRoot().eval(), recipes.fuse(), example_inputs=(x,))
    with pytest.raises(fxopt.TraceError):
        fxopt.trace(NumpyRoot().eval(), (x,))
    with pytest.raises(fxopt.TraceError):  # symbolic mode never falls back
        fxopt.compile(NumpyRoot().eval(), recipes.dynamic_int8(), example_inputs=(x,), trace_mode="symbolic")


@pytest.mark.parametrize("with_examples", [True, False])
def test_dynamic_int8_on_untraced_root(with_examples):
    torch.manual_seed(0)
    model = NumpyRoot().eval()
    x = torch.randn(5, 8)
    q = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=(x,) if with_examples else None)
    assert fxopt.untraced(q) == [""]
    assert "untraced root" in meta.leaves(q)[0].reason and "NumpyRoot" in meta.trace_notes(q)[0]
    records = {r.name: r for r in fxopt.records(q)}
    assert records["remove-identities"].modified is False
    assert records["remove-identities"].notes[0].startswith("no graph: remove-identities")
    assert records["quantize-dynamic"].modified is True
    assert records["quantize-dynamic"].stats == {"Linear": 2}
    assert isinstance(q.fc, DynamicLinear) and isinstance(q.head, DynamicLinear)  # the model's own names
    assert type(model.head) is nn.Linear  # the user's model is untouched
    with torch.no_grad():
        for shift in (0.0, 1.5):
            out, ref = q(x, shift=shift), model(x, shift)
            assert list(out) == ["logits"]
            torch.testing.assert_close(out["logits"], ref["logits"], atol=0.02, rtol=0)
            assert not torch.equal(out["logits"], ref["logits"])  # int8 weights really run


def test_untraced_root_signature_training_flag_and_copies():
    model = NumpyRoot().eval()
    x = torch.randn(2, 8)
    q = fxopt.compile(model, [fp.QuantizeDynamic()], example_inputs=(x,))
    assert list(inspect.signature(q.forward).parameters) == ["x", "shift"]
    assert inspect.signature(q.forward).parameters["shift"].default == 0.0
    copied = copy.deepcopy(q)
    assert copied.fc is not q.fc
    assert copied.fxopt_untraced_root.model is not q.fxopt_untraced_root.model
    with torch.no_grad():
        torch.testing.assert_close(copied(x)["logits"], q(x)["logits"])
        assert copied.fxopt_untraced_root.model.fc is copied.fc  # each copy runs its own modules
        q.train()  # the root's own code sees the flag of the GraphModule
        assert torch.count_nonzero(q(x)["logits"]) == 0
        q.eval()
        assert torch.count_nonzero(q(x)["logits"]) > 0


def test_fp16_on_untraced_root_converts_root_parameters_too():
    torch.manual_seed(0)
    model = NumpyRoot().eval()
    x = torch.randn(4, 8)
    q = fxopt.compile(model, recipes.fp16(), example_inputs=(x,))
    records = {r.name: r for r in fxopt.records(q)}
    assert records["fold-bn"].modified is False and "no graph" in records["fold-bn"].notes[0]
    assert records["convert-fp16"].modified is True
    assert records["convert-fp16"].stats["Linear"] == 2 and records["convert-fp16"].stats["attributes"] == 1
    assert q.scale.dtype == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(q(x)["logits"], model(x)["logits"], atol=5e-3, rtol=0)


def test_module_level_marker_decides_what_runs():
    model = NumpyRoot().eval()
    x = torch.randn(2, 8)

    class ZeroHeadBias(fxopt.Pass):
        name = "zero-head-bias"
        module_level = True

        def call(self, gm):
            gm.get_submodule("head").bias.data.zero_()
            return fxopt.PassResult(gm, True)

    class CountNodes(fxopt.Pass):
        name = "count-nodes"

        def call(self, gm):  # pragma: no cover - must not run on an untraced root
            raise AssertionError("a graph pass ran on an untraced root")

    assert fxopt.Pass.module_level is False and fp.QuantizeDynamic.module_level and fp.ConvertFP16.module_level
    q = fxopt.compile(model, [CountNodes(), ZeroHeadBias()], example_inputs=(x,))
    records = {r.name: r for r in fxopt.records(q)}
    assert records["count-nodes"].modified is False and "no graph" in records["count-nodes"].notes[0]
    assert records["zero-head-bias"].modified is True
    assert torch.count_nonzero(q.head.bias) == 0 and torch.count_nonzero(model.head.bias) > 0
    result = fp.FoldBatchNorm()(q)  # a graph pass called directly says the same
    assert result.modified is False and result.notes[0].startswith("no graph")


def test_signature_with_unprintable_default_falls_back_to_varargs():
    sentinel = object()

    class Odd(NumpyRoot):
        def forward(self, x, marker=sentinel):
            return super().forward(x)

    q = fxopt.compile(Odd().eval(), recipes.dynamic_int8())
    assert [p.kind for p in inspect.signature(q.forward).parameters.values()] == [
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert q(x, marker=sentinel)["logits"].shape == (2, 2)
