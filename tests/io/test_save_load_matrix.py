"""fxopt.save / fxopt.load for everything compile returns with a PyTorch backend (issue 7 part 6).

The matrix: torchvision classifiers x {float, fused, fp16, dynamic int8, static int8 x86, static int8 qnnpack}
x {.pt, .pt2}. Each round trip must give bit-identical outputs on a fresh batch, without the original model.
By default resnet18 and efficientnet_b0 run every recipe and mobilenet_v3_large static int8 (x86); every other
(model, recipe) pair of the README's zoo runs under ``slow``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

import fxopt
from fxopt import FxoptError, UnsupportedError, meta
from fxopt.io import allow_function, allow_module, dispatch
from fxopt.io import graph_format, module_format
from fxopt.io.envelope import FORMAT_TAG
from fxopt.quant.nn import FP16Module, FusedConv, QuantizedModel
from fxopt.quant.nn.int8 import QConv
from tests.io.payload import read_payload, tamper, write_payload

pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions", "ignore:.*TypedStorage")

RECIPES = ("float", "fuse", "fp16", "dynamic_int8", "static_x86", "static_qnnpack")
DEFAULT_MODELS = ("resnet18", "efficientnet_b0")
ZOO = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0",
       "densenet121", "googlenet", "regnet_x_400mf", "squeezenet1_1")
SIZE = 48  # small inputs: every zoo model runs at 48 px (densenet/googlenet pool down to 1x1)


def _compile(name: str, recipe: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    R = fxopt.recipes
    passes, backend = {
        "float": ([], None), "fuse": (R.fuse(), None), "fp16": (R.fp16(), None),
        "dynamic_int8": (R.dynamic_int8(), None),
        "static_x86": (R.static_int8([torch.randn(2, 3, SIZE, SIZE)]), "x86"),
        "static_qnnpack": (R.static_int8([torch.randn(2, 3, SIZE, SIZE)]), "qnnpack"),
    }[recipe]
    return fxopt.compile(model, passes, example_inputs=(x,), backend=backend)


def _check_round_trip(name: str, recipe: str, tmp_path: Path) -> None:
    compiled = _compile(name, recipe)
    x = torch.randn(2, 3, SIZE, SIZE)  # another batch size than compile saw
    expected = compiled(x)
    for suffix in (".pt", ".pt2"):
        path = tmp_path / f"{name}-{recipe}{suffix}"
        fxopt.save(compiled, path)
        loaded = fxopt.load(path)  # no model= : the file is self-contained
        assert type(loaded) is type(compiled) or (
            isinstance(compiled, torch.fx.GraphModule) and isinstance(loaded, torch.fx.GraphModule))
        assert not loaded.training
        assert torch.equal(loaded(x), expected), f"{name} {recipe} {suffix}: outputs differ after the round trip"
        assert [(n.op, str(n.target)) for n in loaded.graph.nodes] == [
            (n.op, str(n.target)) for n in compiled.graph.nodes]
        assert meta.backend_of(loaded) == meta.backend_of(compiled)
        kinds = lambda m: sorted(type(s).__name__ for s in m.modules() if not isinstance(s, torch.fx.GraphModule))
        assert kinds(loaded) == kinds(compiled)
        if isinstance(compiled, QuantizedModel):
            assert loaded.engine == compiled.engine


DEFAULT_PAIRS = [(n, r) for n in DEFAULT_MODELS for r in RECIPES] + [("mobilenet_v3_large", "static_x86")]


@pytest.mark.parametrize(("name", "recipe"), DEFAULT_PAIRS)
def test_round_trip_is_bit_identical(name, recipe, tmp_path):
    _check_round_trip(name, recipe, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "recipe"), [(n, r) for n in ZOO for r in RECIPES if (n, r) not in DEFAULT_PAIRS])
def test_zoo_round_trip_is_bit_identical(name, recipe, tmp_path):
    _check_round_trip(name, recipe, tmp_path)


@pytest.fixture(scope="module")
def fused_resnet18():
    return _compile("resnet18", "fuse")


def test_float_graph_files_are_plain_data_and_pt2_is_a_pt2_archive(fused_resnet18, tmp_path):
    assert any(isinstance(m, FusedConv) for m in fused_resnet18.modules())
    fxopt.save(fused_resnet18, tmp_path / "f.pt")
    obj = torch.load(tmp_path / "f.pt", weights_only=True)  # nothing but plain data
    assert obj["format"] == FORMAT_TAG and obj["wrapper"] == "GraphModule"
    assert {e["class"] for e in obj["modules"].values()} >= {"fxopt.FusedConv", "fxopt.FusedAdd", "torch.nn.Linear"}
    fxopt.save(fused_resnet18, tmp_path / "f.pt2")
    with zipfile.ZipFile(tmp_path / "f.pt2") as archive:
        short = {n.split("/", 1)[1] for n in archive.namelist()}
    assert {"archive_format", dispatch.PT2_ENTRY} <= short
    fxopt.io.check_pt2_archive(tmp_path / "f.pt2")  # also passes the .pt2 safety check
    # a float graph no longer needs model=, and model= is ignored if given
    assert isinstance(fxopt.load(tmp_path / "f.pt", model=nn.Linear(1, 1)), torch.fx.GraphModule)


def test_file_sizes_follow_the_weight_bytes(tmp_path):
    sizes = {}
    for recipe in ("float", "fp16", "static_x86"):
        fxopt.save(_compile("resnet18", recipe), tmp_path / f"{recipe}.pt")
        sizes[recipe] = (tmp_path / f"{recipe}.pt").stat().st_size
    print("resnet18 file bytes:", sizes)
    assert 0.45 < sizes["fp16"] / sizes["float"] < 0.55
    assert 0.2 < sizes["static_x86"] / sizes["float"] < 0.3


# --- tampered files: refused with UnsupportedError before anything is built --------------------------------

@pytest.fixture
def nothing_built(monkeypatch):
    """Records every module fxopt.load starts to rebuild."""
    built = []
    real = module_format._rebuild_plain
    monkeypatch.setattr(module_format, "_rebuild_plain", lambda cls, state, where: built.append(where) or real(
        cls, state, where))
    monkeypatch.setattr(QConv, "fxopt_from_state", classmethod(lambda cls, state: built.append("qconv")))
    return built


@pytest.fixture(scope="module")
def small_int8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    data = [torch.randn(2, 3, 12, 12)]
    return fxopt.compile(model.eval(), fxopt.recipes.static_int8(data), example_inputs=data[0], backend="x86")


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
@pytest.mark.parametrize("which", ["float", "int8"])
def test_tampered_function_target_is_refused_before_anything_is_built(which, suffix, small_int8, fused_resnet18,
                                                                       nothing_built, tmp_path):
    module = small_int8 if which == "int8" else fused_resnet18

    def edit(obj):
        node = next(n for n in obj["graph"] if n["op"] in ("call_function", "call_module"))
        node.update(op="call_function", target="os.system")
    path = tamper(module, tmp_path / f"m{suffix}", edit)
    with pytest.raises(UnsupportedError, match="function 'os.system'.*not in fxopt's allowlist"):
        fxopt.load(path)
    assert nothing_built == []


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
@pytest.mark.parametrize("which", ["float", "int8"])
def test_tampered_module_class_is_refused_before_anything_is_built(which, suffix, small_int8, fused_resnet18,
                                                                   nothing_built, tmp_path):
    module = small_int8 if which == "int8" else fused_resnet18

    def edit(obj):
        # the LAST module in the file names a foreign class: the check still comes before the first build
        last = list(obj["modules"])[-1]
        entry = obj["modules"][last]
        if "children" in entry["state"] and entry["state"]["children"]:  # a nested child, for the float case
            next(iter(entry["state"]["children"].values()))["class"] = "subprocess.Popen"
        else:
            entry["class"] = "subprocess.Popen"
    path = tamper(module, tmp_path / f"m{suffix}", edit)
    with pytest.raises(UnsupportedError, match="class 'subprocess.Popen', which is not in fxopt's allowlist"):
        fxopt.load(path)
    assert nothing_built == []


def test_pt2_payload_with_pickled_object_is_refused(small_int8, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "m.pt2"
    fxopt.save(small_int8, path)
    payload = read_payload(path)
    payload["extra"] = Payload()
    write_payload(payload, path)
    with pytest.raises(FxoptError, match="never runs code"):
        fxopt.load(path)
    assert not marker.exists()


# --- registration hooks: fxopt.io.allow_function / allow_module ----------------------------------------------

def _scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


torch.fx.wrap("_scaled_tanh")


class _UsesFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return _scaled_tanh(self.fc(x), 2.0)


class _Gate(nn.Module):
    """A leaf the tracer keeps (data-dependent control flow)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.threshold = 0.0

    def forward(self, x):
        return x * self.weight if bool(x.sum() > self.threshold) else x


