"""The wrapper a lowered int8 graph runs in: it switches PyTorch's quantized engine for each call, and with
``freeze=True`` runs a frozen TorchScript trace of the graph (:mod:`fxopt.quant.nn.frozen`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn

from .engine import engine_scope
from .frozen import FrozenRuntime

__all__ = ["FREEZE_MODES", "QuantizedModel", "freeze_mode"]


class QuantizedModel(nn.Module):
    """A lowered int8 graph that runs under its engine, whatever the global engine is.

    ``forward`` switches ``torch.backends.quantized.engine`` to ``engine`` for the call and restores it.
    The engine is process-wide in PyTorch: do not run models for *different* engines concurrently from
    several threads (same-engine concurrency is fine: nothing is switched then).

    ``freeze=True`` (or ``"auto"``) runs a ``torch.jit.trace`` + ``torch.jit.freeze`` copy of ``graph_module`` per input
    signature instead of the fx graph's Python (same kernels, same outputs bit for bit, checked at each trace;
    see :mod:`fxopt.quant.nn.frozen`). ``graph_module`` stays the model: ``fxopt.report``, ``fxopt.meta``,
    ``state_dict`` and ``fxopt.save`` read it; the traces are a cache (``load_state_dict`` and
    :meth:`refreeze` drop it). ``frozen_signatures`` / ``freeze_fallbacks`` say what runs frozen and what
    runs eagerly, and why. With ``freeze=True`` a fallback to the eager graph warns once per input signature;
    with ``"auto"`` (the x86 backend's default) it is logged at INFO level only.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, engine: str, freeze: bool | str = False) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.engine = engine
        self.meta = graph_module.meta  # fxopt.meta accessors (backend_of, float_islands, records) read this
        freeze = freeze_mode(freeze)
        self._frozen = FrozenRuntime(graph_module, quiet=freeze == "auto") if freeze else None
        self.register_load_state_dict_post_hook(_drop_traces)

    @property
    def freeze(self) -> bool | str:
        """``False`` (eager fx graph), ``True`` (frozen, fallbacks warn) or ``"auto"`` (frozen, fallbacks logged)."""
        if self._frozen is None:
            return False
        return "auto" if self._frozen.quiet else True

    @property
    def frozen_signatures(self) -> list[tuple]:
        """Input signatures ``(shape, dtype, stride, quantized)`` per argument that run a frozen trace."""
        return [] if self._frozen is None else self._frozen.signatures

    @property
    def frozen_traces(self) -> dict[tuple, torch.jit.ScriptModule]:
        """The frozen TorchScript modules in use, by input signature (empty until the first call)."""
        return {} if self._frozen is None else self._frozen.traces

    @property
    def freeze_fallbacks(self) -> dict:
        """Input signatures (or ``"call"``) that run the eager graph under ``freeze=True``, with the reason."""
        return {} if self._frozen is None else dict(self._frozen.fallbacks)

    def refreeze(self) -> None:
        """Drop the frozen traces (after changing the graph's weights in place): the next calls trace again."""
        if self._frozen is not None:
            self._frozen.clear()

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def code(self) -> str:
        return self.graph_module.code

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.backends.quantized.engine == self.engine:
            return self._call(args, kwargs)
        with engine_scope(self.engine):
            return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        if self._frozen is None or torch.jit.is_tracing() or torch.jit.is_scripting():
            return self.graph_module(*args, **kwargs)
        return self._frozen.run(args, kwargs, self.graph_module)

    def extra_repr(self) -> str:
        return f"engine={self.engine!r}" + (f", freeze={self.freeze!r}" if self.freeze else "")


FREEZE_MODES = (False, True, "auto")


def freeze_mode(freeze: bool | str) -> bool | str:
    """``freeze`` checked: ``False`` (eager graph), ``True`` (frozen, fallbacks warn), ``"auto"`` (frozen, logged)."""
    if freeze in FREEZE_MODES:
        return freeze
    raise ValueError(f"freeze must be True, False or 'auto', got {freeze!r}")


def _drop_traces(module: QuantizedModel, incompatible_keys: Any) -> None:
    module.refreeze()  # new weights: traces hold the old ones as constants
