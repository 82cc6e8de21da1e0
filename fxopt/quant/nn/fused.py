"""Fused float modules built by ``fuse-activations``: ``activation(op(x))`` as one module.

Float numerics do not change. State-dict keys keep the original module's names (``<name>.conv.weight``,
``<name>.linear.weight``). Backends read them through :class:`fxopt.quant.nn.base.FusedModule` only.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FusedModule

__all__ = ["FusedAdd", "FusedConv", "FusedLinear"]


class FusedConv(FusedModule):
    """``activation(conv(x))``: ``.conv`` (Conv1d/2d/3d) and ``.activation`` (ReLU/ReLU6)."""

    def __init__(self, conv: nn.Module, activation: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.activation = activation

    @property
    def op_key(self) -> str:
        return f"conv{self.conv.weight.dim() - 2}d"

    @property
    def inner(self) -> nn.Module:
        return self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x))


class FusedLinear(FusedModule):
    """``activation(linear(x))``: ``.linear`` and ``.activation`` (ReLU/ReLU6)."""

    def __init__(self, linear: nn.Linear, activation: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.activation = activation

    @property
    def op_key(self) -> str:
        return "linear"

    @property
    def inner(self) -> nn.Module:
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


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
