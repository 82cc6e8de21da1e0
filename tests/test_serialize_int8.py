"""fxopt.save / fxopt.load of int8 models: the self-contained, data-only format (fxopt/io/envelope.py)."""

import operator
import os
from pathlib import Path

import pytest
import torch
import torch.fx
import torchvision
from fxopt.quant.nn import QuantizedModel
from fxopt.quant.nn.int8 import QConv
from torch import nn

import fxopt
from fxopt import FxoptError, UnsupportedError, meta
from fxopt.io.graph_format import check_method, function_name, resolve_function
from fxopt.io.envelope import FORMAT_TAG
from fxopt.quant.nn.dynamic import DynamicEmbedding, DynamicLinear

pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions", "ignore:.*TypedStorage")


def _static_int8(model: nn.Module, backend: str, shape=(2, 3, 32, 32)) -> nn.Module:
    data = [torch.randn(shape) for _ in range(2)]
    return fxopt.compile(model.eval(), fxopt.recipes.static_int8(data, backend=backend), example_inputs=data[0],
                         backend=backend)


def _round_trip(module: nn.Module, path: Path) -> nn.Module:
    fxopt.save(module, path)
    obj = torch.load(path, weights_only=True)  # plain data only
    assert obj["format"] == FORMAT_TAG
    return fxopt.load(path)


def _ops(module: nn.Module) -> list:
    return [(n.op, n.target if isinstance(n.target, str) else n.target.__name__) for n in module.graph.nodes]


@pytest.fixture(scope="module")
def resnet18_x86():
    torch.manual_seed(0)
    return _static_int8(torchvision.models.resnet18(weights=None), "x86")


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_resnet18_round_trip_is_bit_exact(backend, resnet18_x86, tmp_path):
    q = resnet18_x86 if backend == "x86" else _static_int8(torchvision.models.resnet18(weights=None), backend)
    loaded = _round_trip(q, tmp_path / "r18.pt")
    assert isinstance(loaded, QuantizedModel) and loaded.engine == q.engine
    assert meta.backend_of(loaded) == backend
    assert _ops(loaded) == _ops(q)
    assert sum(isinstance(m, QConv) for m in loaded.modules()) == 20
    x = torch.randn(3, 3, 32, 32)  # another batch size than calibration
    out = loaded(x)
    assert torch.equal(out, q(x))
    assert out.shape == (3, 1000) and out.dtype == torch.float32


def test_int8_file_is_about_a_quarter_of_float(resnet18_x86, tmp_path):
    fxopt.save(resnet18_x86, tmp_path / "int8.pt")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "float.pt")
    int8_size, float_size = os.path.getsize(tmp_path / "int8.pt"), os.path.getsize(tmp_path / "float.pt")
    print(f"resnet18: int8 file {int8_size / 1e6:.2f} MB, float state_dict {float_size / 1e6:.2f} MB")
    assert 0.2 < int8_size / float_size < 0.3


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_mobilenet_v2_round_trip_is_bit_exact(backend, tmp_path):
    torch.manual_seed(0)
    q = _static_int8(torchvision.models.mobilenet_v2(weights=None), backend)
    loaded = _round_trip(q, tmp_path / "mbv2.pt")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), q(x))
    assert _ops(loaded) == _ops(q)


class _FloatIsland(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        y = torch.erf(self.conv1(x))  # erf has no int8 kernel: dequant → erf → quant
        return torch.flatten(self.conv2(self.pool(y)), 1)


def test_float_island_round_trip(tmp_path):
    torch.manual_seed(0)
    q = _static_int8(_FloatIsland(), "x86", (2, 3, 16, 16))
    assert ("call_function", "erf") in _ops(q)
    loaded = _round_trip(q, tmp_path / "island.pt")
    assert [str(i) for i in meta.float_islands(loaded)] == [str(i) for i in meta.float_islands(q)]
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(loaded(x), q(x))


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, tokens):
        return self.fc2(torch.relu(self.fc1(self.emb(tokens).flatten(1))))


