"""Dynamically quantized modules: int8 (or fp16) weights stored ahead of time, activations quantized on the fly.

Every module here calls PyTorch's own kernels (``torch.ops.quantized.*``) on weights fxopt packs itself:

* :class:`DynamicLinear` — ``linear_dynamic`` with **per-output-channel** symmetric int8 weights (or
  ``linear_dynamic_fp16`` with fp16 weights). The activation is quantized per call, over its own range.
* :class:`DynamicEmbedding` / :class:`DynamicEmbeddingBag` — weight-only: one uint8 code per value with a
  float scale and offset per row (``embedding_bag_byte_prepack`` layout), looked up with
  ``embedding_bag_byte_rowwise_offsets``; fp16 weights are looked up and upcast.

Each module has ``from_float(module, dtype, reduce_range)`` and ``fxopt_weights()`` (its stored weights, for
``fxopt.report``), and survives ``copy.deepcopy`` and pickling (packed weights pickle themselves).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..qstate import dtype_from_name, dtype_name, qtensor_from_state, qtensor_state
from ..spec import QSpec, qparams_from_range
from .base import QuantizedModule
from .int8 import quantize_weight

__all__ = [
    "DYNAMIC_DTYPES",
    "WEIGHT_SPEC",
    "quantize_rows",
    "pack_linear",
    "unpack_linear",
    "pack_stored",
    "needs_reduce_range",
    "fp16_linear_available",
    "DynamicLinear",
    "DynamicEmbedding",
    "DynamicEmbeddingBag",
]

DYNAMIC_DTYPES = (torch.qint8, torch.float16)

# Weights: signed 8 bit, symmetric, one scale per output row (per gate row for RNNs).
WEIGHT_SPEC = QSpec(dtype=torch.qint8, symmetric=True, axis=0)

_q = torch.ops.quantized


def quantize_rows(weight: torch.Tensor, spec: QSpec = WEIGHT_SPEC) -> torch.Tensor:
    """A quantized tensor of ``weight`` (2-D, rows = output channels) over its own range, per ``spec``."""
    w = weight.detach().float()
    if spec.per_channel:
        scale, zp = qparams_from_range(spec, w.amin(dim=1), w.amax(dim=1))
    else:
        scale, zp = qparams_from_range(spec, w.min(), w.max())
    return quantize_weight(w, scale, zp, spec.dtype, per_channel=spec.per_channel)


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.ScriptObject:
    """Packed weights for ``linear_dynamic`` (int8, per channel) or ``linear_dynamic_fp16``."""
    b = None if bias is None else bias.detach().float()
    if dtype == torch.float16:
        return _q.linear_prepack_fp16(weight.detach().float(), b)
    return _q.linear_prepack(quantize_rows(weight), b)


def pack_stored(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """Packed weights from stored ones, as :func:`unpack_linear` gives them: a quantized (int8) weight is packed
    as it is (not quantized again), a float16 one for the fp16 kernel."""
    b = None if bias is None else bias.detach().float()
    if weight.is_quantized:
        return _q.linear_prepack(weight, b)
    if weight.dtype != torch.float16:
        raise TypeError(f"a stored dynamic weight is an int8 quantized or a float16 tensor, got {weight.dtype}")
    return _q.linear_prepack_fp16(weight.float(), b)


def unpack_linear(packed: torch.ScriptObject, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) stored in ``packed``; fp16 weights come back as ``float16`` tensors."""
    if dtype == torch.float16:
        w, b = _q.linear_unpack_fp16(packed)
        return w.to(torch.float16), b
    return _q.linear_unpack(packed)


@functools.lru_cache(maxsize=None)
def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def needs_reduce_range() -> bool:
    """Whether activations must use 7 bits: only fbgemm on an x86 CPU without VNNI.

    Without VNNI fbgemm multiplies uint8 x int8 pairs into saturating 16-bit sums; with VNNI (and on
    qnnpack) the full 8 bits are safe, and twice as fine.
    """
    return torch.backends.quantized.engine in ("x86", "fbgemm") and not _cpu_has_vnni()


