"""Sequence models in ONNX Runtime: int8 linears on [batch, seq, hidden] inputs run as ``QGemm``, and graphs from
the export frontend (a Hugging Face BERT) keep their batch and sequence length dynamic in the file."""

from __future__ import annotations

import pathlib
import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import recipes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the shared helpers of test_onnx.py
from test_onnx import sqnr  # noqa: E402

from bench.models import TextEncoder  # noqa: E402


def _optimized(model_bytes: bytes, path: pathlib.Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = TextEncoder(vocab=200, d_model=64, heads=2, ff=128, layers=2, max_len=16).eval()
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 200, (2, 16), generator=g) for _ in range(6)]
    prepared = fxopt.compile(model, recipes.static_int8(tokens[:4]), example_inputs=(tokens[0],))
    return model, tokens[4:], fxopt.lower(prepared, "x86"), fxopt.lower(prepared, "onnx")


def test_linear_on_3d_input_runs_as_qgemm(encoder, tmp_path):
    model, _, _, module = encoder
    raw = onnx.load_from_string(module.model_bytes)
    producer = {o: n for n in raw.graph.node for o in n.output}
    weights = {i.name for i in raw.graph.initializer}
    weight_transposes = [n.name for n in raw.graph.node if n.op_type == "Transpose" and n.input[0] in producer
                         and producer[n.input[0]].op_type == "DequantizeLinear"
                         and producer[n.input[0]].input[0] in weights]
    assert not weight_transposes  # the exporter's Transpose of a weight is folded into the int8 initializer
    n_linears = sum(isinstance(m, nn.Linear) for m in model.modules())  # 2 per layer (ff) + out_proj per layer
    opt = _optimized(module.model_bytes, tmp_path / "opt.onnx")
    ops = Counter(n.op_type for n in opt.graph.node)
    # every linear (in-projection, out-projection, both feed-forward layers) is one int8-in / int8-out QGemm
    assert ops["QGemm"] >= n_linears + 2, ops
    assert ops["MatMulIntegerToFloat"] == 0 and ops["Gemm"] == 0, ops


def test_encoder_numerics_and_batch(encoder):
    _, test, x86, module = encoder
    with torch.no_grad():
        for ids in test:
            assert sqnr(x86(ids), module(ids)) >= 30
        ids = torch.randint(0, 200, (3, 16))
        assert sqnr(x86(ids), module(ids)) >= 30  # another batch size through the reshapes around each QGemm


def test_bert_export_frontend_dynamic_batch_and_sequence():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128)
    bert = transformers.BertModel(config).eval()

    def batch(seed, size=2, length=16):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 1000, (size, length), generator=g)
        mask = torch.ones(size, length, dtype=torch.long)
        mask[-1, length - 3:] = 0
        return ids, mask

    ids, mask = batch(0)
    q = fxopt.compile(bert, recipes.static_int8([batch(s) for s in range(1, 4)]), example_inputs=(ids, mask),
                      backend="onnx")
    model = onnx.load_from_string(q.model_bytes)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    for graph_input in model.graph.input:  # batch and sequence are named dims, not the example's 2 x 16
        dims = graph_input.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and dims[1].dim_param and not dims[1].dim_value
    with torch.no_grad():
        for size, length in [(2, 16), (1, 16), (3, 9), (1, 24)]:
            ids, mask = batch(10 + size + length, size, length)
            ref, out = bert(ids, mask), q(ids, mask)
            assert out.last_hidden_state.shape == (size, length, 64)
            cos = torch.nn.functional.cosine_similarity(ref.last_hidden_state.flatten(1),
                                                        out.last_hidden_state.flatten(1))
            assert cos.min() > 0.99
            assert torch.nn.functional.cosine_similarity(ref.pooler_output, out.pooler_output).min() > 0.99
