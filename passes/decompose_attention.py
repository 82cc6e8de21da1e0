"""DecomposeAttention: PyTorch's attention modules as graph ops that static int8 can see into.

torch.fx keeps ``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention``
as leaf calls: their eval "fast path" reads the packed projection weights directly, so no pass could
quantize the Linear layers inside. This pass replaces each such call by the ops it computes:

* the packed input projection becomes three ``nn.Linear`` modules ``q_proj`` / ``k_proj`` / ``v_proj``
  (weights copied from ``in_proj_weight``; ``out_proj`` kept), heads split with ``unflatten`` and
  ``transpose`` / ``permute``;
* attention itself is either explicit, ``softmax(q @ kᵀ · scale + mask) @ v`` with two ``torch.matmul``
  calls (where the backend runs MatMul in int8, ``onnx`` / ``openvino``: both operands get QDQ), or one
  ``F.scaled_dot_product_attention`` call (float; PyTorch's int8 engines have no quantized matmul, so on
  ``x86`` / ``qnnpack`` the fused float kernel is the faster choice);
* an encoder layer is its LayerNorms, residual adds and feed-forward Linears, in the layer's own order
  (``norm_first`` or not), an encoder its layers and final norm.

With ``matmul`` enabled, ``scaled_dot_product_attention`` calls already in the graph (Hugging Face models
traced through the export frontend) are made explicit the same way.

The float numerics are those of the module's regular (non-fast-path) computation, up to float rounding
(about 1e-6). The residual stream (the layers' adds and LayerNorms) is marked to stay float
(``fxopt.meta.keep_float``, read by ``InsertQuantStubs``): each int8 add / LayerNorm there costs about as
much SQNR as a Linear layer, and a 6-layer encoder has 24 of them (28 dB instead of about 40 dB measured on
the 6 x 384 encoder); ``int8_residual=True`` quantizes them too. Masks: ``attn_mask`` (2-D or ``(batch·heads, L, S)``) and ``key_padding_mask``, bool or
float, as the module treats them. An encoder built with ``enable_nested_tensor=True`` that gets a
``src_key_padding_mask`` returns zeros at padded positions in PyTorch's inference fast path (before the
final norm); the decomposition does the same. A module in training mode (dropout), with
``add_bias_kv`` / ``add_zero_attn``, an unbatched input, or whose call the pass cannot read (unknown
mask dtype, output used other than by indexing) is left as it is, with a note. The user's model is not
touched: the pass rewrites the GraphModule it is given (``compile`` works on a copy).
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt import meta
from fxopt.backends.lowering import int8_spec
from fxopt.errors import UnsupportedError
from fxopt.pass_base import Pass, PassContext, PassResult

__all__ = ["DecomposeAttention"]

_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_NEG_INF = float("-inf")


class _Skip(Exception):
    """This call stays as it is; the message says why."""


def _unchanged(module: nn.Module, cls: type, methods: tuple[str, ...]) -> bool:
    """``module`` is a ``cls`` whose listed methods are ``cls``'s own (a subclass could compute anything)."""
    return isinstance(module, cls) and all(getattr(type(module), m) is getattr(cls, m) for m in methods)


def _kind(module: nn.Module) -> str | None:
    if _unchanged(module, nn.TransformerEncoder, ("forward",)):
        return "encoder"
    if _unchanged(module, nn.TransformerEncoderLayer, ("forward", "_sa_block", "_ff_block")):
        return "layer"
    if _unchanged(module, nn.MultiheadAttention, ("forward",)):
        return "attention"
    return None


class _Emit:
    """Appends nodes to ``gm``'s graph right before ``anchor``; collects the modules the new calls need."""

    def __init__(self, gm: torch.fx.GraphModule, anchor: torch.fx.Node) -> None:
        self.gm, self.anchor, self.prefix = gm, anchor, f"{anchor.target}."
        self.parts: dict[str, nn.Module] = {}  # path below the replaced module -> module

    def fn(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            return self.gm.graph.call_function(target, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> torch.fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            return self.gm.graph.call_method(name, args, kwargs)

    def module(self, path: str, module: nn.Module, *args: Any) -> torch.fx.Node:
        self.parts[path] = module
        with self.gm.graph.inserting_before(self.anchor):
            return self.gm.graph.create_node("call_module", self.prefix + path, args)  # added after the rewrite


def _bind(module: nn.Module, node: torch.fx.Node) -> dict[str, Any]:
    try:
        bound = inspect.signature(type(module).forward).bind(module, *node.args, **node.kwargs)
    except TypeError as exc:
        raise _Skip(f"its call does not match {type(module).__name__}.forward: {exc}") from exc
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])


