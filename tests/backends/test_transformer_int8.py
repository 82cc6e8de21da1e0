"""Static int8 of transformers on the runtime backends: nn.TransformerEncoder (ONNX Runtime, OpenVINO) and a
small Hugging Face BERT through the export frontend (OpenVINO), attention MatMuls in int8 (real runtimes)."""

from __future__ import annotations

import pathlib
import sys
from collections import Counter

import pytest
import torch

import fxopt
from fxopt import recipes
from tests.helpers import SmallEncoder

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_onnx import sqnr  # noqa: E402
from test_openvino import runtime_ops  # noqa: E402

from fxopt.backends.openvino import OpenVinoBackend, _core  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = SmallEncoder(distinct_layers=True).eval()
    x = torch.randn(2, 12, 16)
    data = [torch.randn(8, 12, 16) for _ in range(6)]
    return model, x, data


@pytest.fixture(scope="module")
def x86_int8(encoder):
    model, x, data = encoder
    return fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,), backend="x86")


def _onnx_model(module):
    return onnx.load_from_string(module.model_bytes) if hasattr(module, "model_bytes") else None


def _saved_onnx(module, tmp_path):
    path = tmp_path / "m.onnx"
    fxopt.save(module, path)
    return onnx.load(str(path))


def test_encoder_onnx_float_int8_fp16(encoder, x86_int8, tmp_path):
    model, x, data = encoder
    with torch.no_grad():
        ref = model(x)
        f = fxopt.compile(model, recipes.fuse(), example_inputs=(x,), backend="onnx")
        torch.testing.assert_close(f(x), ref, atol=1e-4, rtol=1e-4)
        q = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,), backend="onnx")
        assert sqnr(x86_int8(x), q(x)) >= 30
        h = fxopt.compile(model, recipes.fp16(), example_inputs=(x,), backend="onnx")
        assert sqnr(ref, h(x)) >= 40
        assert q(torch.randn(3, 12, 16)).shape == (3, 5)  # dynamic batch
    proto = _saved_onnx(q, tmp_path)
    onnx.checker.check_model(proto, full_check=True)
    producers = {out: node for node in proto.graph.node for out in node.output}
    weights = {i.name for i in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"
               and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                       and producers[i].input[0] not in weights for i in n.input)]
    assert len(matmuls) == 2 * 2  # q @ kᵀ and weights @ v of each layer, both int8 activations (not a Linear)
    assert any(i.data_type == onnx.TensorProto.INT8 for i in proto.graph.initializer)


def test_encoder_openvino_int8_matmuls(encoder, x86_int8):
    model, x, data = encoder
    q = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,), backend="openvino")
    with torch.no_grad():
        assert sqnr(x86_int8(x), q(x)) >= 30
    ops = runtime_ops(q)
    # q/k/v/out projections and the feed-forward of each layer, in int8: s8 where the input's range is
    # (near-)symmetric (LayerNorm outputs), u8 otherwise (after a GELU)
    assert ops[("FullyConnected", "u8")] + ops[("FullyConnected", "i8")] >= 2 * 6
    assert ops[("FullyConnected", "i8")] >= 2
    # the CPU plugin fuses attention (MatMul, Softmax, MatMul) into one subgraph that reads int8 q and k; the
    # softmax probabilities stay float (NNCF's placement, tests/backends/test_openvino_attention.py), so v enters
    # dequantized
    attention = [op for op in q.compiled.get_runtime_model().get_ops()
                 if op.get_rt_info()["layerType"].astype(str) == "Subgraph"
                 and "Softmax" in op.get_rt_info()["originalLayersNames"].astype(str)]
    assert len(attention) == 2
    assert all([str(op.get_input_element_type(i)) for i in range(2)] == ["<Type: 'int8_t'>"] * 2 for op in attention)
    # without that fusion q @ kᵀ is its own int8 layer, probabilities @ v a float one
    plain = _core().compile_model(q._read(), "CPU", {"SNIPPETS_MODE": "DISABLE", "INFERENCE_PRECISION_HINT": "f32"})
    layers = Counter((op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                     for op in plain.get_runtime_model().get_ops())
    assert layers[("MatMul", "i8")] == 2 and layers[("MatMul", "f32")] == 2


def test_x86_keeps_attention_float_with_a_reason(encoder, x86_int8):
    model, x, data = encoder
    prepared = fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,))
    calls = [n.target for n in prepared.graph.nodes if n.op == "call_function"]
    assert torch.nn.functional.scaled_dot_product_attention in calls and torch.matmul not in calls
    with torch.no_grad():
        assert sqnr(model(x), x86_int8(x)) >= 20


@pytest.mark.slow
def test_bert_static_int8_openvino():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256)
    bert = transformers.BertModel(config).eval()

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 1000, (2, 16), generator=g)
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 11:] = 0
        return ids, mask

    ids, mask = batch(0)
    q = fxopt.compile(bert, recipes.static_int8([batch(s) for s in range(1, 4)]), example_inputs=(ids, mask),
                      backend=OpenVinoBackend())
    with torch.no_grad():
        ref, out = bert(ids, mask), q(ids, mask)
    assert type(out).__name__ == type(ref).__name__
    assert sqnr(ref.last_hidden_state, out.last_hidden_state) >= 30
    cos = torch.nn.functional.cosine_similarity(ref.pooler_output, out.pooler_output)
    assert cos.min() > 0.999
    ops = runtime_ops(q)
    # q/k/v/out + feed-forward per layer, the pooler (s8 or u8 by the input's range)
    assert ops[("FullyConnected", "u8")] + ops[("FullyConnected", "i8")] == 2 * 6 + 1
    plain = _core().compile_model(q._read(), "CPU", {"SNIPPETS_MODE": "DISABLE", "INFERENCE_PRECISION_HINT": "f32"})
    layers = Counter((op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                     for op in plain.get_runtime_model().get_ops())
    assert layers[("MatMul", "i8")] == 2  # q @ kᵀ per layer (probabilities @ v: float, as NNCF's)
