"""Dynamically quantized attention: ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``.

``nn.MultiheadAttention`` keeps its input projection as a raw ``in_proj_weight`` parameter and calls
``F.multi_head_attention_forward``, which reads ``out_proj.weight`` directly; swapping ``out_proj`` for a
quantized module breaks it (that is why torch marks it ``NonDynamicallyQuantizableLinear``, and why
``torch.ao``'s ``quantize_dynamic`` leaves all attention projections float). fxopt replaces the whole
attention module by :class:`DynamicMultiheadAttention`: the q/k/v and output projections are dynamic
int8 (per-channel) matmuls; the attention itself (softmax(QKᵀ/√d)·V) runs in float.

``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` take a fused "fast path" in eval mode that reads
the float weights of every projection; :class:`DynamicTransformerEncoderLayer` is the same layer computed
the regular way (the pass also switches off the encoder's nested-tensor fast path).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import QuantizedModule
from .dynamic import DynamicLinear, _check_dtype, needs_reduce_range, pack_linear

__all__ = ["DynamicMultiheadAttention", "DynamicTransformerEncoderLayer"]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """MHA masks (bool: True = masked out; float: added) as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class DynamicMultiheadAttention(QuantizedModule):
    """``nn.MultiheadAttention`` (inference) with dynamic int8 (or fp16) q/k/v and output projections."""

    def __init__(self, mha: nn.MultiheadAttention, dtype: torch.dtype = torch.qint8,
                 reduce_range: bool | None = None):
        super().__init__()
        _check_dtype(dtype)
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        e = self.embed_dim
        bias = mha.in_proj_bias
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(e)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = bias.split(e) if bias is not None else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = (
            self._linear(w, b, dtype, reduce_range) for w, b in zip(weights, biases))
        self.out_proj = DynamicLinear.from_float(mha.out_proj, dtype, reduce_range)
        # self-attention (query is key is value) runs one matmul over the concatenated projections
        self.qkv_proj = None
        if mha._qkv_same_embed_dim:
            self.qkv_proj = self._linear(mha.in_proj_weight, bias, dtype, reduce_range)
            self.q_proj = self.k_proj = self.v_proj = None  # the fused one holds the same weights

    @staticmethod
    def _linear(w: torch.Tensor, b: torch.Tensor | None, dtype, reduce_range) -> DynamicLinear:
        rr = needs_reduce_range() if reduce_range is None else reduce_range
        return DynamicLinear(pack_linear(w, b, dtype), w.shape[1], w.shape[0], dtype, rr)

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, dtype: torch.dtype = torch.qint8,
                   reduce_range: bool | None = None) -> "DynamicMultiheadAttention":
        return cls(module, dtype, reduce_range)

    def _project(self, query, key, value):
        e = self.embed_dim
        if self.qkv_proj is None:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query is key and key is value:
            return self.qkv_proj(query).split(e, dim=-1)
        # cross-attention with a fused projection: project each input, keep its slice
        q = self.qkv_proj(query)[..., :e]
        kv = self.qkv_proj(key)
        k = kv[..., e:2 * e]
        v = kv[..., 2 * e:] if value is key else self.qkv_proj(value)[..., 2 * e:]
        return q, k, v

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:  # work batch-first: (B, L, E)
            same_kv = key is value
            same_qk = query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        q, k, v = self._project(query, key, value)
        b, lq, _ = q.shape
        ls = k.shape[1]
        heads = lambda t, n: t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q, lq), heads(k, ls), heads(v, ls)

        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (B * heads, L, S)
            mask = mask.view(b, self.num_heads, lq, ls)
        if is_causal and mask is None:
            mask = _additive(torch.ones(lq, ls, dtype=torch.bool, device=q.device).triu(1), q.dtype)
        pad = _additive(key_padding_mask, q.dtype)
        if pad is not None:
            pad = pad.view(b, 1, 1, ls)
            mask = pad if mask is None else mask + pad

        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in ("qkv_proj", "q_proj", "k_proj", "v_proj", "out_proj"):
            module = getattr(self, name)
            if module is not None:
                out.update({f"{name}.{k}": t for k, t in module.fxopt_weights().items()})
        return out


class DynamicTransformerEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (inference, regular path) with dynamic int8 projections."""

    def __init__(self, layer: nn.TransformerEncoderLayer, dtype: torch.dtype = torch.qint8,
                 reduce_range: bool | None = None, keep_float: frozenset[str] = frozenset()):
        """``keep_float``: names among ``self_attn``, ``linear1``, ``linear2`` left as the float modules."""
        super().__init__()
        quantize = {"self_attn": DynamicMultiheadAttention, "linear1": DynamicLinear, "linear2": DynamicLinear}
        for name, cls in quantize.items():
            child = getattr(layer, name)
            setattr(self, name, child if name in keep_float else cls.from_float(child, dtype, reduce_range))
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout, self.dropout1, self.dropout2 = layer.dropout, layer.dropout1, layer.dropout2
        self.activation = layer.activation
        self.norm_first = layer.norm_first
        self.batch_first = layer.self_attn.batch_first

    @classmethod
    def from_float(cls, module: nn.TransformerEncoderLayer, dtype: torch.dtype = torch.qint8,
                   reduce_range: bool | None = None, keep_float: frozenset[str] = frozenset(),
                   ) -> "DynamicTransformerEncoderLayer":
        return cls(module, dtype, reduce_range, keep_float)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff(self.norm2(x))
        else:
            x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff(x))
        return x

    def _sa(self, x, mask, padding_mask, is_causal):
        out = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding_mask,
                             need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(out)

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))
