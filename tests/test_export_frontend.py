"""The torch.export frontend: dynamic dims, module calls lifted back, expanded buffers, output types."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import meta, recipes
from fxopt.quant.nn import DynamicLinear

aten = torch.ops.aten


class Mixed(nn.Module):
    """Conv (strided, padded), Linear, Embedding, a tied weight and an expanded buffer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 20, bias=False)
        self.tied.weight = self.emb.weight  # read by the embedding lookup and by this Linear
        self.odd = nn.Conv1d(8, 8, 3, padding=1)
        self.register_buffer("positions", torch.arange(16).expand(1, -1), persistent=False)

    def forward(self, ids):
        h = self.emb(ids) + self.positions[:, : ids.shape[1], None].float()
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = torch.relu(self.fc(h))
        odd = F.conv1d(h.transpose(1, 2), self.odd.weight, self.odd.bias, padding=2)  # not odd's forward
        return {"logits": self.tied(h), "odd": odd}


def test_module_calls_are_lifted_with_the_models_names():
    torch.manual_seed(0)
    model = Mixed().eval()
    ids = torch.randint(1, 20, (2, 12))
    gm = fxopt.trace(model, (ids,), mode="export")
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"} - {"_guards_fn"}
    assert calls == {"conv", "fc"}
    assert type(gm.get_submodule("fc")) is nn.Linear and type(gm.get_submodule("conv")) is nn.Conv1d
    functions = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.embedding.default in functions  # its weight is tied: stays aten-level
    assert aten.linear.default in functions
    assert aten.conv1d.default in functions  # padding=2 is not odd's own forward
    for batch, length in ((2, 12), (1, 5), (3, 16)):  # dynamic dims: other shapes run
        x = torch.randint(1, 20, (batch, length))
        with torch.no_grad():
            out, ref = gm(x), model(x)
        assert list(out) == ["logits", "odd"]
        for k in out:
            torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-5)


def test_lifted_modules_share_parameters_and_passes_see_them():
    model = Mixed().eval()
    ids = torch.randint(1, 20, (2, 8))
    gm = fxopt.trace(model, (ids,), mode="export")
    assert {n for n, _ in gm.get_submodule("fc").named_parameters()} == {"weight", "bias"}
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
    q = fxopt.compile(gm, recipes.dynamic_int8(), example_inputs=(ids,))
    assert isinstance(q.get_submodule("fc"), DynamicLinear)
    with torch.no_grad():
        out, ref = q(ids)["logits"], model(ids)["logits"]
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_retracing_an_exported_graph_keeps_it_and_its_metadata():
    model = Mixed().eval()
    ids = torch.randint(1, 20, (2, 8))
    gm = fxopt.trace(model, (ids,), mode="export")
    again = fxopt.trace(gm, (ids,))
    assert again is not gm
    assert [n.op for n in again.graph.nodes] == [n.op for n in gm.graph.nodes]
    assert isinstance(again(ids), dict)


class InplaceOnExpanded(nn.Module):
    """Root code that defeats torch.fx twice, as transformers' does: item assignment on a proxy
    (symbolic) and ``isinstance(x, torch.Tensor)`` false for a proxy (value tracing); an expanded buffer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("ids", torch.zeros(1, 6, dtype=torch.long).expand(2, -1), persistent=False)

    def forward(self, x):
        h = self.fc(x)
        gate = torch.zeros_like(h)
        gate[:, 0] = 1.0  # in-place write: a proxy takes no item assignment
        options = {"scale": 2.0} if isinstance(x, torch.Tensor) else x  # a proxy is no Tensor
        ids = self.ids[:, : x.shape[1]].clone()
        ids[:, 0] = 1
        return {"y": h * gate * options.get("scale"), "ids": ids}


def test_auto_falls_back_to_export_at_the_root_and_restores_expanded_buffers():
    model = InplaceOnExpanded().eval()
    x = torch.randn(2, 4)
    gm = fxopt.trace(model, (x,))
    assert any("traced with torch.export" in note for note in meta.trace_notes(gm))
    assert fxopt.untraced(gm) == []
    assert model.ids.stride() == (0, 1)  # the user's expanded buffer is as it was
    with torch.no_grad():
        out, ref = gm(x), model(x)
    torch.testing.assert_close(out["y"], ref["y"])
    assert torch.equal(out["ids"], ref["ids"])


def test_export_failure_in_auto_says_both_failed():
    class Numpy(nn.Module):
        def forward(self, x):
            return torch.from_numpy(x.numpy() * 2)

    with pytest.raises(fxopt.TraceError, match="torch.export failed too") as info:
        fxopt.trace(Numpy(), (torch.randn(3),))
    assert info.value.module == ""
