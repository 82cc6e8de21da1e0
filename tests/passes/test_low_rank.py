"""low-rank: SVD error as theory says, rank choice, graph structure, skips, errors, BERT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt import passes as fp
from fxopt.compress.eager import graph_form
from fxopt.passes.low_rank import choose_rank, factorize


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)).eval()


@pytest.mark.parametrize("r", [1, 5, 20])
def test_linear_error_matches_eckart_young(r):
    layer = nn.Linear(40, 30)
    seq = factorize(layer, r)
    approx = seq[1].weight @ seq[0].weight
    s = torch.linalg.svdvals(layer.weight.detach().double())
    expected = s[r:].pow(2).sum().sqrt()
    assert float((approx.double() - layer.weight.double()).norm().detach()) == pytest.approx(float(expected), rel=1e-4)
    x = torch.randn(3, 40)
    torch.testing.assert_close(seq(x), x @ approx.T + layer.bias, atol=1e-5, rtol=1e-5)


def test_conv_becomes_kxk_then_1x1_with_the_truncated_weight():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    seq = factorize(conv, 4)
    assert (seq[0].kernel_size, seq[0].out_channels, seq[0].stride) == ((3, 3), 4, (2, 2))
    assert (seq[1].kernel_size, seq[1].in_channels, seq[1].out_channels) == ((1, 1), 4, 16)
    w = conv.weight.detach().reshape(16, -1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    truncated = (u[:, :4] * s[:4]) @ vh[:4]
    ref = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    ref.weight.data.copy_(truncated.reshape(conv.weight.shape).float())
    ref.bias.data.copy_(conv.bias.detach())
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(seq(x), ref(x), atol=1e-5, rtol=1e-4)


def test_graph_calls_two_layers_and_rank_ratio_halves_params():
    m = _mlp()
    out = fxopt.compile(m, [fp.LowRankFactorize(rank_ratio=0.5)], example_inputs=(torch.randn(2, 64),))
    assert type(out) is nn.Sequential and isinstance(out[0], nn.Sequential)  # the eager model, layers swapped
    gm = graph_form(out)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0.0", "0.1", "1", "2.0", "2.1"]
    stats = fxopt.records(gm)[0].stats
    assert stats["weight_params_after"] <= 0.5 * stats["weight_params_before"]
    assert stats["weight_params_after"] > 0.45 * stats["weight_params_before"]
    # full energy keeps the exact function wherever a factorization still saves parameters
    exact = fxopt.compile(nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 64)), [fp.LowRankFactorize(energy=1.0)])
    assert fxopt.records(exact)[0].stats["layers"] == 0  # rank 8 of 64x8 saves nothing: skipped
    assert "would not reduce" in fxopt.records(exact)[0].notes[0]


def test_energy_picks_the_smallest_rank_keeping_that_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, 10, 10, rank=None, rank_ratio=None, energy=16 / 22) == 1
    assert choose_rank(s, 10, 10, rank=None, rank_ratio=None, energy=0.9) == 2
    assert choose_rank(s, 10, 10, rank=None, rank_ratio=None, energy=1.0) == 4


def test_rank_above_full_rank_is_a_value_error():
    gm = torch.fx.symbolic_trace(_mlp())
    with pytest.raises(ValueError, match="full rank 32"):
        fp.LowRankFactorize(rank=40)(gm)
    with pytest.raises(ValueError):
        fp.LowRankFactorize(rank=0)
    with pytest.raises(ValueError, match="at most one"):
        fp.LowRankFactorize(rank_ratio=0.5, energy=0.9)
    with pytest.raises(ValueError, match="rank_ratio"):
        fp.LowRankFactorize(rank_ratio=1.5)


def test_nothing_to_factorize_and_grouped_convs_skipped():
    result = fp.LowRankFactorize()(torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())))
    assert not result.modified and "nothing to factorize" in result.notes[0]
    dw = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)))
    result = fp.LowRankFactorize()(dw)
    assert not result.modified and "grouped" in result.notes[0]


def test_low_rank_then_static_int8_multiplies_the_savings():
    m = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Flatten(),
                      nn.Linear(64 * 4 * 4, 64)).eval()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    low = fxopt.compile(m, [fp.LowRankFactorize(rank_ratio=0.5)])
    q = fxopt.compile(low, fxopt.recipes.static_int8(calib), example_inputs=(calib[0],), backend="x86")
    float_bytes = fxopt.report(m).total_bytes
    assert fxopt.report(low).total_bytes < 0.55 * float_bytes
    assert fxopt.report(q).total_bytes < 0.16 * float_bytes  # ~0.5 x ~0.25
    assert torch.isfinite(q(calib[0])).all()


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_bert_linears_factorize_and_prune_as_module_level_passes():
    model = _tiny_bert()
    ids = torch.randint(0, 100, (2, 12))
    ref = model(input_ids=ids).last_hidden_state
    # random init: a flat spectrum, so 99.9% of the energy needs (nearly) full rank: nothing saved, all skipped
    changed, _, notes = fp.LowRankFactorize(energy=0.999).apply(model)
    assert not changed and all("would not reduce" in n for n in notes)
    before = sum(p.numel() for p in model.parameters())
    changed, stats, notes = fp.LowRankFactorize(rank_ratio=0.5).apply(model)
    assert changed and stats["layers"] == 13  # q, k, v, attn out, intermediate, output x 2 layers + pooler
    assert isinstance(model.encoder.layer[0].attention.self.query, nn.Sequential)
    assert sum(p.numel() for p in model.parameters()) < before
    out = model(input_ids=ids).last_hidden_state
    assert out.shape == ref.shape and torch.isfinite(out).all()
    changed, stats, _ = fp.PruneMagnitude(0.5, scope="layer").apply(model)
    assert changed and stats["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()
    fp.ApplyMasks().apply(model)
    assert fxopt.report(model).sparsity > 0.3


def test_bert_through_compile():
    model = _tiny_bert()
    ids = torch.randint(0, 100, (2, 12))
    gm = fxopt.compile(model, fxopt.recipes.low_rank(rank_ratio=0.5) + fxopt.recipes.prune(0.5) + [fp.ApplyMasks()],
                       example_inputs=(ids,))
    low, pruned, baked = fxopt.records(gm)
    assert low.modified and low.stats["layers"] == 13
    assert pruned.stats["layers"] == 26 and pruned.stats["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert baked.stats["baked"] == 26
    out = gm(ids)
    assert out.last_hidden_state.shape == (2, 12, 32) and torch.isfinite(out.last_hidden_state).all()


def test_attention_and_encoder_layer_weights_are_left_alone_with_a_note():
    """nn.MultiheadAttention reads out_proj.weight itself, and the encoder layer's fast path reads
    linear1/linear2 weights: factorizing them would break the layer, so only the head is factorized."""
    model = nn.Sequential(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), nn.Linear(64, 64)).eval()
    x = torch.randn(2, 5, 64)
    modified, stats, notes = fp.LowRankFactorize(rank_ratio=0.3).apply(model)
    assert modified and stats["layers"] == 1 and isinstance(model[1], nn.Sequential)
    for child in ("0.self_attn.out_proj", "0.linear1", "0.linear2"):
        assert any(n.startswith(f"{child}: not factorized") for n in notes), notes
    with torch.no_grad():
        assert model(x).shape == x.shape


def _composed_spatial_kernel(seq: nn.Sequential) -> torch.Tensor:
    """The k_h x k_w kernel computed by vertical (r, I, kh, 1) then horizontal (O, r, 1, kw)."""
    return torch.einsum("ojx,jiy->oiyx", seq[1].weight.detach()[:, :, 0].double(),
                        seq[0].weight.detach()[:, :, :, 0].double())


@pytest.mark.parametrize("r", [1, 4, 11])
def test_spatial_svd_error_matches_eckart_young(r):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    seq = factorize(conv, r, "spatial")
    assert (seq[0].kernel_size, seq[0].out_channels, seq[0].stride, seq[0].padding) == ((3, 1), r, (2, 1), (1, 0))
    assert (seq[1].kernel_size, seq[1].in_channels, seq[1].stride, seq[1].dilation) == ((1, 5), r, (1, 1), (1, 2))
    # theory: W permuted to [I, kh, O, kw] and reshaped to (I*kh, O*kw); the error is the tail of its spectrum
    s = torch.linalg.svdvals(conv.weight.detach().double().permute(1, 2, 0, 3).reshape(6 * 3, 10 * 5))
    kernel = _composed_spatial_kernel(seq)
    error = float((kernel - conv.weight.detach().double()).norm())
    assert error == pytest.approx(float(s[r:].pow(2).sum().sqrt()), rel=1e-4)
    # and the two convolutions compute the conv with that kernel (stride, padding, dilation split by axis)
    x = torch.randn(2, 6, 13, 12)
    ref = torch.nn.functional.conv2d(x.double(), kernel, conv.bias.detach().double(), conv.stride, conv.padding,
                                     conv.dilation)
    torch.testing.assert_close(seq(x).double(), ref, atol=1e-5, rtol=1e-4)


def test_spatial_svd_is_exact_at_full_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    seq = factorize(conv, 12, "spatial")  # full rank min(4*3, 8*3) = 12
    x = torch.randn(1, 4, 9, 9)
    torch.testing.assert_close(seq(x), conv(x), atol=1e-5, rtol=1e-5)


def test_spatial_scheme_in_a_model_skips_what_would_not_shrink():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")).eval()
    x = torch.randn(1, 3, 12, 12)
    with pytest.raises(ValueError, match="full rank 9 of 0.*scheme 'spatial'"):
        fp.LowRankFactorize(rank=10, scheme="spatial")(torch.fx.symbolic_trace(model))
    out = fxopt.compile(model, [fp.LowRankFactorize(rank_ratio=0.5, scheme="spatial")], example_inputs=(x,))
    assert out[2][0].kernel_size == (3, 1) and out[2][1].kernel_size == (1, 3)
    notes = fxopt.records(out)[0].notes
    assert any(n.startswith("4: not factorized, padding_mode='reflect'") for n in notes)
    full = fxopt.compile(model, [fp.LowRankFactorize(energy=1.0, scheme="spatial", exclude=("4",))],
                         example_inputs=(x,))
    assert any(n.startswith("0: not factorized, rank 9 of a 9x48 weight would not reduce") for n in
               fxopt.records(full)[0].notes)
    with pytest.raises(ValueError, match="scheme must be one of channel, spatial"):
        fp.LowRankFactorize(scheme="depthwise")