def fp16_linear_available() -> bool:
    """Whether the current engine has fp16 linear kernels (``linear_prepack_fp16``): fbgemm/x86 only."""
    return torch.backends.quantized.engine != "qnnpack"


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DYNAMIC_DTYPES:
        raise ValueError(f"dynamic quantization supports dtype torch.qint8 or torch.float16, got {dtype}")


class DynamicLinear(QuantizedModule):
    """``nn.Linear`` with int8 per-channel (or fp16) packed weights; the input is quantized per call."""

    def __init__(self, packed: torch.ScriptObject, in_features: int, out_features: int,
                 dtype: torch.dtype = torch.qint8, reduce_range: bool = False):
        super().__init__()
        _check_dtype(dtype)
        self._packed = packed
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.reduce_range = reduce_range

    @classmethod
    def from_float(cls, module: nn.Linear, dtype: torch.dtype = torch.qint8,
                   reduce_range: bool | None = None) -> "DynamicLinear":
        _check_dtype(dtype)
        rr = needs_reduce_range() if reduce_range is None else reduce_range
        return cls(pack_linear(module.weight, module.bias, dtype), module.in_features, module.out_features, dtype, rr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return self.forward(x.float()).to(x.dtype)
        if self.dtype == torch.float16:
            return _q.linear_dynamic_fp16(x, self._packed)
        return _q.linear_dynamic(x, self._packed, self.reduce_range)

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        w, b = unpack_linear(self._packed, self.dtype)
        return {"weight": w} if b is None else {"weight": w, "bias": b}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"

    def _state_tensors(self) -> dict[str, torch.Tensor | None]:
        return self.fxopt_weights() | {"bias": unpack_linear(self._packed, self.dtype)[1]}

    def _set_state_tensors(self, tensors: dict[str, torch.Tensor | None]) -> None:
        weight = tensors["weight"]
        if weight.is_quantized != (self.dtype == torch.qint8) or tuple(weight.shape) != (self.out_features,
                                                                                        self.in_features):
            raise ValueError(f"weight {weight.dtype} {tuple(weight.shape)} does not fit this {self.dtype} layer of "
                             f"shape {(self.out_features, self.in_features)}")
        self._packed = pack_stored(weight, tensors["bias"])

    # fxopt.save / fxopt.load: the stored weights as plain data; packed again (not re-quantized) on load
    def fxopt_state(self) -> dict:
        w, b = unpack_linear(self._packed, self.dtype)
        weight = w if self.dtype == torch.float16 else qtensor_state(w)
        return {"weight": weight, "bias": b, "in_features": self.in_features, "out_features": self.out_features,
                "dtype": dtype_name(self.dtype), "reduce_range": self.reduce_range}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "DynamicLinear":
        dtype = dtype_from_name(state["dtype"])
        _check_dtype(dtype)
        weight = state["weight"] if dtype == torch.float16 else qtensor_from_state(state["weight"])
        packed = pack_stored(weight, state["bias"])
        return cls(packed, int(state["in_features"]), int(state["out_features"]), dtype,
                   bool(state["reduce_range"]))


def _prepack_rows(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float16:
        return weight.detach().to(torch.float16).clone()
    # uint8 codes per row followed by the row's float32 scale and offset (asymmetric per row)
    return _q.embedding_bag_byte_prepack(weight.detach().float().contiguous())


class _DynamicEmbeddingBase(QuantizedModule):
    def __init__(self, rows: torch.Tensor, num_embeddings: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        _check_dtype(dtype)
        self.register_buffer("packed_weight", rows)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype

    def _bags(self, flat: torch.Tensor, offsets: torch.Tensor, mode: int, per_sample_weights=None,
              include_last_offset: bool = False) -> torch.Tensor:
        return _q.embedding_bag_byte_rowwise_offsets(
            self.packed_weight, flat, offsets, False, mode, False, per_sample_weights, None, include_last_offset)

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        return {"weight": self.packed_weight}

    def fxopt_state(self) -> dict:
        return {"rows": self.packed_weight, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "dtype": dtype_name(self.dtype)}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "_DynamicEmbeddingBase":
        rows = state["rows"]
        if not isinstance(rows, torch.Tensor):
            raise TypeError("embedding rows must be a tensor")
        return cls(rows, int(state["num_embeddings"]), int(state["embedding_dim"]), dtype_from_name(state["dtype"]))

    def extra_repr(self) -> str:
        kind = "fp16" if self.dtype == torch.float16 else "uint8 rows with per-row scale/offset"
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={kind}"


class DynamicEmbedding(_DynamicEmbeddingBase):
    """``nn.Embedding`` with weight-only 8-bit (per-row scale and offset) or fp16 weights."""

    @classmethod
    def from_float(cls, module: nn.Embedding, dtype: torch.dtype = torch.qint8,
                   reduce_range: bool | None = None) -> "DynamicEmbedding":
        _check_dtype(dtype)
        return cls(_prepack_rows(module.weight, dtype), module.num_embeddings, module.embedding_dim, dtype)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float16:
            return F.embedding(indices, self.packed_weight).float()
        flat = indices.reshape(-1)
        offsets = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
        return self._bags(flat, offsets, 0).view(*indices.shape, self.embedding_dim)


BAG_MODES = ("sum", "mean")  # the 8-bit kernel sums; mean divides by the bag sizes


class DynamicEmbeddingBag(_DynamicEmbeddingBase):
    """``nn.EmbeddingBag`` (sum/mean/max) with weight-only 8-bit or fp16 weights."""

    def __init__(self, rows: torch.Tensor, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                 mode: str = "mean", include_last_offset: bool = False):
        super().__init__(rows, num_embeddings, embedding_dim, dtype)
        self.mode = mode
        self.include_last_offset = include_last_offset

    def fxopt_state(self) -> dict:
        return {**super().fxopt_state(), "mode": self.mode, "include_last_offset": self.include_last_offset}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "DynamicEmbeddingBag":
        if state["mode"] not in BAG_MODES:
            raise ValueError(f"EmbeddingBag mode {state['mode']!r} is not one of {BAG_MODES}")
        rows = state["rows"]
        if not isinstance(rows, torch.Tensor):
            raise TypeError("embedding rows must be a tensor")
        return cls(rows, int(state["num_embeddings"]), int(state["embedding_dim"]), dtype_from_name(state["dtype"]),
                   state["mode"], bool(state["include_last_offset"]))

    @classmethod
    def from_float(cls, module: nn.EmbeddingBag, dtype: torch.dtype = torch.qint8,
                   reduce_range: bool | None = None) -> "DynamicEmbeddingBag":
        _check_dtype(dtype)
        if module.mode not in BAG_MODES:
            raise ValueError(f"EmbeddingBag mode={module.mode!r} is not supported; supported: {BAG_MODES}")
        return cls(_prepack_rows(module.weight, dtype), module.num_embeddings, module.embedding_dim, dtype,
                   module.mode, module.include_last_offset)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if indices.dim() == 2:
            if offsets is not None:
                raise ValueError("EmbeddingBag: offsets must be None when indices are 2-D (one bag per row)")
            offsets = torch.arange(0, indices.numel(), indices.shape[1], dtype=indices.dtype, device=indices.device)
            indices = indices.reshape(-1)
        elif offsets is None:
            raise ValueError("EmbeddingBag: 1-D indices need offsets")
        if self.dtype == torch.float16:
            return F.embedding_bag(indices, self.packed_weight.float(), offsets, mode=self.mode,
                                   per_sample_weights=per_sample_weights,
                                   include_last_offset=self.include_last_offset)
        psw = None if per_sample_weights is None else per_sample_weights.float()
        out = self._bags(indices, offsets, 0, psw, self.include_last_offset)
        if self.mode == "mean":
            ends = offsets[1:] if self.include_last_offset else torch.cat(
                [offsets[1:], offsets.new_tensor([indices.numel()])])
            starts = offsets[:-1] if self.include_last_offset else offsets
            out = out / (ends - starts).clamp(min=1).to(out.dtype).unsqueeze(1)
        return out