def test_dynamic_int8_round_trip(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, 20, (2, 4))
    q = fxopt.compile(_Mlp().eval(), fxopt.recipes.dynamic_int8(), example_inputs=(tokens,))
    kinds = {type(m) for m in q.modules()}
    assert DynamicLinear in kinds and DynamicEmbedding in kinds
    loaded = _round_trip(q, tmp_path / "mlp.pt")
    assert isinstance(loaded, torch.fx.GraphModule)
    assert {type(m) for m in loaded.modules()} >= {DynamicLinear, DynamicEmbedding}
    other = torch.randint(0, 20, (5, 4))
    assert torch.equal(loaded(other), q(other))
    for name, m in q.named_modules():
        if isinstance(m, DynamicLinear):
            w_saved, w_loaded = m.fxopt_weights()["weight"], loaded.get_submodule(name).fxopt_weights()["weight"]
            assert torch.equal(w_saved.int_repr(), w_loaded.int_repr())
            assert torch.equal(w_saved.q_per_channel_scales(), w_loaded.q_per_channel_scales())


@pytest.fixture(scope="module")
def small_int8():
    torch.manual_seed(0)
    return _static_int8(_FloatIsland(), "x86", (2, 3, 16, 16))


def _tampered(small_int8, tmp_path, edit) -> Path:
    path = tmp_path / "m.pt"
    fxopt.save(small_int8, path)
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, path)
    return path


def _node(obj, op):
    return next(n for n in obj["graph"] if n["op"] == op)


