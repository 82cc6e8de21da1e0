"""Half-precision storage for any module: :class:`FP16Module`.

The wrapped module's floating-point parameters and buffers are stored as ``float16`` (half the bytes).
``forward`` either

* ``compute="fp32"``: upcasts them to the input's dtype right before the call
  (``torch.func.functional_call``; exact fp32 arithmetic on fp16-rounded weights), or
* ``compute="fp16"``: runs the module in half precision on a half copy of the input and casts the
  result back (only where the CPU has fast fp16 kernels; see ``passes/convert_fp16.py``).

Inputs and outputs stay in the caller's dtype, so the wrapper is a drop-in replacement.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from .base import QuantizedModule

__all__ = ["FP16Module", "COMPUTE_MODES"]

COMPUTE_MODES = ("fp32", "fp16")


def _cast_tree(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_tree(v, dtype) for v in value)
    return value


class FP16Module(QuantizedModule):
    """Stores ``module``'s float parameters and buffers in fp16; see the module docstring."""

    def __init__(self, module: nn.Module, compute: str = "fp32"):
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ValueError(f"FP16Module compute must be one of {COMPUTE_MODES}, got {compute!r}")
        self.compute = compute
        self.module = module.half() if compute == "fp16" else _half_params(module)

    def forward(self, *args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        dtype = first.dtype if first is not None else torch.float32
        if self.compute == "fp16":
            out = self.module(*_cast_tree(args, torch.float16), **_cast_tree(kwargs, torch.float16))
            return _cast_tree(out, dtype)
        module = self.module
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and len(args) == 1 and not kwargs:
            bias = None if module.bias is None else module.bias.to(dtype)
            return module._conv_forward(args[0], module.weight.to(dtype), bias)
        tensors = {name: t.to(dtype) if t.dtype == torch.float16 else t
                   for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]}
        return functional_call(self.module, tensors, args, kwargs)

    def __getattr__(self, name: str):
        # transparent for attribute reads (containers such as nn.TransformerEncoder read their layers' options)
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            return getattr(inner, name)

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]}

    def extra_repr(self) -> str:
        return f"storage=float16, compute={self.compute}"


def _half_params(module: nn.Module) -> nn.Module:
    """Cast float parameters and buffers to fp16 in place (integer buffers are left alone)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_floating_point():
                sub._parameters[name] = nn.Parameter(p.detach().to(torch.float16), requires_grad=False)
        for name, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                sub._buffers[name] = b.to(torch.float16)
    return module
