"""Which dynamic (int8 / fp16 weight) module runs a given float module, and when one cannot.

Shared by the ``quantize-dynamic`` and ``convert-fp16`` passes, so neither reads the other's internals.
Matched on the exact type: a subclass may have its own forward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ...export_frontend import conv1d_as_linear, is_conv1d
from .dynamic import BAG_MODES, DynamicEmbedding, DynamicEmbeddingBag, DynamicLinear
from .dynamic_attention import DynamicMultiheadAttention, DynamicTransformerEncoderLayer
from .dynamic_rnn import DynamicGRU, DynamicLSTM

__all__ = ["CONTAINERS", "ENCODER_LAYER_PARTS", "REPLACEMENTS", "dynamic_factory", "skip_reason"]

# float type -> dynamic class
REPLACEMENTS: dict[type, type] = {
    nn.Linear: DynamicLinear,
    nn.LSTM: DynamicLSTM,
    nn.GRU: DynamicGRU,
    nn.Embedding: DynamicEmbedding,
    nn.EmbeddingBag: DynamicEmbeddingBag,
}
# containers whose own code needs the float weights of their Linear layers: replaced whole (when Linear is asked)
CONTAINERS: dict[type, type] = {
    nn.TransformerEncoderLayer: DynamicTransformerEncoderLayer,
    nn.MultiheadAttention: DynamicMultiheadAttention,
}
ENCODER_LAYER_PARTS = ("self_attn", "linear1", "linear2")  # what DynamicTransformerEncoderLayer can keep float


def skip_reason(module: nn.Module) -> str | None:
    """Why a module of a supported type must stay float, or ``None``."""
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "max_norm renormalises the weights at lookup time"
    if isinstance(module, nn.EmbeddingBag):
        if module.max_norm is not None:
            return "max_norm renormalises the weights at lookup time"
        if module.mode not in BAG_MODES:
            return f"mode={module.mode!r}: the 8-bit embedding-bag kernel only sums (sum and mean are supported)"
        if module.padding_idx is not None:
            return "padding_idx is not supported by the 8-bit embedding-bag kernel"
    if isinstance(module, nn.LSTM) and module.proj_size:
        return "proj_size > 0 is not supported"
    if isinstance(module, nn.MultiheadAttention) and (module.bias_k is not None or module.add_zero_attn):
        return "add_bias_kv / add_zero_attn are not supported"
    if isinstance(module, nn.TransformerEncoderLayer) and skip_reason(module.self_attn):
        return skip_reason(module.self_attn)
    return None


def dynamic_factory(module: nn.Module, *, dtype: torch.dtype, reduce_range: bool | None = None,
                    types: tuple = tuple(REPLACEMENTS), rnn_first_input_fp16: bool = True,
                    keep_parts: frozenset[str] = frozenset()) -> Callable[[], nn.Module] | None:
    """A function building ``module``'s dynamic replacement, or ``None`` when its type is not handled.

    ``keep_parts`` (of :data:`ENCODER_LAYER_PARTS`) stay float inside a ``TransformerEncoderLayer``.
    """
    kind = type(module)
    if is_conv1d(module) and nn.Linear in types:  # transformers' Conv1D (GPT-2): a Linear, weight transposed
        return lambda: DynamicLinear.from_float(conv1d_as_linear(module), dtype, reduce_range)
    if kind is nn.TransformerEncoderLayer and nn.Linear in types:
        return lambda: DynamicTransformerEncoderLayer.from_float(module, dtype, reduce_range, keep_parts)
    if kind in CONTAINERS and nn.Linear in types:
        return lambda: CONTAINERS[kind].from_float(module, dtype, reduce_range)
    if kind in REPLACEMENTS and kind in types:
        if kind in (nn.LSTM, nn.GRU):
            return lambda: REPLACEMENTS[kind].from_float(module, dtype, reduce_range, rnn_first_input_fp16)
        return lambda: REPLACEMENTS[kind].from_float(module, dtype, reduce_range)
    return None