class _UsesLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gate = nn.Linear(6, 4), _Gate(4)

    def forward(self, x):
        return self.gate(self.fc(x))


@pytest.fixture
def clean_registries(monkeypatch):
    monkeypatch.setattr(graph_format, "_REGISTERED", {})
    monkeypatch.setattr(module_format, "_REGISTERED", {})


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_allow_function_registers_a_traced_function(suffix, clean_registries, tmp_path):
    x = torch.randn(3, 6)
    compiled = fxopt.compile(_UsesFunction().eval(), example_inputs=(x,))
    assert any(n.target is _scaled_tanh for n in compiled.graph.nodes)
    path = tmp_path / f"m{suffix}"
    with pytest.raises(UnsupportedError, match=r"fxopt.io.allow_function\(.*_scaled_tanh\)"):
        fxopt.save(compiled, path)
    assert not path.exists()
    name = allow_function(_scaled_tanh)
    assert name.endswith("._scaled_tanh")
    fxopt.save(compiled, path)
    assert torch.equal(fxopt.load(path)(x), compiled(x))
    graph_format._REGISTERED.clear()  # a process that did not register it refuses the file
    with pytest.raises(UnsupportedError, match=f"function '{name}'.*register it first with fxopt.io.allow_function"):
        fxopt.load(path)
    with pytest.raises(ValueError, match="must be a dotted path"):
        allow_function(_scaled_tanh, name="os.system; rm")
    with pytest.raises(ValueError, match="already names another function"):
        allow_function(_scaled_tanh, name="torch.relu")