def _rank(value: Any) -> int | None:
    shape = meta.shape_of(value) if isinstance(value, torch.fx.Node) else None
    return None if shape is None else len(shape)


def _mask_dtype(mask: Any, name: str) -> torch.dtype | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.fx.Node):
        raise _Skip(f"{name} is a constant, not a graph value")
    dtype = meta.dtype_of(mask)
    if dtype is None:
        raise _Skip(f"the dtype of {name} is unknown: compile with example_inputs")
    return dtype


def _additive(e: _Emit, mask: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """A mask as values to add to the scores: bool (True = masked) → 0 / -inf; a float mask as it is."""
    if dtype != torch.bool:
        return mask
    zeros = e.fn(torch.zeros_like, mask, dtype=torch.float32)
    return e.method("masked_fill", zeros, mask, _NEG_INF)


def _mha_bias(e: _Emit, heads: int, attn_mask: Any, key_padding_mask: Any) -> torch.fx.Node | None:
    """``attn_mask`` and ``key_padding_mask`` of ``nn.MultiheadAttention`` as one additive mask that broadcasts
    to ``(batch, heads, L, S)``."""
    bias = None
    attn_dtype = _mask_dtype(attn_mask, "attn_mask")
    if attn_mask is not None:
        rank = _rank(attn_mask)
        if rank not in (2, 3):
            raise _Skip("attn_mask is neither (L, S) nor (batch*heads, L, S)")
        bias = _additive(e, attn_mask, attn_dtype)
        if rank == 3:
            bias = e.method("unflatten", bias, 0, (-1, heads))
    kpm_dtype = _mask_dtype(key_padding_mask, "key_padding_mask")
    if key_padding_mask is not None:
        if _rank(key_padding_mask) != 2:
            raise _Skip("key_padding_mask is not (batch, S)")
        padding = _additive(e, key_padding_mask, kpm_dtype)
        padding = e.method("unsqueeze", e.method("unsqueeze", padding, 1), 2)
        bias = padding if bias is None else e.fn(operator.add, bias, padding)
    return bias


def _projections(mha: nn.MultiheadAttention) -> list[nn.Linear]:
    """q/k/v projections as Linear layers with copies of the (packed) weights."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = list(mha.in_proj_weight.detach().split(e))
    else:
        weights = [mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()]
    biases = list(mha.in_proj_bias.detach().split(e)) if mha.in_proj_bias is not None else [None] * 3
    layers = []
    for w, b in zip(weights, biases):
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if b is not None:
                linear.bias.copy_(b)
        layers.append(linear.train(mha.training))
    return layers


def _attend(e: _Emit, q, k, v, scale: float, bias=None, keep=None, causal: bool = False) -> tuple:
    """``softmax(q @ kᵀ · scale + bias) @ v`` as explicit ops; ``keep``: a bool mask, True = attend."""
    scores = e.fn(operator.mul, e.fn(torch.matmul, q, e.method("transpose", k, -2, -1)), scale)
    if bias is not None:
        scores = e.fn(operator.add, scores, bias)
    if keep is not None:
        scores = e.method("masked_fill", scores, e.method("logical_not", keep), _NEG_INF)
    if causal:
        lower = e.method("tril", e.fn(torch.ones_like, scores, dtype=torch.bool))
        scores = e.method("masked_fill", scores, e.method("logical_not", lower), _NEG_INF)
    weights = e.fn(torch.softmax, scores, -1)
    return e.fn(torch.matmul, weights, v), weights


@dataclass(frozen=True)
class DecomposeAttention(Pass):
    name: ClassVar[str] = "decompose-attention"

    # None: the backend the pipeline targets (compile/lower's ``backend``), x86 when none is named
    backend: Any = None
    # explicit q @ kᵀ and attn @ v matmuls; None: where the backend runs matmul in int8 (onnx, openvino)
    matmul: bool | None = None
    # the encoder layers' residual adds and LayerNorms in int8 too (default: float, see the module doc)
    int8_residual: bool = False

    def with_context(self, context: PassContext) -> "DecomposeAttention":
        return context.resolve(self, "recipes and DecomposeAttention(backend=None)")

    def _explicit(self) -> bool:
        if self.matmul is not None:
            return self.matmul
        try:
            spec = int8_spec(self.backend if self.backend is not None else "x86")
        except UnsupportedError:  # a backend without an int8 table: nothing runs in int8 there
            return False
        return spec.rule("matmul") is not None

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        explicit = self._explicit()
        stats = {"encoders": 0, "layers": 0, "attention": 0, "sdpa": 0}
        notes: list[str] = []
        for node in list(gm.graph.nodes):
            if node.op == "call_module":
                kind = _kind(gm.get_submodule(node.target))
                if kind is None:
                    continue
                try:
                    counts = _ModuleCall(gm, node, explicit, self.int8_residual).run(kind)
                except _Skip as why:
                    notes.append(f"{node.target} ({kind}) kept as one call: {why}")
                    continue
                for key, n in counts.items():
                    stats[key] += n
            elif explicit and node.op == "call_function" and node.target in _SDPA:
                try:
                    _decompose_sdpa(gm, node)
                except _Skip as why:
                    notes.append(f"{node.name} (scaled_dot_product_attention) kept: {why}")
                    continue
                stats["sdpa"] += 1
        modified = any(stats.values())
        if modified:
            gm.graph.lint()
            gm.recompile()
            notes.append("attention as explicit matmuls (int8 operands where the backend has int8 MatMul)" if explicit
                         else "attention as F.scaled_dot_product_attention (float: the backend has no int8 matmul)")
        return PassResult(gm, modified, stats, notes)


class _ModuleCall:
    """One call of an encoder / encoder layer / attention module, rewritten in place of its node."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, explicit: bool, int8_residual: bool) -> None:
        self.gm, self.node, self.explicit, self.int8_residual = gm, node, explicit, int8_residual
        self.module = gm.get_submodule(node.target)
        self.e = _Emit(gm, node)
        self.counts = {"encoders": 0, "layers": 0, "attention": 0}

    def run(self, kind: str) -> dict[str, int]:
        if any(m.training for m in self.module.modules()):
            raise _Skip("in training mode (dropout); the pass decomposes eval-mode modules")
        prefix = f"{self.node.target}."
        if any(n.op == "call_module" and n.target == self.node.target and n is not self.node for n in self.gm.graph.nodes):
            raise _Skip("the module is called more than once")
        if any(n.op in ("get_attr", "call_module") and n is not self.node and str(n.target).startswith(prefix)
               for n in self.gm.graph.nodes):
            raise _Skip("the graph reads its parameters or submodules elsewhere")
        args = _bind(self.module, self.node)
        self.rank = _rank(args["query" if kind == "attention" else "src"])
        created = set(self.gm.graph.nodes)
        try:
            self._rewrite(kind, args)
        except _Skip:
            for n in reversed(list(self.gm.graph.nodes)):  # take back what was emitted
                if n not in created and not n.users:
                    self.gm.graph.erase_node(n)
            raise
        self.gm.graph.erase_node(self.node)
        target = self.node.target
        self.gm.delete_submodule(target)
        for path, part in self.e.parts.items():
            self.gm.add_submodule(f"{target}.{path}", part)
        return self.counts

    def _rewrite(self, kind: str, a: dict[str, Any]) -> None:
        if kind == "attention":
            if a["is_causal"] and a["attn_mask"] is None:
                raise _Skip("is_causal=True without attn_mask")
            users = list(self.node.users)
            if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in users):
                raise _Skip("its output tuple is used other than by indexing")
            if any(u.args[1] != 0 for u in users) and not a["need_weights"]:
                raise _Skip("attention weights are read but need_weights=False")
            out, weights = self._attention("", self.module, a["query"], a["key"], a["value"], a["attn_mask"],
                                           a["key_padding_mask"], a["need_weights"], a["average_attn_weights"])
            for user in users:
                user.replace_all_uses_with(out if user.args[1] == 0 else weights)
                self.gm.graph.erase_node(user)
            return
        if kind == "layer":
            out = self._layer("", self.module, a["src"], a["src_mask"], a["src_key_padding_mask"], a["is_causal"])
        else:
            out = self._encoder(a["src"], a["mask"], a["src_key_padding_mask"], a["is_causal"])
        self.node.replace_all_uses_with(out)

    def _encoder(self, src, mask, key_padding_mask, is_causal) -> torch.fx.Node:
        enc, e = self.module, self.e
        x = src
        for i, layer in enumerate(enc.layers):
            if _kind(layer) != "layer":
                raise _Skip(f"layer {i} is a {type(layer).__name__}, not an nn.TransformerEncoderLayer")
            x = self._layer(f"layers.{i}.", layer, x, mask, key_padding_mask, is_causal)
        if getattr(enc, "use_nested_tensor", False) and key_padding_mask is not None and mask is None:
            # PyTorch's inference fast path runs on a nested tensor and pads it back with zeros
            padded = e.method("bool", key_padding_mask)
            if not enc.layers[0].self_attn.batch_first:
                padded = e.method("transpose", padded, 0, 1)
            x = e.method("masked_fill", x, e.method("unsqueeze", padded, -1), 0.0)
        if enc.norm is not None:
            x = self._residual(e.module("norm", enc.norm, x))
        self.counts["encoders"] += 1
        return x

    def _layer(self, path: str, layer: nn.TransformerEncoderLayer, src, mask, key_padding_mask,
               is_causal) -> torch.fx.Node:
        e = self.e
        if is_causal is True and mask is None:
            raise _Skip("is_causal=True without a mask")
        activation = layer.activation

        def sa(x):
            return self._attention(f"{path}self_attn.", layer.self_attn, x, x, x, mask, key_padding_mask,
                                   False, True)[0]

        def ff(x):
            h = e.module(f"{path}linear1", layer.linear1, x)
            h = e.module(f"{path}activation", activation, h) if isinstance(activation, nn.Module) \
                else e.fn(activation, h)
            return e.module(f"{path}linear2", layer.linear2, h)

        def norm(i, x):
            return self._residual(e.module(f"{path}norm{i}", getattr(layer, f"norm{i}"), x))

        def add(x, y):
            return self._residual(e.fn(operator.add, x, y))

        x = src
        if layer.norm_first:
            x = add(x, sa(norm(1, x)))
            x = add(x, ff(norm(2, x)))
        else:
            x = norm(1, add(x, sa(x)))
            x = norm(2, add(x, ff(x)))
        self.counts["layers"] += 1
        return x

    def _residual(self, node: torch.fx.Node) -> torch.fx.Node:
        """The residual stream (adds, LayerNorms) stays float unless ``int8_residual``."""
        if not self.int8_residual:
            meta.set_keep_float(node, "transformer residual stream (add / LayerNorm) kept float "
                                      "(DecomposeAttention(int8_residual=True) quantizes it)")
        return node

    def _attention(self, path: str, mha: nn.MultiheadAttention, query, key, value, attn_mask, key_padding_mask,
                   need_weights: bool, average: bool) -> tuple[torch.fx.Node, torch.fx.Node | None]:
        e = self.e
        if mha.bias_k is not None or mha.add_zero_attn:
            raise _Skip("add_bias_kv / add_zero_attn are not decomposed")
        if self.rank != 3:
            raise _Skip("the input is unbatched or its shape is unknown (compile with example_inputs)")
        heads, head_dim = mha.num_heads, mha.head_dim
        bias = _mha_bias(e, heads, attn_mask, key_padding_mask)
        split = (1, 2, 0, 3)  # (L, B, H, D) -> (B, H, L, D)

        def project(name, linear, x):
            h = e.method("unflatten", e.module(f"{path}{name}", linear, x), -1, (heads, head_dim))
            return e.method("transpose", h, 1, 2) if mha.batch_first else e.method("permute", h, *split)

        q_proj, k_proj, v_proj = _projections(mha)
        q, k, v = project("q_proj", q_proj, query), project("k_proj", k_proj, key), project("v_proj", v_proj, value)
        weights = None
        if self.explicit or need_weights:
            context, weights = _attend(e, q, k, v, 1.0 / math.sqrt(head_dim), bias)
            if need_weights and average:
                weights = e.method("mean", weights, 1)
        else:
            context = e.fn(F.scaled_dot_product_attention, q, k, v, attn_mask=bias)
        merged = e.method("transpose", context, 1, 2) if mha.batch_first else e.method("permute", context, 2, 0, 1, 3)
        out = e.module(f"{path}out_proj", mha.out_proj, e.method("flatten", merged, 2))
        self.counts["attention"] += 1
        return out, (weights if need_weights else None)


def _decompose_sdpa(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)`` as explicit ops."""
    a = dict(zip(_SDPA_PARAMS, node.args))
    a.update(node.kwargs)
    if a.get("dropout_p", 0.0) not in (0, 0.0):
        raise _Skip(f"dropout_p={a['dropout_p']} (dropout in the graph)")
    if a.get("enable_gqa", False):
        raise _Skip("enable_gqa=True")
    scale = a.get("scale")
    if scale is None:
        shape = meta.shape_of(a["query"]) if isinstance(a["query"], torch.fx.Node) else None
        if shape is None:
            raise _Skip("the query's head size is unknown: compile with example_inputs")
        scale = 1.0 / math.sqrt(int(shape[-1]))
    mask = a.get("attn_mask")
    dtype = _mask_dtype(mask, "attn_mask")
    e = _Emit(gm, node)
    out, _ = _attend(e, a["query"], a["key"], a["value"], float(scale),
                     bias=mask if mask is not None and dtype != torch.bool else None,
                     keep=mask if dtype == torch.bool else None, causal=bool(a.get("is_causal", False)))
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
