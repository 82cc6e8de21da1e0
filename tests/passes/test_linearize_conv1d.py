import pytest
import torch

import fxopt
from fxopt import passes as fp
from fxopt import recipes

transformers = pytest.importorskip("transformers")


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2Model(config).eval()


def _conv1d_names(model):
    return sorted(n for n, m in model.named_modules() if type(m).__name__ == "Conv1D")


def test_conv1d_becomes_an_equal_linear_and_the_model_is_untouched():
    model = _gpt2()
    before = _conv1d_names(model)
    assert len(before) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    ids = torch.randint(0, 100, (2, 12))
    gm = fxopt.compile(model, [fp.LinearizeConv1D()], example_inputs=(ids,))
    assert _conv1d_names(gm) == []
    linear = gm.get_submodule("h.0.mlp.c_fc")
    assert isinstance(linear, torch.nn.Linear) and tuple(linear.weight.shape) == (256, 64)
    torch.testing.assert_close(gm(ids).last_hidden_state, model(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert _conv1d_names(model) == before  # the user's model keeps its layers


def test_gpt2_static_int8_quantizes_its_projections():
    """GPT-2's projections are transformers' Conv1D: static int8 found nothing to quantize before
    ("PlaceObservers needs a graph with quant stubs")."""
    model = _gpt2()
    ids = torch.randint(0, 100, (2, 12))
    calib = [(torch.randint(0, 100, (2, 12)),) for _ in range(4)]
    int8 = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(ids,), backend="x86", check=True)
    assert sum(type(m).__name__ == "QLinear" for m in int8.modules()) == 8
    result = int8(ids)
    assert type(result).__name__ == "BaseModelOutputWithPastAndCrossAttentions"
    out, ref = result.last_hidden_state, model(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0)
    assert cos > 0.999, cos
