"""``quantize-dynamic``: int8 (or fp16) weights ahead of time, activations quantized on the fly.

The pass walks the **module tree** of the GraphModule, not only its ``call_module`` nodes, so modules
inside leaves the tracer kept opaque (float islands) are quantized too. Each module is replaced by
qualified name (every alias of a shared module gets the same replacement):

* ``nn.Linear`` → :class:`~fxopt.quant.nn.DynamicLinear` (per-channel int8, ``linear_dynamic``), and so
  does transformers' ``Conv1D`` (GPT-2's Linear with a transposed weight) when ``nn.Linear`` is in ``types``;
* ``nn.LSTM`` / ``nn.GRU`` → :class:`~fxopt.quant.nn.DynamicLSTM` / ``DynamicGRU`` (per gate row
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

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn

from fxopt import Pass, PassResult, meta, registry
from fxopt.pass_base import PassContext
from fxopt.errors import CalibrationError, UnsupportedError
from fxopt.graph_utils import set_attr_path
from fxopt.quant.nn.dynamic import DYNAMIC_DTYPES, fp16_linear_available
from fxopt.quant.nn.dynamic_attention import DynamicTransformerEncoderLayer
from fxopt.quant.nn.dynamic_rnn import DynamicGRU, DynamicLSTM
from fxopt.quant.nn.swap import ENCODER_LAYER_PARTS, REPLACEMENTS, dynamic_factory, skip_reason
from fxopt.quant.sensitivity import SwapUnit, keep_float_for_cosine, mean_cosine, run_batches

from .calibrate import as_call

__all__ = ["QuantizeDynamic", "QuantizeIslands", "DYNAMIC_TYPES"]

logger = logging.getLogger(__name__)

DYNAMIC_TYPES = tuple(REPLACEMENTS)


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
        unknown = [t for t in self.types if t not in REPLACEMENTS]
        if unknown:
            names = ", ".join(getattr(t, "__name__", repr(t)) for t in unknown)
            supported = ", ".join(f"nn.{t.__name__}" for t in REPLACEMENTS)
            raise ValueError(f"QuantizeDynamic cannot quantize {names}; supported types: {supported}")

    def _skipped(self, qualname: str, keep: frozenset[str] = frozenset()) -> bool:
        return qualname in keep or any(fnmatch.fnmatchcase(qualname, pattern) for pattern in self.skip)

    def _factory(self, module: nn.Module, qualname: str,
                 keep: frozenset[str] = frozenset()) -> Callable[[], nn.Module] | None:
        parts = frozenset(n for n in ENCODER_LAYER_PARTS if self._skipped(f"{qualname}.{n}", keep))
        return dynamic_factory(module, dtype=self.dtype, reduce_range=self.reduce_range, types=self.types,
                               rnn_first_input_fp16=self.rnn_first_input_fp16, keep_parts=parts)

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
        reference = run_batches(gm, batches)
        plan, stats, notes = self._apply(gm)
        if not plan:
            return PassResult(gm, False, stats, notes)
        before = mean_cosine(run_batches(gm, batches), reference)
        kept: list[str] = []
        after = before
        if self.min_cosine is not None and before < self.min_cosine:
            kept, after = keep_float_for_cosine(gm, _units(plan), batches, reference, min_cosine=self.min_cosine,
                                                max_float_fraction=self.max_float_fraction, before=before)
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

    def _scope(self, gm: torch.fx.GraphModule) -> tuple[str, ...] | None:
        """Module paths whose subtrees the pass may quantize; ``None``: the whole module tree."""
        return None

    def _apply(self, gm: torch.fx.GraphModule, keep: frozenset[str] = frozenset(),
               ) -> tuple[list[tuple[str, nn.Module, nn.Module]], dict[str, Any], list[str]]:
        """Replace every quantizable module in place; ``plan`` lists (qualified name, float, replacement)."""
        stats: dict[str, Any] = {}
        notes: list[str] = []
        replaced: dict[int, nn.Module] = {}  # id(float module) → its replacement (shared modules)
        plan: list[tuple[str, nn.Module, nn.Module]] = []
        skipped_prefixes: list[str] = []
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr" and isinstance(n.target, str)}
        scope = self._scope(gm)
        for qualname, module in gm.named_modules(remove_duplicate=False):
            if not qualname or any(qualname.startswith(p + ".") for p in skipped_prefixes):
                continue
            if scope is not None and not any(qualname == p or qualname.startswith(p + ".") for p in scope):
                continue
            factory = self._factory(module, qualname, keep)
            if factory is None:
                continue
            reason = skip_reason(module)
            if self._skipped(qualname):
                reason = "kept float by skip=" + repr(self.skip)
            elif qualname in keep:
                reason = f"kept float by min_cosine={self.min_cosine}"
            elif any(t.startswith(qualname + ".") for t in read):  # e.g. a module torch.fx traced through
                reason = "the graph reads its weights directly (its code was traced, not called as a module)"
            if reason is not None:
                notes.append(f"{qualname} ({type(module).__name__}) left float: {reason}")
                skipped_prefixes.append(qualname)  # with everything inside it
                continue
            if type(module) is nn.TransformerEncoderLayer:
                for n in ENCODER_LAYER_PARTS:
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


def _units(plan: list[tuple[str, nn.Module, nn.Module]]) -> list[SwapUnit]:
    by_replacement: dict[int, list[tuple[str, nn.Module, nn.Module]]] = {}
    for entry in plan:
        by_replacement.setdefault(id(entry[2]), []).append(entry)
    units = []
    for entries in by_replacement.values():
        name, old, new = entries[0]
        if isinstance(new, DynamicTransformerEncoderLayer):
            for part in ENCODER_LAYER_PARTS:
                if getattr(new, part) is not getattr(old, part):  # not already float (skip=)
                    units.append(SwapUnit(f"{name}.{part}", [f"{q}.{part}" for q, _, _ in entries],
                                       getattr(old, part), getattr(new, part)))
        else:
            units.append(SwapUnit(name, [q for q, _, _ in entries], old, new))
    return units


# backends that run the lowered graph's modules in PyTorch (by registry name: "fbgemm" resolves to "x86"); the
# export backends cannot carry a dynamic int8 module inside an island (and an island does not export anyway)
_MODULE_BACKENDS = frozenset({"x86", "qnnpack", "reference"})


@dataclass(frozen=True)
class QuantizeIslands(QuantizeDynamic):
    """``quantize-islands``: dynamic int8 for the Linear layers inside the graph's float islands.

    Static int8 reaches only what the tracer traced. A module it kept as an opaque call (``fxopt.untraced``:
    Faster R-CNN's ``rpn`` and ``roi_heads``, whose RoI box head is most of the detector's arithmetic) keeps
    float Linear layers; this pass gives them int8 weights with activations quantized on the fly
    (:class:`QuantizeDynamic` restricted to the islands' subtrees; an untraced root is left alone). It runs for
    the backends that execute PyTorch modules (x86, fbgemm, qnnpack, reference); for an export backend it
    changes nothing and says so. ``recipes.static_int8(..., islands="dynamic")`` (the default) adds it.
    """

    name = "quantize-islands"

    types: tuple = (nn.Linear,)
    # None: the backend the pipeline targets (compile/lower's ``backend``), x86 when none is named
    backend: Any = None

    def with_context(self, context: PassContext) -> "QuantizeIslands":
        return context.resolve(self, "recipes.static_int8 and QuantizeIslands(backend=None)")

    def _scope(self, gm: torch.fx.GraphModule) -> tuple[str, ...]:
        return tuple(info.attribute or info.qualname for info in meta.leaves(gm) if info.qualname)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        backend = registry.get(self.backend if self.backend is not None else PassContext.DEFAULT_BACKEND).name
        if not self._scope(gm):
            return PassResult(gm, False, {}, [])
        if backend not in _MODULE_BACKENDS:
            return PassResult(gm, False, {}, [f"float islands stay float: the {backend} backend exports the graph "
                                              f"and cannot carry dynamic int8 modules"])
        result = super().call(gm)
        return dataclasses.replace(result, intended_change=result.modified)

