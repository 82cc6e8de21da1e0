"""``quantize-dynamic``: int8 (or fp16) weights ahead of time, activations quantized on the fly.

The pass walks the **module tree** of the GraphModule, not only its ``call_module`` nodes, so modules
inside leaves the tracer kept opaque (float islands) are quantized too. Each module is replaced by
qualified name (every alias of a shared module gets the same replacement):

* ``nn.Linear`` → :class:`~fxopt.quant.dynamic.DynamicLinear` (per-channel int8, ``linear_dynamic``), and so
  does transformers' ``Conv1D`` (GPT-2's Linear with a transposed weight) when ``nn.Linear`` is in ``types``;
* ``nn.LSTM`` / ``nn.GRU`` → :class:`~fxopt.quant.dynamic_rnn.DynamicLSTM` / ``DynamicGRU`` (per gate row
  int8; the first layer's input projection in fp16 unless ``rnn_first_input_fp16=False``);
* ``nn.Embedding`` / ``nn.EmbeddingBag`` → 8-bit weight-only rows (per-row scale and offset);
* with ``nn.Linear`` in ``types``: ``nn.MultiheadAttention`` → ``DynamicMultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` → ``DynamicTransformerEncoderLayer`` (their projections are Linear
  layers in all but name; the encoder's nested-tensor fast path is switched off).

``dtype=torch.float16`` stores fp16 weights instead (``linear_dynamic_fp16``, fp16 RNN cells).
``skip`` holds qualified-name patterns (``fnmatch``, e.g. ``"encoder.layers.5.*"``) of modules to keep
float: the few most sensitive layers of a model, found with ``fxopt.compare``.

``min_cosine`` finds them automatically: with ``calibration`` data (an iterable of batches, like
:class:`~fxopt.passes.Calibrate`), the pass compares the quantized outputs with the float ones (mean cosine
per sample); below the target it measures each module's damage quantized *alone* (every other module
float: free of the others' error) and keeps float the most damaging ones, fewest first, until the target
holds or ``max_float_fraction`` of the modules (encoder layers count as self_attn, linear1, linear2) is
float. Giving ``calibration`` alone only measures the cosine.
Stats count replaced modules per type (plus ``cosine_quantized``, ``cosine`` and ``kept_float`` with
calibration data); notes name every module left float and why.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn

from fxopt import Pass, PassResult
from fxopt.errors import CalibrationError, UnsupportedError
from fxopt.export_frontend import is_conv1d
from fxopt.quant.dynamic import (BAG_MODES, DYNAMIC_DTYPES, DynamicEmbedding, DynamicEmbeddingBag, DynamicLinear,
                                  fp16_linear_available)
from fxopt.quant.dynamic_attention import DynamicMultiheadAttention, DynamicTransformerEncoderLayer
from fxopt.quant.dynamic_rnn import DynamicGRU, DynamicLSTM

from ._util import set_attr_path
from .calibrate import as_call

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
_LAYER_PARTS = ("self_attn", "linear1", "linear2")  # what DynamicTransformerEncoderLayer can keep float


def _conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what transformers' ``Conv1D`` does (its weight is ``(in, out)``)."""
    linear = nn.Linear(module.nx, module.nf, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


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
    module_level = True  # walks the module tree; runs on an untraced root too

    dtype: torch.dtype = torch.qint8
    types: tuple = (nn.Linear, nn.LSTM, nn.GRU, nn.Embedding, nn.EmbeddingBag)
    reduce_range: bool | None = None
    rnn_first_input_fp16: bool = True
    skip: tuple[str, ...] = ()
    calibration: Any = field(default=None, compare=False, repr=False)
    min_cosine: float | None = None
    max_float_fraction: float = 0.4

    def __post_init__(self) -> None:
        if self.min_cosine is not None:
            if not 0.0 < self.min_cosine <= 1.0:
                raise ValueError(f"QuantizeDynamic(min_cosine={self.min_cosine}) must be in (0, 1], e.g. 0.99")
            if self.calibration is None:
                raise CalibrationError(
                    f"QuantizeDynamic(min_cosine={self.min_cosine}) needs calibration data to measure the cosine: "
                    "pass calibration= an iterable of input batches (Tensor, tuple of inputs or dict of keywords)")
        if not 0.0 <= self.max_float_fraction <= 1.0:
            raise ValueError(f"QuantizeDynamic(max_float_fraction={self.max_float_fraction}) must be in [0, 1]")
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

    def _skipped(self, qualname: str, keep: frozenset[str] = frozenset()) -> bool:
        return qualname in keep or any(fnmatch.fnmatchcase(qualname, pattern) for pattern in self.skip)

    def _factory(self, module: nn.Module, qualname: str = "",
                 keep: frozenset[str] = frozenset()) -> Callable[[], nn.Module] | None:
        kind = type(module)
        if kind is nn.TransformerEncoderLayer and nn.Linear in self.types:
            keep = frozenset(n for n in _LAYER_PARTS if self._skipped(f"{qualname}.{n}", keep))
            return lambda: DynamicTransformerEncoderLayer.from_float(module, self.dtype, self.reduce_range, keep)
        if kind in _CONTAINERS and nn.Linear in self.types:
            return lambda: _CONTAINERS[kind].from_float(module, self.dtype, self.reduce_range)
        if is_conv1d(module) and nn.Linear in self.types:  # transformers' Conv1D: a Linear, weight transposed
            return lambda: DynamicLinear.from_float(_conv1d_as_linear(module), self.dtype, self.reduce_range)
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
        if self.calibration is None:
            plan, stats, notes = self._apply(gm)
            return PassResult(gm, bool(plan), stats, notes)
        batches = [as_call(item, i) for i, item in enumerate(self.calibration)]
        if not batches:
            raise CalibrationError("QuantizeDynamic got empty calibration data: give at least one input batch")
        reference = _run(gm, batches)
        plan, stats, notes = self._apply(gm)
        if not plan:
            return PassResult(gm, False, stats, notes)
        before = _mean_cosine(_run(gm, batches), reference)
        kept: list[str] = []
        after = before
        if self.min_cosine is not None and before < self.min_cosine:
            kept, after = self._fallback(gm, plan, batches, reference, before)
            if kept:  # undo, then quantize again with the chosen modules kept float: stats and notes stay exact
                self._undo(gm, plan)
                plan, stats, notes = self._apply(gm, frozenset(kept))
        stats.update(cosine_quantized=round(before, 5), cosine=round(after, 5), kept_float=kept)
        if kept:
            notes.append(f"kept float: {', '.join(kept)} (cosine {before:.4f} -> {after:.4f})")
        if self.min_cosine is not None and after < self.min_cosine:
            notes.append(f"min_cosine={self.min_cosine} not reached: cosine {before:.4f} -> {after:.4f} with "
                         f"{len(kept)} module(s) kept float (max_float_fraction={self.max_float_fraction}); "
                         "raise max_float_fraction, add calibration data or use fp16 weights")
        return PassResult(gm, bool(plan), stats, notes)

    def _fallback(self, gm, plan, batches, reference, before) -> tuple[list[str], float]:
        """Keep float the modules that hurt most alone until ``min_cosine`` holds or the cap is reached."""
        units = _units(plan)
        cap = int(self.max_float_fraction * len(units))
        if cap == 0:
            return [], before
        for unit in units:
            unit.install(gm, quantized=False)
        damage = {}
        for unit in units:  # each module quantized alone: its own damage, free of the others' noise
            unit.install(gm, quantized=True)
            damage[unit.name] = 1.0 - _mean_cosine(_run(gm, batches), reference)
            unit.install(gm, quantized=False)
        order = sorted(units, key=lambda u: -damage[u.name])
        logger.debug("quantize-dynamic sensitivity: %s", {u.name: round(damage[u.name], 5) for u in order})
        for unit in order[cap:]:
            unit.install(gm, quantized=True)
        for unit in reversed(order[:cap]):  # least sensitive first: stop as soon as the target holds
            unit.install(gm, quantized=True)
            if _mean_cosine(_run(gm, batches), reference) < self.min_cosine:
                unit.install(gm, quantized=False)
                break
        kept = [u.name for u in order[:cap] if not u.quantized]
        return kept, _mean_cosine(_run(gm, batches), reference)

    def _apply(self, gm: torch.fx.GraphModule, keep: frozenset[str] = frozenset(),
               ) -> tuple[list[tuple[str, nn.Module, nn.Module]], dict[str, Any], list[str]]:
        """Replace every quantizable module in place; ``plan`` lists (qualified name, float, replacement)."""
        stats: dict[str, Any] = {}
        notes: list[str] = []
        replaced: dict[int, nn.Module] = {}  # id(float module) → its replacement (shared modules)
        plan: list[tuple[str, nn.Module, nn.Module]] = []
        skipped_prefixes: list[str] = []
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr" and isinstance(n.target, str)}
        for qualname, module in gm.named_modules(remove_duplicate=False):
            if not qualname or any(qualname.startswith(p + ".") for p in skipped_prefixes):
                continue
            factory = self._factory(module, qualname, keep)
            if factory is None:
                continue
            reason = _skip_reason(module)
            if self._skipped(qualname):
                reason = "kept float by skip=" + repr(self.skip)
            elif qualname in keep:
                reason = f"kept float by min_cosine={self.min_cosine}"
            elif any(t.startswith(qualname + ".") for t in read):  # e.g. a Conv1D torch.fx traced through
                reason = "the graph reads its weights directly (its code was traced, not called as a module)"
            if reason is not None:
                notes.append(f"{qualname} ({type(module).__name__}) left float: {reason}")
                skipped_prefixes.append(qualname)  # with everything inside it
                continue
            if type(module) is nn.TransformerEncoderLayer:
                for n in _LAYER_PARTS:
                    if self._skipped(f"{qualname}.{n}"):
                        notes.append(f"{qualname}.{n} left float: kept float by skip={self.skip!r}")
                    elif f"{qualname}.{n}" in keep:
                        notes.append(f"{qualname}.{n} left float: kept float by min_cosine={self.min_cosine}")
            if id(module) not in replaced:
                replaced[id(module)] = factory()
                key = type(module).__name__
                stats[key] = stats.get(key, 0) + 1
            plan.append((qualname, module, replaced[id(module)]))
            skipped_prefixes.append(qualname)  # its children are covered by the replacement
        for qualname, _, new in plan:
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
        return plan, stats, notes

    @staticmethod
    def _undo(gm: torch.fx.GraphModule, plan: list[tuple[str, nn.Module, nn.Module]]) -> None:
        """Put the float modules back (the float modules themselves were never changed)."""
        for qualname, old, _ in reversed(plan):
            set_attr_path(gm, qualname, old)


@dataclass
class _Unit:
    """One module the fallback may keep float, under all its names (a layer's part for encoder layers)."""

    name: str
    paths: list[str]
    float_module: nn.Module
    quantized_module: nn.Module
    quantized: bool = True

    def install(self, gm: torch.fx.GraphModule, quantized: bool) -> None:
        for path in self.paths:
            set_attr_path(gm, path, self.quantized_module if quantized else self.float_module)
        self.quantized = quantized


def _units(plan: list[tuple[str, nn.Module, nn.Module]]) -> list[_Unit]:
    by_replacement: dict[int, list[tuple[str, nn.Module, nn.Module]]] = {}
    for entry in plan:
        by_replacement.setdefault(id(entry[2]), []).append(entry)
    units = []
    for entries in by_replacement.values():
        name, old, new = entries[0]
        if isinstance(new, DynamicTransformerEncoderLayer):
            for part in _LAYER_PARTS:
                if getattr(new, part) is not getattr(old, part):  # not already float (skip=)
                    units.append(_Unit(f"{name}.{part}", [f"{q}.{part}" for q, _, _ in entries],
                                       getattr(old, part), getattr(new, part)))
        else:
            units.append(_Unit(name, [q for q, _, _ in entries], old, new))
    return units


def _run(gm: torch.fx.GraphModule, batches: list[tuple[tuple, dict]]) -> list[Any]:
    was_training = gm.training
    gm.eval()
    outputs = []
    try:
        with torch.inference_mode():
            for index, (args, kwargs) in enumerate(batches):
                try:
                    outputs.append(gm(*args, **kwargs))
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                    raise CalibrationError(
                        f"calibration batch {index} (input shapes {shapes}) does not fit the model: "
                        f"{type(exc).__name__}: {exc}. Give batches shaped like the model's inputs.") from exc
    finally:
        gm.train(was_training)
    return outputs


def _mean_cosine(outputs: list[Any], reference: list[Any]) -> float:
    """Mean cosine over samples (each floating output flattened per sample), all batches together."""
    cosines = []
    for out, ref in zip(outputs, reference):
        for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
            if not (isinstance(b, torch.Tensor) and b.is_floating_point()):
                continue
            if not torch.isfinite(b).all():
                raise CalibrationError("the float model gives NaN or inf on the calibration data; clean the data")
            rows = b.shape[0] if b.dim() > 1 else 1
            a, b = a.float().reshape(rows, -1), b.float().reshape(rows, -1)
            cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
            both_zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
            cosines.append(torch.where(both_zero, torch.ones_like(cos), cos))
    if not cosines:
        raise CalibrationError("QuantizeDynamic(min_cosine=...) needs floating-point model outputs to compare")
    return torch.cat(cosines).mean().item()
