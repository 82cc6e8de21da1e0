"""InsertQuantStubs: where quant/dequant nodes go, what stays float, and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import meta
from fxopt import passes as fp
from fxopt.quant.stubs import DeQuantStub, QuantStub


def _stub_kinds(gm):
    """[(stub kind, input node name, [user names])] in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, (QuantStub, DeQuantStub)):
                kind = "quant" if isinstance(mod, QuantStub) else "dequant"
                out.append((kind, node.args[0].name, sorted(u.name for u in node.users)))
    return out


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = self.pool(self.relu(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


def _prepare(model, x, backend="x86"):
    gm = fxopt.trace(model, (x,))
    res = fp.InsertQuantStubs(backend)(gm)
    return gm, res


def test_one_region_gets_one_quant_at_entry_and_one_dequant_at_exit():
    x = torch.randn(2, 3, 8, 8)
    model = ConvNet().eval()
    gm, res = _prepare(model, x)
    assert res.modified
    assert _stub_kinds(gm) == [("quant", "x", ["conv"]), ("dequant", "fc", ["output"])]
    int8 = [n.name for n in gm.graph.nodes if meta.quant_region(n) == "x86"]
    assert {"conv", "relu", "pool", "flatten", "fc"} <= set(int8)
    # still a float model: identical outputs
    torch.testing.assert_close(gm(x), model(x))


class WithIsland(nn.Module):
    """conv -> (float-only op) -> conv: the middle op becomes a float island."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = torch.erf(y)  # no int8 kernel
        return self.b(y)


def test_unsupported_op_stays_float_between_dequant_and_quant():
    x = torch.randn(1, 3, 4, 4)
    model = WithIsland().eval()
    gm, res = _prepare(model, x)
    assert sorted(_stub_kinds(gm)) == [
        ("dequant", "a", ["erf"]),
        ("dequant", "b", ["output"]),
        ("quant", "erf", ["b"]),
        ("quant", "x", ["a"]),
    ]
    islands = meta.float_islands(gm)
    assert [i.node for i in islands] == ["erf"] and "no int8 kernel" in islands[0].reason
    assert res.stats["float_ops"] == 1
    torch.testing.assert_close(gm(x), model(x))


class LonelyAdd(nn.Module):
    def forward(self, x, y):
        return torch.erf(x) + y


def test_nothing_to_quantize_is_not_modified():
    gm = fxopt.trace(LonelyAdd())
    res = fp.InsertQuantStubs("x86")(gm)
    assert res.modified is False
    assert _stub_kinds(gm) == []


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv1(x)
        return torch.relu(self.conv2(y) + y), y.size(0)


def test_residual_add_is_int8_and_size_reads_int8_without_dequant():
    x = torch.randn(2, 4, 5, 5)
    model = Residual().eval()
    gm, _ = _prepare(model, x)
    int8 = {n.name for n in gm.graph.nodes if meta.quant_region(n)}
    assert {"conv1", "conv2", "add", "relu"} <= int8
    kinds = _stub_kinds(gm)
    assert ("quant", "x", ["conv1"]) in kinds and ("dequant", "relu", ["output"]) in kinds
    assert not any(k == "dequant" and src == "conv1" for k, src, _ in kinds)  # size() reads int8 directly
    out, n = gm(x)
    ref, n_ref = model(x)
    torch.testing.assert_close(out, ref)
    assert n == n_ref


def test_integer_inputs_stay_float():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, idx):
            return self.fc(self.emb(idx))

    idx = torch.randint(0, 10, (3, 5))
    gm, _ = _prepare(Emb().eval(), idx)
    assert _stub_kinds(gm) == [("quant", "emb", ["fc"]), ("dequant", "fc", ["output"])]


def test_runs_once_and_unknown_backend_errors():
    gm, _ = _prepare(ConvNet().eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(fxopt.UnsupportedError, match="already has quant/dequant stubs"):
        fxopt.PassManager([fp.InsertQuantStubs("x86")])(gm)
    with pytest.raises(ValueError, match="unknown backend"):
        fp.InsertQuantStubs("nope")(fxopt.trace(ConvNet()))


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_torchvision_resnet18_is_one_region(backend):
    import torchvision

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gm, res = _prepare(model, x, backend)
    kinds = _stub_kinds(gm)
    assert [k for k, _, _ in kinds] == ["quant", "dequant"]
    assert res.stats["float_ops"] == 0
    torch.testing.assert_close(gm(x), model(x))
