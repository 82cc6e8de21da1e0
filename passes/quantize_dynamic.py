"""``quantize-dynamic``: int8 (or fp16) weights ahead of time, activations quantized on the fly.

The pass walks the **module tree** of the GraphModule, not only its ``call_module`` nodes, so modules
inside leaves the tracer kept opaque (float islands) are quantized too. Each module is replaced by
qualified name (every alias of a shared module gets the same replacement):

* ``nn.Linear`` → :class:`~fxopt.quant.dynamic.DynamicLinear` (per-channel int8, ``linear_dynamic``);
* ``nn.LSTM`` / ``nn.GRU`` → :class:`~fxopt.quant.dynamic_rnn.DynamicLSTM` / ``DynamicGRU`` (per gate row
  int8; the first layer's input projection in fp16 unless ``rnn_first_input_fp16=False``);
* ``nn.Embedding`` / ``nn.EmbeddingBag`` → 8-bit weight-only rows (per-row scale and offset);
* with ``nn.Linear`` in ``types``: ``nn.MultiheadAttention`` → ``DynamicMultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` → ``DynamicTransformerEncoderLayer`` (their projections are Linear
  layers in all but name; the encoder's nested-tensor fast path is switched off).

``dtype=torch.float16`` stores fp16 weights instead (``linear_dynamic_fp16``, fp16 RNN cells).
``skip`` holds qualified-name patterns (``fnmatch``, e.g. ``"encoder.layers.5.*"``) of modules to keep
float: the few most sensitive layers of a model, found with ``fxopt.compare``.
Stats count replaced modules per type; notes name every module left float and why.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn

from fxopt import Pass, PassResult
from fxopt.errors import UnsupportedError
from fxopt.quant.dynamic import (BAG_MODES, DYNAMIC_DTYPES, DynamicEmbedding, DynamicEmbeddingBag, DynamicLinear,
                                  fp16_linear_available)
from fxopt.quant.dynamic_attention import DynamicMultiheadAttention, DynamicTransformerEncoderLayer
from fxopt.quant.dynamic_rnn import DynamicGRU, DynamicLSTM

from ._util import set_attr_path

__all__ = ["QuantizeDynamic", "DYNAMIC_TYPES"]

logger = logging.getLogger(__name__)

# float type → quantized class; matched on the exact type (a subclass may have its own forward)
_REPLACEMENTS: dict[type, type] = {
    nn.Linear: DynamicLinear,
    nn.LSTM: DynamicLSTM,
    nn.GRU: DynamicGRU,
    nn.Embedding: DynamicEmbedding,
    nn.EmbeddingBag: DynamicEmbeddingBag,
}
# containers whose own code needs the float weights of their Linear layers: replaced whole
_CONTAINERS: dict[type, type] = {
    nn.TransformerEncoderLayer: DynamicTransformerEncoderLayer,
    nn.MultiheadAttention: DynamicMultiheadAttention,
}
DYNAMIC_TYPES = tuple(_REPLACEMENTS)


def _skip_reason(module: nn.Module) -> str | None:
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
    if isinstance(module, nn.TransformerEncoderLayer) and _skip_reason(module.self_attn):
        return _skip_reason(module.self_attn)
    return None


@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """Dynamic quantization of Linear, LSTM, GRU and Embedding(Bag) modules (see module docstring).

    ``reduce_range=None`` picks 7-bit activations only where fbgemm needs them (x86 without VNNI).
    """

    name = "quantize-dynamic"

    dtype: torch.dtype = torch.qint8
    types: tuple = (nn.Linear, nn.LSTM, nn.GRU, nn.Embedding, nn.EmbeddingBag)
    reduce_range: bool | None = None
    rnn_first_input_fp16: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DYNAMIC_DTYPES:
            raise ValueError(f"QuantizeDynamic(dtype={self.dtype}) is not supported; "
                             "use torch.qint8 (int8 weights) or torch.float16 (fp16 weights)")
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        if isinstance(self.types, type):
            object.__setattr__(self, "types", (self.types,))
        unknown = [t for t in self.types if t not in _REPLACEMENTS]
        if unknown:
            names = ", ".join(getattr(t, "__name__", repr(t)) for t in unknown)
            supported = ", ".join(f"nn.{t.__name__}" for t in _REPLACEMENTS)
            raise ValueError(f"QuantizeDynamic cannot quantize {names}; supported types: {supported}")

    def _skipped(self, qualname: str) -> bool:
        return any(fnmatch.fnmatchcase(qualname, pattern) for pattern in self.skip)

    def _factory(self, module: nn.Module, qualname: str = "") -> Callable[[], nn.Module] | None:
        kind = type(module)
        if kind is nn.TransformerEncoderLayer and nn.Linear in self.types:
            keep = frozenset(n for n in ("self_attn", "linear1", "linear2") if self._skipped(f"{qualname}.{n}"))
            return lambda: DynamicTransformerEncoderLayer.from_float(module, self.dtype, self.reduce_range, keep)
        if kind in _CONTAINERS and nn.Linear in self.types:
            return lambda: _CONTAINERS[kind].from_float(module, self.dtype, self.reduce_range)
        if kind in _REPLACEMENTS and kind in self.types:
            if kind in (nn.LSTM, nn.GRU):
                return lambda: _REPLACEMENTS[kind].from_float(
                    module, self.dtype, self.reduce_range, self.rnn_first_input_fp16)
            return lambda: _REPLACEMENTS[kind].from_float(module, self.dtype, self.reduce_range)
        return None

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if self.dtype == torch.float16 and not fp16_linear_available():
            raise UnsupportedError(
                "QuantizeDynamic(dtype=torch.float16) needs fp16 linear kernels, which the "
                f"{torch.backends.quantized.engine!r} engine lacks; use dtype=torch.qint8 or set "
                "torch.backends.quantized.engine = 'x86'")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        stats: dict[str, Any] = {}
        notes: list[str] = []
        replaced: dict[int, nn.Module] = {}  # id(float module) → its replacement (shared modules)
        plan: list[tuple[str, nn.Module]] = []
        skipped_prefixes: list[str] = []
        for qualname, module in gm.named_modules(remove_duplicate=False):
            if not qualname or any(qualname.startswith(p + ".") for p in skipped_prefixes):
                continue
            factory = self._factory(module, qualname)
            if factory is None:
                continue
            reason = _skip_reason(module)
            if self._skipped(qualname):
                reason = "kept float by skip=" + repr(self.skip)
            if reason is not None:
                notes.append(f"{qualname} ({type(module).__name__}) left float: {reason}")
                skipped_prefixes.append(qualname)  # with everything inside it
                continue
            if type(module) is nn.TransformerEncoderLayer:
                notes += [f"{qualname}.{n} left float: kept float by skip={self.skip!r}"
                          for n in ("self_attn", "linear1", "linear2") if self._skipped(f"{qualname}.{n}")]
            if id(module) not in replaced:
                replaced[id(module)] = factory()
                key = type(module).__name__
                stats[key] = stats.get(key, 0) + 1
            plan.append((qualname, replaced[id(module)]))
            skipped_prefixes.append(qualname)  # its children are covered by the replacement
        for qualname, new in plan:
            set_attr_path(gm, qualname, new)
        encoders = [m for m in gm.modules() if isinstance(m, nn.TransformerEncoder)
                    and any(isinstance(layer, DynamicTransformerEncoderLayer) for layer in m.layers)]
        for encoder in encoders:
            encoder.use_nested_tensor = False  # its fused fast path needs the float weights
        if any(isinstance(m, (DynamicLSTM, DynamicGRU)) for m in replaced.values()) and \
                self.rnn_first_input_fp16 and self.dtype == torch.qint8 and fp16_linear_available():
            notes.append("RNN first-layer input projections are stored in fp16 (the most sensitive matrix); "
                         "pass rnn_first_input_fp16=False for int8 everywhere")
        if plan:
            gm.recompile()
        logger.debug("quantize-dynamic: %s", stats)
        return PassResult(gm, bool(plan), stats, notes)
