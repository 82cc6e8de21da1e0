"""Fused float modules built by ``fuse-activations``: ``activation(op(x))`` as one module.

Float numerics do not change. State-dict keys keep the original module's names (``<name>.conv.weight``,
``<name>.linear.weight``). Backends read them through :class:`fxopt.quant.nn.base.FusedModule` only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .base import FusedModule

__all__ = ["FusedAdd", "FusedConv", "FusedLinear"]


class _FusedWeighted(FusedModule):
    """``activation(inner(x))`` where the inner module keeps its attribute name (``conv`` / ``linear``)."""

    _inner_name: ClassVar[str] = ""

    def __init__(self, inner: nn.Module, activation: nn.Module) -> None:
        super().__init__()
        self.add_module(self._inner_name, inner)
        self.activation = activation

    @property
    def inner(self) -> nn.Module:
        return self._modules[self._inner_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.inner(x))


class FusedConv(_FusedWeighted):
    """``activation(conv(x))``: ``.conv`` (Conv1d/2d/3d) and ``.activation`` (ReLU/ReLU6)."""

    _inner_name = "conv"

    @property
    def op_key(self) -> str:
        return f"conv{self.inner.weight.dim() - 2}d"


class FusedLinear(_FusedWeighted):
    """``activation(linear(x))``: ``.linear`` and ``.activation`` (ReLU/ReLU6)."""

    _inner_name = "linear"

    @property
    def op_key(self) -> str:
        return "linear"


class FusedAdd(FusedModule):
    """``activation(a + b)``: ``.activation`` (ReLU/ReLU6)."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation

    @property
    def op_key(self) -> str:
        return "add"

    @property
    def inner(self) -> None:
        return None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.activation(a + b)
