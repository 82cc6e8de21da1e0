"""Models and references shared by bench/bench_dynamic.py and tests/quant/test_dynamic_models.py.

A 3-layer LSTM speaker-style encoder with trained-like weights, a BERT-style text encoder, fxopt's dynamic
int8 compile and torch.ao's ``quantize_dynamic`` (the reference; tests and benchmarks only).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import passes as fp


def features(batch: int, steps: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Log-mel-like inputs: smooth in time, energy falling with the band, per-band offsets."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, steps + 8, dim, generator=g)
    z = F.avg_pool1d(z.transpose(1, 2), 8, stride=1)[:, :, :steps].transpose(1, 2)
    energy = torch.exp(torch.linspace(1.5, -1.0, dim))
    return z * energy * 2 + torch.linspace(3, -3, dim)


def trained_like_lstm(input_size: int = 80, hidden: int = 256, layers: int = 3, seed: int = 1, **kw) -> nn.LSTM:
    """An ``nn.LSTM`` whose weights have a trained model's per-row and per-gate spread."""
    lstm = nn.LSTM(input_size, hidden, num_layers=layers, batch_first=True, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    gate_gain = torch.tensor([1.0, 1.0, 1.6, 1.0]).repeat_interleave(hidden).view(-1, 1)  # i, f, g, o
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if "weight" in name:
                rows, cols = p.shape
                row_scale = torch.exp(0.6 * torch.randn(rows, 1, generator=g)) / math.sqrt(cols)
                p.copy_(torch.randn(rows, cols, generator=g) * row_scale * gate_gain)
            else:
                b = 0.1 * torch.randn(p.shape, generator=g)
                if "bias_ih" in name:
                    b[hidden:2 * hidden] += 1.5  # forget gate: long memory
                p.copy_(b)
    return lstm


class LSTMEncoder(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.lstm = trained_like_lstm(**kw)

    def forward(self, x):
        return self.lstm(x)[0]


class TextEncoder(nn.Module):
    """Token + position embeddings and an ``nn.TransformerEncoder`` (BERT-style, post-norm, GELU)."""

    def __init__(self, vocab=1000, d_model=384, heads=6, ff=1536, layers=6, max_len=128):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, max_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids):
        return self.encoder(self.tokens(ids) + self.pos[:, : ids.shape[1]])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1).mean().item()


def fxopt_dynamic(model: nn.Module, example, **options) -> nn.Module:
    return fxopt.compile(model, passes=[fp.QuantizeDynamic(**options)], example_inputs=(example,))


def torch_ao_dynamic(model: nn.Module) -> nn.Module:
    """The reference: torch.ao's quantize_dynamic (tests and benchmarks only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear, nn.LSTM}, dtype=torch.qint8)


def run_ao(model, x):
    """Run a torch.ao-quantized model (its Linear replacements break nn.TransformerEncoder's eval fast path)."""
    # torch.ao's Linear replacements break nn.TransformerEncoder's eval fast path (it reads .weight)
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
