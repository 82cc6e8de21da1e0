"""Tracing a model to a torch.fx GraphModule (placeholder: symbolic only; auto/export come next)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx

from . import meta
from .errors import TraceError

__all__ = ["trace", "untraced"]


def trace(model: torch.nn.Module, example_inputs: Any = None, *, leaf_modules: Sequence = (), mode: str = "auto"):
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise TraceError(str(exc)) from exc
    return gm


def untraced(gm: torch.nn.Module) -> list[str]:
    return [info.qualname for info in meta.leaves(gm)]