@pytest.mark.parametrize("name", ["os.system", "torch.load", "torch.from_file", "builtins.eval", "torch._C.foo"])
def test_non_allowlisted_function_is_refused_before_anything_is_built(name, small_int8, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(QConv, "fxopt_from_state", classmethod(lambda cls, state: built.append(state)))
    path = _tampered(small_int8, tmp_path, lambda obj: _node(obj, "call_function").update(target=name))
    with pytest.raises(UnsupportedError, match=f"function '{name}'.*not in fxopt's allowlist"):
        fxopt.load(path)
    assert built == []


def test_non_allowlisted_module_class_is_refused(small_int8, tmp_path):
    def edit(obj):
        obj["modules"][_node(obj, "call_module")["target"]]["class"] = "builtins.exec"
    with pytest.raises(UnsupportedError, match="class 'builtins.exec', which is not in fxopt's allowlist"):
        fxopt.load(_tampered(small_int8, tmp_path, edit))


def test_forbidden_method_and_getattr_are_refused(small_int8, tmp_path):
    def method(obj):
        _node(obj, "call_method").update(target="register_hook")
    with pytest.raises(UnsupportedError, match="method 'register_hook'"):
        fxopt.load(_tampered(small_int8, tmp_path, method))

    def attribute(obj):
        _node(obj, "call_function").update(target="builtins.getattr", args={"tuple": [{"node": "x"}, "__class__"]})
    with pytest.raises(UnsupportedError, match="getattr of '__class__'"):
        fxopt.load(_tampered(small_int8, tmp_path, attribute))


def test_code_in_names_never_reaches_generated_source(small_int8, tmp_path):
    """fx generates Python from names and targets: a name carrying code must be refused, not executed."""
    marker = tmp_path / "pwned"
    payload = f"x=__import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(FxoptError, match="not a plain identifier"):
        fxopt.load(_tampered(small_int8, tmp_path, lambda obj: _node(obj, "placeholder").update(target=payload)))
    module_payload = 'conv1"); __import__("os").getcwd(); ("'
    def module_path(obj):
        old = _node(obj, "call_module")
        obj["modules"][module_payload] = obj["modules"][old["target"]]
        old["target"] = module_payload
    with pytest.raises(FxoptError, match="not a dotted identifier path"):
        fxopt.load(_tampered(small_int8, tmp_path, module_path))
    assert not marker.exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_object_is_refused_by_weights_only(small_int8, tmp_path):
    marker = tmp_path / "pwned"
    path = _tampered(small_int8, tmp_path, lambda obj: obj.update(extra=_Payload(str(marker))))
    with pytest.raises(FxoptError, match="never runs code"):
        fxopt.load(path)
    assert not marker.exists()


def test_corrupt_module_state_raises_fxopt_error(small_int8, tmp_path):
    def edit(obj):
        conv = next(e for e in obj["modules"].values() if e["class"] == "fxopt.QConv")
        conv["state"]["weight"]["axis"] = 7
    with pytest.raises(FxoptError, match="stored state of .* is invalid"):
        fxopt.load(_tampered(small_int8, tmp_path, edit))


def test_int8_to_pt2_round_trips(small_int8, tmp_path):
    fxopt.save(small_int8, tmp_path / "m.pt2")
    loaded = fxopt.load(tmp_path / "m.pt2")
    x = torch.randn(3, 3, 16, 16)
    assert isinstance(loaded, QuantizedModel) and torch.equal(loaded(x), small_int8(x))


class _Custom(nn.Module):
    def forward(self, x):
        return x * 2


def test_custom_module_in_an_int8_graph_is_refused_at_save(tmp_path):
    q = fxopt.compile(_Mlp().eval(), fxopt.recipes.dynamic_int8(), example_inputs=(torch.randint(0, 20, (2, 4)),))
    q.add_submodule("custom", _Custom())
    out = next(n for n in q.graph.nodes if n.op == "output")
    with q.graph.inserting_before(out):
        new = q.graph.call_module("custom", (out.args[0],))
    out.args = (new,)
    q.recompile()
    with pytest.raises(UnsupportedError, match="_Custom, which fxopt cannot store safely"):
        fxopt.save(q, tmp_path / "m.pt")


def test_function_allowlist():
    assert function_name(torch.erf) == "torch.erf"
    assert function_name(operator.getitem) == "operator.getitem"
    assert function_name(torch.nn.functional.relu) == "torch.nn.functional.relu"
    assert resolve_function("torch.quantize_per_tensor") is torch.quantize_per_tensor
    with pytest.raises(UnsupportedError, match="allowlist"):
        function_name(os.system)
    for refused in ("torch.load", "torch.save", "torch.from_file", "os.system", 3):
        with pytest.raises(UnsupportedError):
            resolve_function(refused)
    assert check_method("dequantize") == "dequantize"
    for refused in ("apply_", "untyped_storage", "__reduce_ex__"):
        with pytest.raises(UnsupportedError):
            check_method(refused)


def _qx(shape, scale=0.05, zero_point=128):
    return torch.quantize_per_tensor(torch.randn(shape), scale, zero_point, torch.quint8)


def _module_cases():
    from fxopt.quant.nn import int8 as qm

    from fxopt.quant.nn.dynamic import DynamicEmbeddingBag

    w = lambda *s: torch.quantize_per_channel(torch.randn(*s), torch.rand(s[0], dtype=torch.float64) * 0.02 + 0.01,
                                               torch.zeros(s[0], dtype=torch.long), 0, torch.qint8)
    conv3d = lambda engine: qm.QConv(3, w(4, 2, 3, 3, 3), torch.randn(4), [1] * 3, [1] * 3, [1] * 3, 1, 0.1, 3,
                                     engine=engine)
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.uniform_(-1, 1)
    return {
        "quantize": (qm.QuantizeInput(0.05, 120), (torch.randn(2, 3),)),
        "conv1d_relu": (qm.QConv(1, w(4, 2, 3), None, [2], [1], [1], 2, 0.1, 0, relu=True, engine="x86"),
                        (_qx((1, 4, 9)),)),
        "conv3d_qnnpack": (conv3d("qnnpack"), (_qx((1, 2, 4, 4, 4)),)),
        "linear": (qm.QLinear(w(5, 6), torch.randn(5), 0.1, 60, engine="qnnpack"), (_qx((3, 6)),)),
        "mul_relu": (qm.QMul(0.2, 0, relu=True), (_qx((2, 3)), _qx((2, 3)))),
        "cat": (qm.QCat(1, 0.07, 100), (_qx((2, 3)), _qx((2, 2)))),
        "hardswish": (qm.QHardswish(0.04, 90), (_qx((2, 5)),)),
        "layer_norm": (qm.QLayerNorm([6], torch.randn(6), torch.randn(6), 1e-5, 0.05, 128), (_qx((2, 6)),)),
        "batch_norm": (qm.QBatchNorm.from_float(bn, (0.05, 128)), (_qx((1, 2, 3, 3)),)),
        "dynamic_fp16": (DynamicLinear.from_float(nn.Linear(6, 4), torch.float16), (torch.randn(3, 6),)),
        "embedding_bag": (DynamicEmbeddingBag.from_float(nn.EmbeddingBag(10, 4, mode="sum")),
                          (torch.tensor([[1, 2], [3, 9]]),)),
    }


_CASES = ["quantize", "conv1d_relu", "conv3d_qnnpack", "linear", "mul_relu", "cat", "hardswish", "layer_norm",
          "batch_norm", "dynamic_fp16", "embedding_bag"]


@pytest.mark.parametrize("case", _CASES)
def test_every_storable_module_round_trips(case):
    from fxopt.io.module_format import decode_module, encode_module

    torch.manual_seed(0)
    cases = _module_cases()
    assert sorted(cases) == sorted(_CASES)
    module, inputs = cases[case]
    entry = encode_module(module, case)
    assert entry["class"] == f"fxopt.{type(module).__name__}"
    rebuilt = decode_module(entry, case)
    assert type(rebuilt) is type(module)
    expected, got = module(*inputs), rebuilt(*inputs)
    assert torch.equal(got.int_repr() if got.is_quantized else got, expected.int_repr() if expected.is_quantized
                       else expected)
    if got.is_quantized:
        assert (got.q_scale(), got.q_zero_point()) == (expected.q_scale(), expected.q_zero_point())


def test_standard_torch_modules_round_trip_without_init():
    from fxopt.io.module_format import decode_module, encode_module

    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.Hardtanh(-1, 2),
                        nn.MaxPool2d(2, ceil_mode=True), nn.Flatten()).eval()
    rebuilt = decode_module(encode_module(seq, "seq"), "seq")
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(rebuilt(x), seq(x))
    with pytest.raises(UnsupportedError, match="not in fxopt's allowlist"):
        decode_module({"class": "torch.nn.functional", "state": {}}, "m")


class _Recurrent(nn.Module):
    def __init__(self, cls, bidirectional: bool):
        super().__init__()
        self.rnn = cls(8, 16, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(32 if bidirectional else 16, 4)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


@pytest.mark.parametrize("cls,bidirectional", [(nn.LSTM, False), (nn.GRU, True)])
@pytest.mark.parametrize("recipe", ["dynamic_int8", "fp16"])
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_dynamic_rnn_models_round_trip_bit_exact(tmp_path, cls, bidirectional, recipe, suffix):
    torch.manual_seed(0)
    model = _Recurrent(cls, bidirectional).eval()
    q = fxopt.compile(model, getattr(fxopt.recipes, recipe)(), example_inputs=(torch.randn(3, 5, 8),))
    assert type(q.rnn).__name__ == f"Dynamic{cls.__name__}"
    path = tmp_path / f"rnn{suffix}"
    fxopt.save(q, path)
    restored = fxopt.load(path)
    x = torch.randn(2, 7, 8)  # another batch and length
    assert type(restored.rnn) is type(q.rnn)
    assert torch.equal(restored(x), q(x))