class _Holder:
    """A plain object a traced graph builds (as Faster R-CNN's graph builds an ImageList for its RPN)."""

    def __init__(self, tensor):
        self.tensor = tensor


def test_a_graph_that_builds_an_object_gets_an_error_that_says_what_to_save(tmp_path):
    """Before: "register it: fxopt.io.allow_function(..._Holder)", which then raised TypeError for a class."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    holder = graph.call_function(_Holder, (x,))
    graph.output(graph.call_function(getattr, (holder, "tensor")))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    with pytest.raises(UnsupportedError, match=r"builds a .*_Holder object.*torch.save\(model, path\)"):
        fxopt.save(gm, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_allow_module_registers_a_leaf_class(suffix, clean_registries, tmp_path):
    x = torch.randn(3, 6)
    compiled = fxopt.compile(_UsesLeaf().eval(), example_inputs=(x,))
    assert "gate" in fxopt.untraced(compiled)
    path = tmp_path / f"m{suffix}"
    with pytest.raises(UnsupportedError, match=r"fxopt.io.allow_module\(.*_Gate\)"):
        fxopt.save(compiled, path)
    allow_module(_Gate)
    fxopt.save(compiled, path)
    loaded = fxopt.load(path)
    assert type(loaded.gate) is _Gate and loaded.gate.threshold == 0.0
    assert torch.equal(loaded(x), compiled(x))
    module_format._REGISTERED.clear()
    with pytest.raises(UnsupportedError, match="register it first with fxopt.io.allow_module"):
        fxopt.load(path)


def test_fp16_module_and_function_attributes_round_trip():
    from fxopt.io.module_format import decode_module, encode_module

    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    wrapped = FP16Module(layer)
    entry = encode_module(wrapped, "enc")
    assert entry["class"] == "fxopt.FP16Module"
    assert entry["state"]["children"]["module"]["state"]["attrs"]["activation"] == {
        "function": "torch.nn.functional.relu"}
    rebuilt = decode_module(entry, "enc")
    x = torch.randn(2, 5, 8)
    assert torch.equal(rebuilt(x), wrapped(x))


def test_module_paths_allow_hyphens_but_nothing_that_reaches_generated_code():
    assert graph_format.is_module_path("trunk_output.block1.block1-0.proj.0")  # regnet's names
    for bad in ('a"b', "a b", "a;b", "a.(b)", "", "a..b", "class", 'x").__class__("'):
        assert not graph_format.is_module_path(bad), bad
