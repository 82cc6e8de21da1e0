"""Quantized tensors and dtypes as plain data (tensors, numbers, strings) for fxopt's safe file format.

``fxopt.save`` writes int8 models with ``torch.save`` of plain data only, and ``fxopt.load`` reads them back
with ``torch.load(weights_only=True)``. A quantized tensor is stored as its integer values plus its qparams;
a dtype as its name. The decoders check what they get: a tampered file raises ``ValueError``/``TypeError``
(the loader turns those into an :class:`fxopt.FxoptError` naming the module).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["dtype_from_name", "dtype_name", "qtensor_from_state", "qtensor_state"]

_INT_REPR = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.qint32: torch.int32}
_DTYPES = {
    str(d): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
              torch.int32, torch.int64, torch.bool, torch.qint8, torch.quint8, torch.qint32)
}


def dtype_name(dtype: torch.dtype) -> str:
    """``"torch.qint8"`` for ``torch.qint8``."""
    if str(dtype) not in _DTYPES:
        raise TypeError(f"dtype {dtype} cannot be stored in an fxopt file")
    return str(dtype)


def dtype_from_name(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def qtensor_state(q: torch.Tensor) -> dict[str, Any]:
    """A per-tensor or per-channel (affine) quantized tensor as integer values + qparams."""
    if not q.is_quantized:
        raise TypeError("qtensor_state expects a quantized tensor")
    scheme = q.qscheme()
    state: dict[str, Any] = {"int_repr": q.int_repr().contiguous(), "dtype": dtype_name(q.dtype)}
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        state.update(scale=float(q.q_scale()), zero_point=int(q.q_zero_point()), axis=None)
    elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
        state.update(scale=q.q_per_channel_scales().double(), zero_point=q.q_per_channel_zero_points().long(),
                     axis=int(q.q_per_channel_axis()))
    else:
        raise TypeError(f"quantization scheme {scheme} cannot be stored in an fxopt file")
    return state


def qtensor_from_state(state: Any) -> torch.Tensor:
    """The quantized tensor :func:`qtensor_state` described (bit-exact)."""
    if not isinstance(state, dict) or not isinstance(state.get("int_repr"), torch.Tensor):
        raise ValueError("a quantized tensor entry needs 'int_repr' (a tensor), 'dtype', 'scale', 'zero_point'")
    dtype = dtype_from_name(state.get("dtype"))
    values = state["int_repr"]
    if _INT_REPR.get(dtype) != values.dtype:
        raise ValueError(f"integer values of dtype {values.dtype} do not fit quantized dtype {dtype}")
    axis = state.get("axis")
    if axis is None:
        return torch._make_per_tensor_quantized_tensor(values, float(state["scale"]), int(state["zero_point"]))
    scale, zero_point = state["scale"], state["zero_point"]
    if not (isinstance(scale, torch.Tensor) and isinstance(zero_point, torch.Tensor) and isinstance(axis, int)):
        raise ValueError("a per-channel quantized tensor needs tensor scales, tensor zero points and an int axis")
    if not 0 <= axis < values.dim() or scale.numel() != values.shape[axis] or zero_point.numel() != scale.numel():
        raise ValueError(f"per-channel qparams ({scale.numel()}) do not fit shape {tuple(values.shape)}, axis {axis}")
    return torch._make_per_channel_quantized_tensor(values, scale.double(), zero_point.long(), axis)
