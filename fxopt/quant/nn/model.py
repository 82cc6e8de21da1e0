"""The wrapper a lowered int8 graph runs in: it switches PyTorch's quantized engine for each call."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn

from .engine import engine_scope

__all__ = ["QuantizedModel"]


class QuantizedModel(nn.Module):
    """A lowered int8 graph that runs under its engine, whatever the global engine is.

    ``forward`` switches ``torch.backends.quantized.engine`` to ``engine`` for the call and restores it.
    The engine is process-wide in PyTorch: do not run models for *different* engines concurrently from
    several threads (same-engine concurrency is fine: nothing is switched then).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, engine: str) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.engine = engine
        self.meta = graph_module.meta  # fxopt.meta accessors (backend_of, float_islands, records) read this

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def code(self) -> str:
        return self.graph_module.code

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.backends.quantized.engine == self.engine:
            return self.graph_module(*args, **kwargs)
        with engine_scope(self.engine):
            return self.graph_module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"engine={self.engine!r}"
