"""The frozen runtime of a lowered int8 graph: ``torch.jit.trace`` + ``torch.jit.freeze``, one per input signature.

A lowered graph (:class:`fxopt.quant.nn.QuantizedModel`) runs through ``torch.fx``'s generated Python: one
``nn.Module.__call__`` per op, each int8 module's ``forward`` in Python around its kernel. On ResNet-sized
models at batch 1 that interpreter cost is most of what separates two flows calling the same kernels.
:class:`FrozenRuntime` records the graph once per input signature with ``torch.jit.trace`` and freezes it
(packed weights and qparams become constants of a TorchScript graph run by the C++ interpreter).

What a trace records is only valid for inputs like the one it saw: Python-level decisions (a oneDNN weight
packed for one input shape, a broadcast ``mul`` path chosen from shapes) become constants. So a trace is kept
per *signature* (shape, dtype, stride of every tensor argument) and a new signature traces again
(:data:`MAX_SIGNATURES` kept, oldest dropped).

Every trace is checked before use: the frozen module's output on the tracing input must equal the eager
graph's output bit for bit (quantized outputs by their integers and qparams) with the same structure. A trace
that fails or differs is not used: that signature runs the eager graph, with a warning saying why
(:attr:`FrozenRuntime.fallbacks`). Calls the tracer cannot take (keyword arguments, non-tensor arguments)
also run eagerly.

The traced copies are a cache, never state: they are not submodules (no ``state_dict`` entries), they are
dropped on ``copy.deepcopy`` / pickling and by :meth:`FrozenRuntime.clear` (``QuantizedModel`` calls it after
``load_state_dict``). The frozen graph computes no gradients.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.fx

__all__ = ["FrozenRuntime", "MAX_SIGNATURES", "same_output"]

logger = logging.getLogger(__name__)

MAX_SIGNATURES = 8  # input signatures a runtime keeps a frozen trace for
_CHECK_RUNS = 3  # frozen runs compared with the eager output at each trace (profiling run, then optimized plan)


def _signature(args: tuple) -> tuple | None:
    """The cache key of positional ``args``; ``None`` when the tracer cannot take them (a non-tensor argument)."""
    key = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            return None
        key.append((tuple(a.shape), a.dtype, a.stride(), a.is_quantized))
    return tuple(key)


def same_output(a: Any, b: Any) -> bool:
    """``a`` and ``b`` have the same structure and bit-identical tensors (quantized: integers and qparams)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape or a.is_quantized != b.is_quantized:
            return False
        if a.is_quantized:
            if a.qscheme() != b.qscheme():
                return False
            if a.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                if a.q_scale() != b.q_scale() or a.q_zero_point() != b.q_zero_point():
                    return False
            return torch.equal(a.int_repr(), b.int_repr())
        return torch.equal(a, b) or (a.is_floating_point() and bool(torch.equal(a.isnan(), b.isnan()))
                                     and torch.equal(a.nan_to_num(), b.nan_to_num()))
    if type(a) is not type(b):  # a namedtuple the trace turned into a tuple is a different structure
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_output(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_output(a[k], b[k]) for k in a)
    return a == b


class FrozenRuntime:
    """Frozen TorchScript traces of ``graph_module``, one per input signature, with an eager fallback.

    ``run(args, kwargs, eager)`` calls the frozen trace for ``args``' signature (tracing it on first sight) and
    ``eager(*args, **kwargs)`` where there is none. The caller sets the quantized engine and grad mode around
    the call; traces are made under ``torch.no_grad()``.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, quiet: bool = False) -> None:
        self.graph_module = graph_module
        self.quiet = quiet  # fallbacks are logged (INFO), not warned: the frozen runtime was a default, not asked for
        self._traces: OrderedDict[tuple, torch.jit.ScriptModule | None] = OrderedDict()
        self.fallbacks: dict[tuple | str, str] = {}  # signature (or kind of call) -> why it runs eagerly

    def clear(self) -> None:
        """Forget every trace (after the graph's weights changed): the next call traces again."""
        self._traces.clear()
        self.fallbacks.clear()

    @property
    def traces(self) -> dict[tuple, torch.jit.ScriptModule]:
        """The frozen traces in use, by input signature."""
        return {k: v for k, v in self._traces.items() if v is not None}

    @property
    def signatures(self) -> list[tuple]:
        """The input signatures that have a frozen trace in use."""
        return list(self.traces)

    def run(self, args: tuple, kwargs: dict, eager: Callable[..., Any]) -> Any:
        key = _signature(args) if not kwargs else None
        if key is None:
            self._note_eager("call", "keyword or non-tensor arguments: the TorchScript trace takes positional "
                                     "tensors only; such calls run the eager graph")
            return eager(*args, **kwargs)
        if key in self._traces:
            self._traces.move_to_end(key)
            frozen = self._traces[key]
            return eager(*args) if frozen is None else frozen(*args)
        frozen, out = self._trace(args, key, eager)
        if len(self._traces) >= MAX_SIGNATURES:
            self._traces.popitem(last=False)
        self._traces[key] = frozen
        return out

    def _trace(self, args: tuple, key: tuple, eager: Callable[..., Any]) -> tuple[Any, Any]:
        """``(frozen module or None, this call's output)``: the eager output is returned either way."""
        with torch.no_grad():
            reference = eager(*args)
            try:
                with warnings.catch_warnings():
                    # shape-dependent Python branches (exactly why traces are per signature), and torch 2.14's
                    # deprecation notices of torch.jit (README: why freeze is opt-in)
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
                    traced = torch.jit.trace(self.graph_module, args, check_trace=False, strict=False)
                    frozen = torch.jit.freeze(traced.eval())
                # TorchScript's executor profiles the first run(s) and optimizes the graph after: check runs
                # of both plans
                runs = [frozen(*args) for _ in range(_CHECK_RUNS)]
            except Exception as exc:  # noqa: BLE001 - any tracer/freeze failure means: run eagerly
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                self._note_eager(key, f"tracing failed ({reason})")
                return None, reference
            if not all(same_output(got, reference) for got in runs):
                self._note_eager(key, "the frozen trace's output differs from the eager graph's")
                return None, reference
        logger.debug("froze %s for input signature %s", type(self.graph_module).__name__, key)
        return frozen, reference

    def _note_eager(self, key: tuple | str, reason: str) -> None:
        if key in self.fallbacks:
            return
        self.fallbacks[key] = reason
        what = "this call" if isinstance(key, str) else f"input shapes {[k[0] for k in key]}"
        message = f"fxopt frozen int8 runtime: {what} runs the eager int8 graph: {reason}"
        if self.quiet:
            logger.info(message)
            return
        warnings.warn(message, UserWarning, stacklevel=4)
        logger.warning(message)

    # a cache, not state: copies and pickles start empty and trace again on their first call
    def __deepcopy__(self, memo: dict) -> "FrozenRuntime":
        return FrozenRuntime(copy.deepcopy(self.graph_module, memo), self.quiet)

    def __getstate__(self) -> dict:
        return {"graph_module": self.graph_module, "quiet": self.quiet}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["graph_module"], state.get("quiet", False))
