"""Hugging Face transformers models (small configs built in code, random init, no downloads).

Their root ``forward`` defeats torch.fx (keyword/output handling), so auto mode traces them with
torch.export; Linear and Embedding calls are lifted back to module calls under the model's names.
"""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import meta, recipes
from fxopt.quant.nn import DynamicLinear

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPoolingAndCrossAttentions  # noqa: E402


def small_bert(layers=2, width=64, vocab=1000):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                     num_attention_heads=max(1, width // 32), intermediate_size=4 * width,
                                     max_position_embeddings=128)
    return transformers.BertModel(config).eval()


def batch(batch_size, length, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # one padded sequence
    return ids, mask


def mean_pooled(out, mask):
    w = mask.unsqueeze(-1).float()
    return (out.last_hidden_state * w).sum(1) / w.sum(1)


def pooled_cosine(model, candidate, inputs):
    with torch.no_grad():
        a, b = mean_pooled(model(*inputs), inputs[1]), mean_pooled(candidate(*inputs), inputs[1])
    return torch.nn.functional.cosine_similarity(a, b).min().item()


def test_bert_auto_mode_exports_keeps_output_type_and_dynamic_dims():
    model = small_bert()
    gm = fxopt.trace(model, batch(2, 16))
    assert any("traced with torch.export" in n for n in meta.trace_notes(gm))
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"embeddings.word_embeddings", "encoder.layer.0.attention.self.query", "pooler.dense"} <= calls
    for shape in ((2, 16), (1, 7), (3, 24)):  # other batch sizes and lengths than the examples
        inputs = batch(*shape, seed=1)
        with torch.no_grad():
            out, ref = gm(*inputs), model(*inputs)
        assert type(out) is BaseModelOutputWithPoolingAndCrossAttentions
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=1e-5)


def test_bert_dynamic_int8_default_recipe():
    model = small_bert()
    q = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=batch(2, 16))
    stats = {r.name: r.stats for r in fxopt.records(q)}["quantize-dynamic"]
    assert stats == {"Embedding": 3, "Linear": 13}  # 6 per layer + pooler
    assert isinstance(q.get_submodule("encoder.layer.1.output.dense"), DynamicLinear)
    inputs = batch(4, 20, seed=2)
    with torch.no_grad():
        assert type(q(*inputs)) is BaseModelOutputWithPoolingAndCrossAttentions
    assert pooled_cosine(model, q, inputs) >= 0.99
    assert type(model.encoder.layer[1].output.dense) is torch.nn.Linear  # the user's model is untouched


def test_bert_export_route_then_static_int8_of_the_linear_layers():
    """The documented route (trace with mode="export", then compile) and static int8 on x86."""
    model = small_bert()
    gm = fxopt.trace(model, batch(2, 16), mode="export")
    calibration = [batch(4, 16, seed=s) for s in range(4)]
    q = fxopt.compile(gm, recipes.static_int8(calibration), example_inputs=batch(2, 16), backend="x86")
    kinds = [type(m).__name__ for m in q.modules()]
    assert kinds.count("QLinear") == 13
    inputs = batch(3, 12, seed=5)
    with torch.no_grad():
        assert type(q(*inputs)) is BaseModelOutputWithPoolingAndCrossAttentions
    assert pooled_cosine(model, q, inputs) >= 0.99


def test_distilbert_dynamic_int8():
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=2, hidden_dim=256,
                                           max_position_embeddings=128)
    model = transformers.DistilBertModel(config).eval()
    q = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=batch(2, 16))
    stats = {r.name: r.stats for r in fxopt.records(q)}["quantize-dynamic"]
    assert stats["Linear"] == 12 and stats["Embedding"] == 2
    inputs = batch(3, 9, seed=3)
    with torch.no_grad():
        out = q(*inputs)
    assert type(out) is BaseModelOutput
    assert pooled_cosine(model, q, inputs) >= 0.99


def test_gpt2_block_conv1d_lifted_dynamic_int8_and_fp16():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    block = transformers.models.gpt2.modeling_gpt2.GPT2Block(config).eval()
    x = torch.randn(2, 8, 64)
    gm = fxopt.trace(block, (x,))
    assert any("traced with torch.export" in n for n in meta.trace_notes(gm))
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"} <= calls  # Conv1D: view, addmm, view
    x2 = torch.randn(1, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x2), block(x2), rtol=0, atol=1e-5)
    q = fxopt.compile(gm, recipes.dynamic_int8(), example_inputs=(x,))
    assert {r.name: r.stats for r in fxopt.records(q)}["quantize-dynamic"] == {"Conv1D": 4}
    assert isinstance(q.get_submodule("mlp.c_fc"), DynamicLinear)
    half = fxopt.compile(gm, recipes.fp16(), example_inputs=(x,))
    record = {r.name: r for r in fxopt.records(half)}["convert-fp16"]
    assert record.modified and record.stats["bytes_after"] < 0.55 * record.stats["bytes_before"]
    with torch.no_grad():
        ref = block(x2)
        for candidate in (q, half):
            out = candidate(x2)
            assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


@pytest.mark.slow
def test_minilm_size_bert_dynamic_int8_cosine():
    """Issue 7.2's bar: all-MiniLM-L6-v2 size (6 layers, 384 wide, 30522 tokens), random init, default recipe."""
    model = small_bert(layers=6, width=384, vocab=30522)
    q = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=batch(2, 16, vocab=30522))
    inputs = batch(8, 32, vocab=30522, seed=7)
    assert pooled_cosine(model, q, inputs) >= 0.99


@pytest.mark.slow
def test_minilm_size_bert_static_int8_encoder_linear_x86():
    model = small_bert(layers=6, width=384, vocab=30522)
    calibration = [batch(8, 32, vocab=30522, seed=s) for s in range(8)]
    q = fxopt.compile(model, recipes.static_int8(calibration), example_inputs=calibration[0], backend="x86")
    assert [type(m).__name__ for m in q.modules()].count("QLinear") == 37
    inputs = batch(8, 32, vocab=30522, seed=99)
    assert pooled_cosine(model, q, inputs) >= 0.99
