"""PyTorch's quantized engine as a scoped setting, and the x86/fbgemm stand-in rule (one place for both)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from fxopt.errors import UnsupportedError

__all__ = ["engine_scope", "local_engine"]


@contextlib.contextmanager
def engine_scope(engine: str | None) -> Iterator[None]:
    """Run a block under ``torch.backends.quantized.engine = engine`` (restored afterwards).

    The engine is a process-wide setting: two threads running modules for different engines at the
    same time race on it.
    """
    previous = torch.backends.quantized.engine
    if engine is None or engine == previous:
        yield
        return
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def local_engine(engine: object) -> str | None:
    """The engine to pack stored int8 weights under in this process: ``x86`` and ``fbgemm`` stand in for
    each other; :class:`UnsupportedError` when this PyTorch build has neither the engine nor its stand-in."""
    if engine is None:
        return None
    if not isinstance(engine, str):
        raise TypeError(f"engine must be a string, got {type(engine).__name__}")
    supported = torch.backends.quantized.supported_engines
    if engine in supported:
        return engine
    if engine in ("x86", "fbgemm"):
        other = "fbgemm" if engine == "x86" else "x86"
        if other in supported:
            return other
    raise UnsupportedError(f"these int8 weights are for the {engine[:40]!r} engine, which this PyTorch build does "
                           f"not have (it has: {', '.join(supported)}); save the model again for one of those")
