"""Where the QDQ export puts (and leaves out) Q/DQ, and which kernels ONNX Runtime / OpenVINO then pick.

shufflenet_v2's channel shuffle (``x.size()`` → view → transpose → view, then ``chunk``) is the case: its shape
arithmetic must be constants, no int8 activation may be dequantized only to read its shape, and no QDQ may
sit inside the Reshape → Transpose → Reshape chain (OpenVINO fuses that chain into one u8 ShuffleChannels
only without them).
"""

from __future__ import annotations

import pathlib
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision

import fxopt
from fxopt import recipes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the shared helpers of test_onnx.py
from test_onnx import sqnr, trained_looking  # noqa: E402

N_SHUFFLES = 16  # 4 + 8 + 4 blocks, each ends with a channel shuffle
N_CATS = 16


@pytest.fixture(scope="module")
def shufflenet():
    torch.manual_seed(0)
    model = trained_looking(torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    data = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    with torch.no_grad():
        prepared = fxopt.compile(model, recipes.static_int8(data, observer="minmax"), example_inputs=(x,))
        x86 = fxopt.lower(prepared, "x86")(x)
    return model, x, prepared, x86


@pytest.fixture(scope="module")
def exported(shufflenet):
    _, x, prepared, x86 = shufflenet
    module = fxopt.lower(prepared, "onnx")
    return module, onnx.load_from_string(module.model_bytes)


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def _constants(graph) -> dict:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def test_shuffle_shapes_are_constants_but_the_batch(exported):
    _, model = exported
    graph = model.graph
    producer, consts = _producers(graph), _constants(graph)

    def shape_reads(name: str, seen: set) -> list:
        """Every (Shape node, Gather index) the value ``name`` is computed from."""
        node = producer.get(name)
        if node is None or name in seen:
            return []
        seen.add(name)
        if node.op_type == "Gather" and producer.get(node.input[0]) is not None \
                and producer[node.input[0]].op_type == "Shape":
            return [(producer[node.input[0]], int(consts[node.input[1]]))]
        if node.op_type == "Shape":
            return [(node, None)]
        return [r for i in node.input for r in shape_reads(i, seen)]

    reshapes = [n for n in graph.node if n.op_type == "Reshape"]
    assert len(reshapes) >= 2 * N_SHUFFLES
    for reshape in reshapes:
        reads = shape_reads(reshape.input[1], set())
        assert all(index == 0 for _, index in reads), f"{reshape.name} reads non-batch dims at run time: {reads}"
    # a Shape that is left reads the int8 tensor, not a DequantizeLinear output made only for it
    for node in graph.node:
        if node.op_type == "Shape":
            src = producer.get(node.input[0])
            assert src is None or src.op_type != "DequantizeLinear", node.name


def test_chunk_split_points_are_constants(exported, tmp_path):
    """``chunk`` exports as ``Slice`` with its split point computed from ``Shape → Gather([1]) → Add → Div →
    Mul``; for ONNX Runtime the 1-D Gather of the static channel dim is folded, so no Slice reads a Shape and
    the session runs no shape arithmetic at all."""
    _, model = exported
    producer = _producers(model.graph)

    def reads_shape(name: str) -> bool:
        node = producer.get(name)
        return node is not None and (node.op_type == "Shape" or any(reads_shape(i) for i in node.input))

    slices = [n for n in model.graph.node if n.op_type == "Slice"]
    assert len(slices) >= 2 * 3  # one chunk (two halves) per stride-1 block: 3 + 7 + 3 in shufflenet_v2
    assert not [s.name for s in slices if any(reads_shape(i) for i in s.input[1:])]
    ops = Counter(n.op_type for n in _optimized(model.SerializeToString(), tmp_path / "opt.onnx").graph.node)
    assert not {"Gather", "Add", "Div", "Mul"} & set(ops), ops


def test_no_qdq_inside_the_channel_shuffle(exported):
    _, model = exported
    graph = model.graph
    producer = _producers(graph)
    users = Counter()
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users[i] += 1
            readers.setdefault(i, []).append(n)
    transposes = [n for n in graph.node if n.op_type == "Transpose"]
    assert len(transposes) == N_SHUFFLES
    for t in transposes:
        assert producer[t.input[0]].op_type == "Reshape", "a QDQ sits between the shuffle's view and transpose"
        assert [r.op_type for r in readers[t.output[0]]] == ["Reshape"], "a QDQ sits after the shuffle's transpose"
        # the chain starts from a dequantized concat (one int8 value) and ends in a QDQ before the chunk's Slices
        first = producer[producer[t.input[0]].input[0]]
        assert first.op_type == "DequantizeLinear"
        last = readers[t.output[0]][0]
        assert [r.op_type for r in readers[last.output[0]]] == ["QuantizeLinear"]


def test_ort_runs_the_int8_kernels(exported, tmp_path):
    _, model = exported
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    ops = Counter(n.op_type for n in opt.graph.node)
    n_convs = sum(1 for n in model.graph.node if n.op_type == "Conv")
    assert ops["QLinearConv"] == n_convs and "Conv" not in ops
    assert ops["QLinearConcat"] == N_CATS and ops["QGemm"] == 1
    producer = _producers(opt.graph)
    dq_into_shape = [n.name for n in opt.graph.node if n.op_type == "Shape" and n.input[0] in producer
                     and producer[n.input[0]].op_type == "DequantizeLinear"]
    assert not dq_into_shape


def test_numerics_match_fxopt_x86_int8_any_batch(shufflenet, exported):
    model, x, _, x86 = shufflenet
    module, _ = exported
    with torch.no_grad():
        assert sqnr(x86, module(x)) >= 30
        assert module(torch.randn(5, 3, 64, 64)).shape == (5, 10)


def test_openvino_fuses_the_shuffle_in_u8(shufflenet):
    pytest.importorskip("openvino")
    from test_openvino import runtime_ops  # noqa: PLC0415

    _, x, prepared, x86 = shufflenet
    ov = fxopt.lower(prepared, fxopt.backends.OpenVinoBackend(threads=1))
    ops = runtime_ops(ov)
    assert ops[("ShuffleChannels", "u8")] == N_SHUFFLES
    assert ops[("Transpose", "u8")] == 0 and ops[("Transpose", "f32")] == 0
    assert ops[("Concatenation", "u8")] == N_CATS
    assert sum(v for (kind, _), v in ops.items() if kind == "Reorder") <= 2
    with torch.no_grad():
        assert sqnr(x86, ov(x)) >= 30


class SiLUNet(torch.nn.Module):
    """efficientnet's pieces: conv-bn-SiLU, a squeeze-excite gate (SiLU, sigmoid, mul), pool, flatten, dropout, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.act = torch.nn.SiLU()
        self.se_reduce = torch.nn.Conv2d(16, 4, 1)
        self.se_expand = torch.nn.Conv2d(4, 16, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.drop = torch.nn.Dropout(0.2)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.se_expand(torch.nn.functional.silu(self.se_reduce(self.pool(y)))))
        return self.fc(self.drop(torch.flatten(self.pool(y * gate), 1)))


@pytest.fixture(scope="module")
def silunet():
    torch.manual_seed(0)
    model = trained_looking(SiLUNet())
    x = torch.randn(2, 3, 16, 16)
    data = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        prepared = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,))
    return model, x, prepared


def test_silu_runs_as_qlinear_sigmoid_and_mul(silunet, tmp_path):
    model, x, prepared = silunet
    module = fxopt.lower(prepared, "onnx")
    graph = onnx.load_from_string(module.model_bytes).graph
    producer, consts = _producers(graph), _constants(graph)
    sigmoids = [n for n in graph.node if n.op_type == "Sigmoid"]
    assert len(sigmoids) == 3  # two SiLUs + the gate
    for sig in sigmoids:  # every sigmoid output is rounded on its fixed [0, 1] grid before the Mul reads it
        q = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == sig.output[0]]
        assert len(q) == 1
        assert float(consts[q[0].input[1]]) == pytest.approx(1 / 256) and int(consts[q[0].input[2]]) == 0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(module.model_bytes, options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearSigmoid"] == 3 and ops["QLinearMul"] == 3 and ops["QGemm"] == 1
    assert not {"Sigmoid", "Mul", "Gemm", "Conv"} & set(ops), ops
    assert all(producer.get(n.input[0]) is None or producer[n.input[0]].op_type != "Flatten"
               for n in graph.node if n.op_type == "Gemm"), "the classifier must read a QDQ'd flatten"
    with torch.no_grad():
        assert sqnr(fxopt.lower(prepared, "x86")(x), module(x)) >= 30


def test_openvino_keeps_silu_whole(silunet):
    from fxopt.backends.onnx import export_onnx  # noqa: PLC0415
    from fxopt.backends.openvino import openvino_spec  # noqa: PLC0415

    _, _, prepared = silunet
    graph, _ = export_onnx(prepared, openvino_spec())
    producer = _producers(graph.graph)
    muls_after_sigmoid = [n for n in graph.graph.node if n.op_type == "Mul"
                          and any(producer.get(i) is not None and producer[i].op_type == "Sigmoid" for i in n.input)]
    assert len(muls_after_sigmoid) == 2  # the two SiLUs: OpenVINO fuses Sigmoid·Mul into one float eltwise


# ---- mobilenet_v2 against ONNX Runtime's own quantize_static (issue 8's parity pair) ------------------------

def _optimized(model_bytes: bytes, path, level=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """fxopt's QDQ export of mobilenet_v2 and ORT's ``quantize_static`` (QDQ, per-channel, MinMax, U8/S8) on
    fxopt's float export of the same model, with the same calibration batches."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,  # noqa: PLC0415
                                          QuantType, quantize_static)

    torch.manual_seed(0)
    model = trained_looking(torchvision.models.mobilenet_v2(weights=None, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    data = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    with torch.no_grad():
        prepared = fxopt.compile(model, recipes.static_int8(data, observer="minmax"), example_inputs=(x[:1],))
        float_onnx = fxopt.compile(model, recipes.fuse(), example_inputs=(x[:1],), backend="onnx")
        x86 = fxopt.lower(prepared, "x86")(x)
    name = float_onnx.info["inputs"][0]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: b.numpy()} for b in data])

        def get_next(self):
            return next(self.items, None)

    tmp = tmp_path_factory.mktemp("ortq")
    (tmp / "float.onnx").write_bytes(float_onnx.model_bytes)
    quantize_static(str(tmp / "float.onnx"), str(tmp / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return prepared, x, x86, fxopt.lower(prepared, "onnx"), (tmp / "int8.onnx").read_bytes()


def test_mobilenet_v2_runs_the_kernels_of_ort_quantize_static(mobilenet, tmp_path):
    """Every conv a QLinearConv (ReLU6 absorbed: no float Clip island between them), every residual add a
    QLinearAdd, the pool and classifier int8, no DequantizeLinear → float op → QuantizeLinear left; op for op
    ORT's own quantize_static graph but for its final DequantizeLinear (fxopt's QGemm writes float logits)."""
    prepared, _, _, module, ort_bytes = mobilenet
    ours = _optimized(module.model_bytes, tmp_path / "fxopt.onnx")
    theirs = _optimized(ort_bytes, tmp_path / "ort.onnx")
    ops = Counter(n.op_type for n in ours.graph.node)
    n_convs = sum(1 for n in onnx.load_from_string(module.model_bytes).graph.node if n.op_type == "Conv")
    assert n_convs == 52 and ops["QLinearConv"] == n_convs
    assert ops["QLinearAdd"] == 10 and ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1
    assert ops["QuantizeLinear"] == 1 and "DequantizeLinear" not in ops  # the input's Q; int8 to the logits
    assert not {"Conv", "Clip", "Relu", "Add", "Gemm", "GlobalAveragePool"} & set(ops), ops
    expected = Counter(n.op_type for n in theirs.graph.node)
    expected["DequantizeLinear"] -= 1
    assert ops == +expected


def test_no_clamp_before_quantize_in_the_ort_export(mobilenet, tmp_path, monkeypatch):
    """ReLU6 is absorbed by the QuantizeLinear after it (its grid saturates at 0 and 6): no Clip in the file,
    so ORT_ENABLE_BASIC (no QDQ fusion) runs no more nodes than quantize_static's graph, and the codes are
    those of the export that kept the Clip (bit-identical outputs)."""
    import fxopt.backends.onnx as onnx_backend  # noqa: PLC0415

    prepared, x, x86, module, ort_bytes = mobilenet
    graph = onnx.load_from_string(module.model_bytes).graph
    assert not [n for n in graph.node if n.op_type in ("Clip", "Relu")]
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ours = _optimized(module.model_bytes, tmp_path / "fxopt.onnx", basic)
    theirs = _optimized(ort_bytes, tmp_path / "ort.onnx", basic)
    assert len(ours.graph.node) <= len(theirs.graph.node)
    monkeypatch.setattr(onnx_backend, "_drop_clamps_before_quantize", lambda model: None)
    kept = fxopt.lower(prepared, "onnx")
    assert sum(n.op_type == "Clip" for n in onnx.load_from_string(kept.model_bytes).graph.node) == 35
    with torch.no_grad():
        assert torch.equal(module(x), kept(x))
        assert sqnr(x86, module(x)) >= 30


def _clamp_then_q(op: str, bounds: tuple, scale: float, zero_point: int):
    from onnx import TensorProto, helper  # noqa: PLC0415

    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
             helper.make_tensor("z", TensorProto.UINT8, [], [zero_point])]
    clamp_in = ["x"]
    if op == "Clip":
        inits += [helper.make_tensor("lo", TensorProto.FLOAT, [], [bounds[0]]),
                  helper.make_tensor("hi", TensorProto.FLOAT, [], [bounds[1]])]
        clamp_in += ["lo", "hi"]
    nodes = [helper.make_node(op, clamp_in, ["c"]), helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op, bounds, scale, zero_point, dropped", [
    ("Relu", None, 0.1, 0, True),              # grid [0, 25.5]: ReLU changes no code
    ("Relu", None, 0.1, 10, False),            # grid [-1, 24.5]: ReLU maps -0.5 to code 10, not 5
    ("Clip", (0.0, 6.0), 6 / 255, 0, True),    # ReLU6 on its own grid
    ("Clip", (0.0, 6.0), 0.1, 0, False),       # grid up to 25.5: the 6 cut is inside it
    ("Clip", (-1.0, 6.0), 6 / 255, 0, True),   # a bound below the grid's lowest code
])
def test_drop_clamp_only_where_codes_stay(op, bounds, scale, zero_point, dropped):
    from fxopt.backends.onnx import _drop_clamps_before_quantize  # noqa: PLC0415

    model = _clamp_then_q(op, bounds, scale, zero_point)
    x = {"x": np.array([-0.5, 0.03, 5.0, 7.5], np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    _drop_clamps_before_quantize(model)
    assert (op not in [n.op_type for n in model.graph.node]) == dropped
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(before, after)
