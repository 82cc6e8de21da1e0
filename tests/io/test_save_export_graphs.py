"""fxopt.save / fxopt.load of graphs from the export frontend (torch.export, aten-level; issue 7 part 6).

Such a graph calls ``torch.ops.aten.*`` operators, takes its inputs through a pytree spec and rebuilds the
model's output type (a Hugging Face ``BaseModelOutputWithPoolingAndCrossAttentions``). The matrix: a small conv
net and a 2-layer BERT, each exported, then float / fp16 / dynamic int8 / static int8 (x86, qnnpack), to .pt and
.pt2. Every round trip gives bit-identical outputs of the same type on inputs of another shape, and tampered
files that name an operator or a type outside the allowlists are refused before anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

import fxopt
from fxopt import FxoptError, UnsupportedError
from fxopt.io import allow_function, allow_output_type, envelope, graph_format, pytree_format
from fxopt.quant.nn import QuantizedModel
from tests.io.payload import read_payload, tamper

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions", "ignore:.*TypedStorage")

RECIPES = ("float", "fp16", "dynamic_int8", "static_x86", "static_qnnpack")


class ConvNet(nn.Module):
    """conv-bn-relu, a residual add, max pool, global pool and a classifier: conv and linear lift to modules,
    batch norm, relu, add and the pools stay aten operators."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.stem(x)
        y = self.pool(torch.relu(self.conv(y) + y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _tokens(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 1000, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # a padded sequence
    return ids, mask


def _conv_case():
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    example = (torch.randn(2, 3, 16, 16),)
    return model, example, [torch.randn(2, 3, 16, 16) for _ in range(2)], (torch.randn(3, 3, 20, 20),)


def _bert_case():
    example = _tokens(2, 8)
    return _bert(), example, [_tokens(2, 8) for _ in range(2)], _tokens(3, 11)


CASES = {"conv": _conv_case, "bert": _bert_case}


@pytest.fixture(scope="module")
def exported():
    """Each model exported once (fxopt.trace mode="export"); compile works on copies of these graphs."""
    out = {}
    for name, make in CASES.items():
        model, example, calibration, fresh = make()
        out[name] = (fxopt.trace(model, example, mode="export"), example, calibration, fresh)
    return out


def _compile(case, recipe: str) -> nn.Module:
    gm, example, calibration, _ = case
    R = fxopt.recipes
    passes, backend = {
        "float": ([], None), "fp16": (R.fp16(), None), "dynamic_int8": (R.dynamic_int8(), None),
        "static_x86": (R.static_int8(calibration), "x86"), "static_qnnpack": (R.static_int8(calibration), "qnnpack"),
    }[recipe]
    return fxopt.compile(gm, passes, example_inputs=example, backend=backend)


def _graph(module: nn.Module) -> torch.fx.GraphModule:
    return module.graph_module if isinstance(module, QuantizedModel) else module


def _same(a, b) -> bool:
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    return spec_a == spec_b and all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(CASES))
def test_export_graph_round_trip_is_bit_identical(name, recipe, exported, tmp_path):
    case = exported[name]
    compiled = _compile(case, recipe)
    graph = _graph(compiled)
    ops = {n.target for n in graph.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
    assert torch.ops.aten.relu.default in ops or torch.ops.aten.gelu.default in ops  # an aten-level graph
    fresh = case[3]  # another batch size (and sequence length) than export and compile saw
    with torch.no_grad():
        expected = compiled(*fresh)
    for suffix in (".pt", ".pt2"):
        path = tmp_path / f"{name}-{recipe}{suffix}"
        fxopt.save(compiled, path)
        stored = read_payload(path)  # plain data: torch.load(weights_only=True) reads it
        assert any(str(n["target"]).startswith("torch.ops.aten.") for n in stored["graph"])
        loaded = fxopt.load(path)
        assert type(loaded) is type(compiled) or isinstance(loaded, torch.fx.GraphModule)
        with torch.no_grad():
            got = loaded(*fresh)
        assert type(got) is type(expected)
        assert _same(got, expected), f"{name} {recipe} {suffix}: outputs differ after the round trip"
        assert [(n.op, n.target) for n in _graph(loaded).graph.nodes if n.op == "call_function"] == [
            (n.op, n.target) for n in graph.graph.nodes if n.op == "call_function"]  # the same operator objects
        if isinstance(compiled, QuantizedModel):
            assert loaded.engine == compiled.engine
    if name == "bert":
        assert type(expected) is BaseModelOutputWithPoolingAndCrossAttentions
        assert stored["pytree"]["out_spec"]["type"] == (
            "transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions")
        assert stored["pytree"]["orig_args"] == ["input_ids", "attention_mask"]


def test_compile_through_export_keeps_the_input_checks(tmp_path):
    """compile(..., trace_mode="export") returns torch.export's module, which checks its inputs; so does the
    loaded one (fxopt's own hook built from the stored shapes, not code from the file)."""
    compiled = fxopt.compile(_bert(), [], example_inputs=_tokens(2, 8), trace_mode="export")
    fxopt.save(compiled, tmp_path / "b.pt2")
    loaded = fxopt.load(tmp_path / "b.pt2")
    assert [d[0] for d in read_payload(tmp_path / "b.pt2")["input_checks"][0]]  # symbols of the dynamic dims
    ids, mask = _tokens(3, 11)
    assert _same(loaded(ids, mask), compiled(ids, mask))
    assert _same(loaded(input_ids=ids, attention_mask=mask), compiled(ids, mask))
    with pytest.raises(RuntimeError, match="<= 64"):  # beyond max_position_embeddings
        compiled(*_tokens(1, 65))
    with pytest.raises(FxoptError, match=r"input 0 \(input_ids\): dimension 1 must lie in \[2, 64\], got 65"):
        loaded(*_tokens(1, 65))
    with pytest.raises(FxoptError, match="must equal the other input dimensions"):
        loaded(ids, mask[:, :10])
    # a dimension fixed at export time (a batch of 1 specializes it) stays fixed
    conv = fxopt.compile(ConvNet().eval(), [], example_inputs=(torch.randn(1, 3, 16, 16),), trace_mode="export")
    fxopt.save(conv, tmp_path / "c.pt")
    loaded = fxopt.load(tmp_path / "c.pt")
    x = torch.randn(1, 3, 24, 24)
    assert torch.equal(loaded(x), conv(x))
    with pytest.raises(FxoptError, match="dimension 0 must be 1 .fixed when the model was exported"):
        loaded(torch.randn(2, 3, 16, 16))


# --- the operator policy ---------------------------------------------------------------------------------------

def test_operator_policy():
    ok = {
        "torch.ops.aten.relu.default": torch.ops.aten.relu.default,
        "torch.ops.aten.add.Tensor": torch.ops.aten.add.Tensor,
        "torch.ops.aten.__and__.Tensor": torch.ops.aten.__and__.Tensor,
        "torch.ops.aten.sym_size.int": torch.ops.aten.sym_size.int,
        "torch.ops.prims.convert_element_type.default": torch.ops.prims.convert_element_type.default,
        "torch.ops.quantized.linear_dynamic.default": torch.ops.quantized.linear_dynamic.default,
        "torch.ops.aten.relu": torch.ops.aten.relu,  # a packet (no overload)
    }
    for name, op in ok.items():
        assert graph_format.resolve_op(name) is op
        assert graph_format.function_name(op) == name
    refused = {
        "torch.ops.aten.from_file.default": "beyond tensor math",  # reads a file
        "torch.ops.aten.save.default": "beyond tensor math",  # writes one
        "torch.ops.aten.manual_seed.default": "beyond tensor math",
        "torch.ops.aten.set_.source_Storage": "beyond tensor math",
        "torch.ops.prim.Print.default": "namespace 'prim'",  # TorchScript interpreter ops
        "torch.ops.myns.evil.default": "namespace 'myns'",
        "torch.ops.aten.no_such_op.default": "not registered in this PyTorch",
        "torch.ops.aten.relu.no_such_overload": "has no overload",
        "torch.ops.aten.__class__.default": "not registered",
        "torch.ops.aten.relu.default;import os": "not an operator name",
    }
    for name, message in refused.items():
        with pytest.raises(UnsupportedError, match=message):
            graph_format.resolve_op(name)


@pytest.fixture
def nothing_built(monkeypatch):
    """Records every module and constant fxopt.load starts to place in the rebuilt model."""
    built = []
    monkeypatch.setattr(envelope, "decode_module", lambda entry, where: built.append(where))
    monkeypatch.setattr(envelope, "_place", lambda *args: built.append(args[1]))
    return built


@pytest.fixture(scope="module")
def bert_float(exported):
    return _compile(exported["bert"], "float")


def _first_op(payload: dict) -> dict:
    return next(n for n in payload["graph"] if str(n["target"]).startswith("torch.ops.aten."))


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
@pytest.mark.parametrize(("target", "message"), [
    ("torch.ops.myns.evil.default", "namespace 'myns'"),
    ("torch.ops.aten.from_file.default", "beyond tensor math"),
    ("torch.ops.aten.save.default", "beyond tensor math"),
    ("torch.ops.aten.relu.default.__call__", "not an operator name"),
    ("torch.ops.aten.__import__.default", "not registered"),
])
def test_tampered_operator_is_refused_before_anything_is_built(target, message, suffix, bert_float, nothing_built,
                                                               tmp_path):
    path = tamper(bert_float, tmp_path / f"m{suffix}", lambda obj: _first_op(obj).update(target=target))
    with pytest.raises(UnsupportedError, match=message):
        fxopt.load(path)
    assert nothing_built == []


@pytest.mark.parametrize(("edit", "error", "message"), [
    (lambda p: p["out_spec"].update(type="subprocess.Popen"), UnsupportedError, "does not know in this process"),
    (lambda p: p["out_spec"].update(type="transformers.modeling_outputs.os"), UnsupportedError, "does not know"),
    (lambda p: p["out_spec"].update(type="builtins.eval"), UnsupportedError, "does not know"),
    (lambda p: p["out_spec"]["context"].__setitem__(1, "__class__"), FxoptError, "does not have"),
    (lambda p: p["orig_args"].__setitem__(0, "x):\n    import os\n    #"), FxoptError, "not all plain identifiers"),
    (lambda p: p["in_spec"]["children"][1]["context"].append("x'] or __import__('os') or ['"), FxoptError,
     "keys for"),
])
def test_tampered_structure_is_refused_before_anything_is_built(edit, error, message, bert_float, nothing_built,
                                                                tmp_path):
    path = tamper(bert_float, tmp_path / "m.pt", lambda obj: edit(obj["pytree"]))
    with pytest.raises(error, match=message):
        fxopt.load(path)
    assert nothing_built == []


def test_tampered_input_checks_are_refused(bert_float, tmp_path):
    compiled = fxopt.compile(_bert(), [], example_inputs=_tokens(2, 8), trace_mode="export")
    path = tamper(compiled, tmp_path / "m.pt", lambda obj: obj["input_checks"][0].__setitem__(0, ["s0; rm", 2, 9]))
    with pytest.raises(FxoptError, match="malformed input check"):
        fxopt.load(path)


# --- registration: operators of other libraries, output types of your own --------------------------------------

@torch.library.custom_op("fxopt_test::scaled_tanh", mutates_args=())
def _scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


@_scaled_tanh.register_fake
def _(x, scale):
    return torch.empty_like(x)


class _UsesCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return torch.ops.fxopt_test.scaled_tanh(self.fc(x), 2.0)


@pytest.fixture
def clean_registries(monkeypatch):
    monkeypatch.setattr(graph_format, "_REGISTERED", {})
    monkeypatch.setattr(pytree_format, "_REGISTERED", {})


def test_operator_of_another_library_needs_registering(clean_registries, tmp_path):
    x = torch.randn(3, 6)
    gm = fxopt.trace(_UsesCustomOp().eval(), (x,), mode="export")
    op = torch.ops.fxopt_test.scaled_tanh.default
    assert any(n.target is op for n in gm.graph.nodes)
    path = tmp_path / "m.pt2"
    with pytest.raises(UnsupportedError, match=r"namespace 'fxopt_test'.*allow_function\(torch.ops.fxopt_test"):
        fxopt.save(gm, path)
    assert not path.exists()
    assert allow_function(op) == "torch.ops.fxopt_test.scaled_tanh.default"
    fxopt.save(gm, path)
    assert torch.equal(fxopt.load(path)(x), gm(x))
    graph_format._REGISTERED.clear()  # a process that did not register it refuses the file
    with pytest.raises(UnsupportedError, match="namespace 'fxopt_test'"):
        fxopt.load(path)


@dataclasses.dataclass
class _Heads:
    logits: torch.Tensor
    features: torch.Tensor | None = None


pytree.register_dataclass(_Heads)


class _ReturnsDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        features = torch.relu(self.body(x))
        return _Heads(logits=self.head(features), features=features)


def _registering_round_trip(model: nn.Module, out_type: type, path, unregistered_load: str) -> None:
    """Saving an export graph whose output type is the user's own fails until it is allowlisted; then the
    round trip keeps the type, and a process that has not registered it refuses the file."""
    x = torch.randn(2, 6)
    gm = fxopt.trace(model.eval(), (x,), mode="export")
    assert type(gm(x)) is out_type
    with pytest.raises(UnsupportedError, match=rf"fxopt.io.allow_output_type\(.*{out_type.__name__}\)"):
        fxopt.save(gm, path)
    name = allow_output_type(out_type)
    fxopt.save(gm, path)
    out = fxopt.load(path)(x)
    assert type(out) is out_type and _same(out, gm(x))
    pytree_format._REGISTERED.clear()
    with pytest.raises(UnsupportedError, match=unregistered_load.format(name=name)):
        fxopt.load(path)


def test_output_type_of_your_own_needs_registering(clean_registries, tmp_path):
    _registering_round_trip(_ReturnsDataclass(), _Heads, tmp_path / "m.pt", "type '{name}'.*allow_output_type")
    with pytest.raises(TypeError, match="dataclass"):
        allow_output_type(dict)


class _Pair(NamedTuple):
    logits: torch.Tensor
    probs: torch.Tensor


class _ReturnsNamedTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        logits = self.fc(x)
        return _Pair(logits, torch.softmax(logits, -1))


def test_named_tuple_output_needs_registering(clean_registries, tmp_path):
    _registering_round_trip(_ReturnsNamedTuple(), _Pair, tmp_path / "m.pt2",
                            "named tuple '{name}', which is not registered")


def test_higher_order_operators_are_refused_at_save(tmp_path):
    class Branches(nn.Module):
        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda t: t.sin(), lambda t: t.cos(), (x,))

    gm = fxopt.trace(Branches().eval(), (torch.randn(3),), mode="export")
    with pytest.raises(UnsupportedError, match="higher-order operator torch.ops.higher_order.cond"):
        fxopt.save(gm, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_auto_mode_bert_dynamic_int8_round_trip(tmp_path):
    """The issue's route: compile a BertModel without naming a trace mode (auto falls back to torch.export)."""
    ids, mask = _tokens(2, 8)
    compiled = fxopt.compile(_bert(), fxopt.recipes.dynamic_int8(), example_inputs=(ids, mask))
    fresh = _tokens(1, 13)
    for suffix in (".pt", ".pt2"):
        fxopt.save(compiled, tmp_path / f"m{suffix}")
        loaded = fxopt.load(tmp_path / f"m{suffix}")
        assert type(loaded(*fresh)) is BaseModelOutputWithPoolingAndCrossAttentions
        assert _same(loaded(*fresh), compiled(*fresh))


@pytest.mark.slow
def test_a_fresh_process_loads_the_bert_file_without_importing_transformers_itself(bert_float, tmp_path):
    """The output class comes from transformers.modeling_outputs, which fxopt imports by its fixed name."""
    import subprocess
    import sys

    fxopt.save(bert_float, tmp_path / "m.pt2")
    ids, mask = _tokens(2, 9)
    torch.save({"ids": ids, "mask": mask, "expected": bert_float(ids, mask).last_hidden_state}, tmp_path / "x.pt")
    script = (
        "import sys, torch, fxopt\n"
        "assert 'transformers' not in sys.modules\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"out = fxopt.load({str(tmp_path / 'm.pt2')!r})(x['ids'], x['mask'])\n"
        "assert torch.equal(out.last_hidden_state, x['expected'])\n"
        "print(type(out).__name__)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("BaseModelOutputWithPoolingAndCrossAttentions")


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_gpt2_static_int8_round_trips(backend, suffix, tmp_path):
    """GPT-2's static int8 (Conv1D projections linearized, then int8 QLinear) saves and loads bit-identically,
    output type kept."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    calib = [(torch.randint(0, 1000, (2, 8)),) for _ in range(4)]
    compiled = fxopt.compile(model, fxopt.recipes.static_int8(calib), example_inputs=calib[0], backend=backend)
    assert "QLinear" in {type(m).__name__ for m in compiled.modules()}
    fxopt.save(compiled, tmp_path / f"g{suffix}")
    loaded = fxopt.load(tmp_path / f"g{suffix}")
    fresh = torch.randint(0, 1000, (3, 5))
    out = loaded(fresh)
    assert type(out).__name__ == "BaseModelOutputWithPastAndCrossAttentions"
    assert torch.equal(out.last_hidden_state, compiled(fresh).last_hidden_state)


def test_gpt2_conv1d_layers_are_stored_as_a_known_library_class(tmp_path):
    """The export frontend lifts GPT-2's Conv1D back to module calls; the file names that class, which load
    finds in the fixed module transformers.pytorch_utils (and nowhere else)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 1000, (2, 8))
    compiled = fxopt.compile(model, [], example_inputs=(ids,), trace_mode="export")
    fresh = torch.randint(0, 1000, (3, 5))
    fxopt.save(compiled, tmp_path / "g.pt")
    stored = read_payload(tmp_path / "g.pt")
    assert stored["modules"]["h.0.attn.c_attn"]["class"] == "library:transformers.pytorch_utils.Conv1D"
    loaded = fxopt.load(tmp_path / "g.pt")
    assert type(loaded.get_submodule("h.0.attn.c_attn")) is transformers.pytorch_utils.Conv1D
    assert _same(loaded(fresh), compiled(fresh))

    def edit(obj):
        obj["modules"]["h.0.attn.c_attn"]["class"] = "library:subprocess.Popen"
    path = tamper(compiled, tmp_path / "t.pt", edit)
    with pytest.raises(UnsupportedError, match="class 'library:subprocess.Popen', which is not in fxopt's allowlist"):
        fxopt.load(path)
