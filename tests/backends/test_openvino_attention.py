"""backend="openvino": attention placed for OpenVINO's fused int8 attention kernel (NNCF's placement), read back
from the real CPU plugin's runtime model: q / k / v int8 on one symmetric grid (rounded once), the scores and the
softmax probabilities float. The model is bench.deploy_speed's TextEncoder (pre-LN, nn.Linear +
scaled_dot_product_attention + GELU), small."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
import torch

import fxopt
from fxopt import recipes

pytest.importorskip("openvino")
pytest.importorskip("onnx")

from bench.deploy_speed import TextEncoder  # noqa: E402

from fxopt.backends.onnx import export_onnx, onnx_spec  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_onnx import sqnr  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = TextEncoder(width=64, heads=2, layers=LAYERS, ff=128, vocab_dim=16).eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 16, 16, generator=gen) for _ in range(4)]
    test = torch.randn(4, 16, 16, generator=gen)
    prepared = fxopt.compile(model, recipes.static_int8(data, backend="openvino"), example_inputs=(data[0][:1],))
    return model, data, test, prepared


@pytest.fixture(scope="module")
def lowered(encoder):
    return fxopt.lower(encoder[3], "openvino")


def _ir(module):
    import openvino as ov  # noqa: PLC0415

    return ov.Core().read_model(module.xml.decode(), ov.Tensor(np.frombuffer(module.weights, np.uint8)))


def test_attention_runs_int8_with_float_scores_and_probabilities(lowered):
    rt = lowered.compiled.get_runtime_model()
    attention = [op for op in rt.get_ops() if op.get_rt_info()["layerType"].astype(str) == "Subgraph"
                 and "Softmax" in op.get_rt_info()["originalLayersNames"].astype(str)]
    assert len(attention) == LAYERS
    for op in attention:  # q and k come in as int8 (no zero point: the kernel's i8 q @ kᵀ); v is dequantized
        # for the float probabilities @ v, as in NNCF's IR
        inputs = [str(op.get_input_element_type(i)) for i in range(op.get_input_size())]
        assert inputs[:2] == ["<Type: 'int8_t'>"] * 2, inputs
        assert op.get_rt_info()["runtimePrecision"].astype(str) == "i8"
    ir = _ir(lowered)
    ops = ir.get_ordered_ops()
    fused = [op for op in ops if op.get_type_name() == "ScaledDotProductAttention"]
    softmaxes = [op for op in ops if op.get_type_name() == "Softmax"]
    assert len(fused) + len(softmaxes) == LAYERS
    for op in softmaxes:  # where the frontend keeps the ops apart: no rounding of the scores or probabilities
        scores = op.input_value(0).get_node()
        while scores.get_type_name() in ("Multiply", "Add", "Divide"):
            scores = scores.input_value(0).get_node()
        assert scores.get_type_name() == "MatMul", scores.get_type_name()
        assert all(t.get_node().get_type_name() != "FakeQuantize" for t in op.output(0).get_target_inputs())


def test_q_k_v_rounded_on_one_symmetric_grid(lowered):
    """Between the qkv projection and attention each value is on one grid: the FakeQuantizes on its way (the
    projection's output, repeated after reshapes / indexing with the same range) all have the same symmetric
    range (zero point 128 as u8: s8 without a zero point in the plugin), not a second, operand-own range."""
    ir = _ir(lowered)
    attention_inputs = [op.input_value(i) for op in ir.get_ordered_ops()
                        if op.get_type_name() == "ScaledDotProductAttention" for i in range(3)]
    assert len(attention_inputs) == 3 * LAYERS
    for value in attention_inputs:
        node, ranges = value.get_node(), set()
        while node.get_type_name() in ("Reshape", "Transpose", "Gather", "Squeeze", "Unsqueeze", "Multiply",
                                       "FakeQuantize"):
            if node.get_type_name() == "FakeQuantize":
                assert node.get_levels() == 256
                ranges.add(tuple(round(float(np.ravel(node.input_value(i).get_node().get_data())[0]), 6)
                                 for i in (1, 2)))
            node = node.input_value(0).get_node()
        assert node.get_type_name() in ("Add", "MatMul"), node.get_type_name()  # the projection (+ bias)
        assert len(ranges) == 1, ranges
        lo, hi = ranges.pop()
        assert round(-lo / ((hi - lo) / 255)) == 128, (lo, hi)


def test_numerics_match_fxopt_int8(encoder, lowered):
    model, data, test, prepared = encoder
    with torch.no_grad():
        ref = model(test)
        ours = lowered(test)
        x86 = fxopt.compile(model, recipes.static_int8(data), example_inputs=(data[0][:1],), backend="x86")(test)
        reference = fxopt.lower(prepared, "reference")(test)
    assert sqnr(reference, ours) >= 30  # fxopt's own simulation of this int8 graph
    assert sqnr(x86, ours) >= 30  # fxopt's x86 int8
    assert sqnr(ref, ours) >= sqnr(ref, x86) - 1.0  # attention in int8 costs at most 1 dB over x86's float one


def test_onnx_runtime_export_keeps_its_placement(encoder):
    """The OpenVINO switches leave ONNX Runtime's export alone: both attention MatMuls read two DQs there."""
    proto, _ = export_onnx(encoder[3], onnx_spec())
    producers = {out: node for node in proto.graph.node for out in node.output}
    weights = {i.name for i in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"
               and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                       and producers[i].input[0] not in weights for i in n.input)]
    assert len(matmuls) == 2 * LAYERS
