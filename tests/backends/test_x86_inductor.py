"""backend="x86-inductor": fxopt's calibrated graph as decomposed Q/DQ, exported and compiled by TorchInductor with
torchao's x86 int8 passes (real compiles, no mocks; the compile tests cost ~10-30 s each on 2 busy cores)."""

from __future__ import annotations

import builtins
import copy
import shutil

import pytest
import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt import meta, recipes
from fxopt.errors import UnsupportedError
from fxopt.quant.simulate import QuantDequant

pytest.importorskip("torchao")

from fxopt.backends import x86_inductor as xi  # noqa: E402
from fxopt.backends.x86_inductor import (  # noqa: E402
    DecomposedQDQ, Int8Weight, Int8WeightLayer, X86InductorBackend, X86InductorModule, decomposed_graph)
from tests.helpers import sqnr  # noqa: E402


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(self.pool(x)))))


class TinyEfficient(nn.Module):
    """EfficientNet's pieces: conv+BN+SiLU stem, an MBConv (1x1 expand + SiLU, depthwise + SiLU, squeeze-excite,
    1x1 projection, residual add), a conv+ReLU and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False), nn.BatchNorm2d(48), nn.SiLU())
        self.se = SqueezeExcite(48)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.tail = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        x = self.tail(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _trained_looking(model: nn.Module, size: int) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    model = _trained_looking(TinyEfficient(), 32)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)]
    x = torch.randn(1, 3, 32, 32, generator=gen)
    prepared = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(x,))
    return model, prepared, x


def test_registered_and_accepts_x86_preparation():
    backend = fxopt.backends.get("x86-inductor")
    assert isinstance(backend, X86InductorBackend) and backend.name == "x86-inductor"
    assert "x86-inductor" in fxopt.backends.available()
    assert backend.accepts_prepared_for("x86") and not backend.accepts_prepared_for("qnnpack")
    assert fxopt.backends.X86InductorBackend is X86InductorBackend
    assert backend.spec.activation == fxopt.backends.get("x86").spec.activation


def test_decomposed_graph_is_the_reference_simulation(tiny):
    """Without the fusion-friendly placement, the decomposed graph computes exactly what the reference does."""
    model, prepared, x = tiny
    before = copy.deepcopy(prepared.state_dict())
    graph, stats = decomposed_graph(prepared, fuse_activation=False, unit_maps="conv", args=(x,))
    assert stats["fused_add"] == stats["fused_activation"] == 0
    assert all(torch.equal(before[k], v) for k, v in prepared.state_dict().items())  # not changed
    modules = list(graph.modules())
    assert not any(type(m) is QuantDequant for m in modules)  # every float rounding decomposed
    assert any(isinstance(m, DecomposedQDQ) for m in modules) and stats["roundings"] > 10
    weights = [m for m in modules if isinstance(m, Int8Weight)]
    assert len(weights) == stats["int8_weights"] == 8  # 7 convs + the linear
    assert all(w.codes.dtype == torch.int8 for w in weights)
    depthwise = [m.weight_q for m in modules if isinstance(m, Int8WeightLayer) and getattr(m.layer, "groups", 1) == 48]
    assert depthwise and int(depthwise[0].codes.abs().max()) <= 63  # the x86 depthwise grid
    reference = fxopt.lower(prepared, "reference")
    with torch.no_grad():
        for batch in (x, torch.randn(3, 3, 32, 32)):
            torch.testing.assert_close(graph(batch), reference(batch), rtol=0, atol=1e-5)
    # the reference's rounded weights are exactly the dequantized int8 codes
    ref_weight = dict(reference.named_modules())["dw.0"].weight
    assert torch.equal(depthwise[0]().float(), ref_weight.detach())


def test_fusion_friendly_placement(tiny):
    _, prepared, x = tiny
    graph, stats = decomposed_graph(prepared, fuse_add=True, unit_maps="linear", args=(x,))
    assert stats["fused_activation"] == 4  # stem, expand, depthwise, SE fc1: no rounding before their SiLU
    assert stats["fused_add"] == 1  # the projection's output goes straight into the residual add
    assert stats["unit_map_linear"] == 2  # the SE's two 1x1 convs on a 1x1 map
    plain, plain_stats = decomposed_graph(prepared, fuse_activation=False, unit_maps="conv", args=(x,))
    assert plain_stats["unit_map_conv"] == 0
    assert plain_stats["roundings"] == stats["roundings"] + 5
    with torch.no_grad():  # fewer roundings, same model: within a few steps of the output's scale
        assert sqnr(plain(x), graph(x)) > 25


def test_compiled_matches_reference_two_batch_sizes(tiny):
    model, prepared, x = tiny
    state = copy.deepcopy(model.state_dict())
    lowered = fxopt.lower(prepared, "x86-inductor", check=True)  # whole-output SQNR vs the reference >= 25 dB
    assert isinstance(lowered, X86InductorModule) and meta.backend_of(lowered) == "x86-inductor"
    assert lowered.dynamic_batch
    reference = fxopt.lower(prepared, "reference")
    eager_x86 = fxopt.lower(prepared, "x86")
    x3 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first = {}
        for batch in (x, x3):
            first[batch.shape[0]] = out = lowered(batch)
            assert out.shape == (batch.shape[0], 10)
            assert sqnr(reference(batch), out) > 25
        # vs float: not worse than the eager x86 lowering beyond noise
        big = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(6))
        assert sqnr(model(big), lowered(big)) > sqnr(model(big), eager_x86(big)) - 1.0
        # compiled shapes are dispatched with only the shape guards: each call still finds its own entry
        for batch in (x3, x, x3):
            torch.testing.assert_close(lowered(batch), first[batch.shape[0]], rtol=0, atol=0)
        with torch.inference_mode():
            assert sqnr(reference(x), lowered(x)) > 25
    assert len(lowered._seen) == 4  # batch 1, 3, 8 under no_grad and batch 1 under inference_mode
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the user's model is untouched


def test_save_and_load(tiny, tmp_path):
    _, prepared, x = tiny
    lowered = fxopt.lower(prepared, "x86-inductor")
    path = tmp_path / "tiny.pt2"
    fxopt.save(lowered, path)
    with pytest.raises(UnsupportedError, match=r"\.pt2"):
        fxopt.save(lowered, tmp_path / "tiny.pt")
    plain = fxopt.load(path)  # the exported int8 program, run eagerly (decomposed Q/DQ ops)
    int8 = [v for v in plain.state_dict().values() if v.dtype == torch.int8]
    assert len(int8) == 8
    again = X86InductorBackend().load(path)  # compiled again
    assert isinstance(again, X86InductorModule) and again.dynamic_batch
    with torch.no_grad():
        torch.testing.assert_close(again(x), lowered(x), rtol=0, atol=1e-5)
        assert sqnr(lowered(x), plain(x)) > 30


def test_compile_with_backend_name(tiny):
    """compile(..., backend="x86-inductor") prepares with the x86 observers and lowers here."""
    model, _, x = tiny
    calib = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) for _ in range(3)]
    lowered = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(x,), backend="x86-inductor")
    assert isinstance(lowered, X86InductorModule)
    assert lowered.meta["stats"]["int8_weights"] == 8
    assert lowered.threads == torch.get_num_threads()
    assert X86InductorBackend(threads=1).threads == 1


def test_errors(tiny, monkeypatch):
    _, prepared, _ = tiny
    with pytest.raises(ValueError, match="unit_maps"):
        decomposed_graph(prepared, unit_maps="dense")
    bare = copy.deepcopy(prepared)
    meta.set_example_inputs(bare, ())
    with pytest.raises(UnsupportedError, match="example inputs"):
        X86InductorBackend().lower(bare)
    with pytest.raises(UnsupportedError, match="X86InductorModule"):
        X86InductorBackend().save(nn.Linear(2, 2), "m.pt2")

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    xi.require_inductor.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(UnsupportedError, match=r"pip install 'fxopt\[inductor\]'"):
        fxopt.lower(prepared, "x86-inductor")
    monkeypatch.setattr(builtins, "__import__", real_import)
    xi.require_inductor.cache_clear()
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(UnsupportedError, match="C\\+\\+ compiler"):
        xi.require_inductor()
    monkeypatch.undo()
    xi.require_inductor.cache_clear()
    xi.require_inductor()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18", "mobilenet_v3_small"])
def test_torchvision_models(name):
    """Real architectures at 64 px: check=True passes, and SQNR vs float is level with the eager x86 lowering."""
    model = _trained_looking(torchvision.models.get_model(name, weights=None), 64)
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randn(4, 3, 64, 64, generator=gen) for _ in range(3)]
    x = torch.randn(1, 3, 64, 64, generator=gen)
    prepared = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(x,))
    lowered = fxopt.lower(prepared, "x86-inductor", check=True)
    eager = fxopt.lower(prepared, "x86")
    test = torch.randn(4, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ours, theirs, ref = sqnr(model(test), lowered(test)), sqnr(model(test), eager(test)), model(test)
    assert ours > theirs - 1.5, (ours, theirs)
    assert lowered(test).shape == ref.shape
