"""Int8 2-D convolution on oneDNN's fused kernels (``torch.ops.onednn.qconv2d_pointwise``), x86 only.

``torch.ops.quantized.conv2d`` fuses nothing but ReLU. oneDNN's pointwise kernel also fuses

* a unary post-op: ``swish`` (SiLU), ``hardswish``, ``relu``, ``hardtanh`` (ReLU6);
* a residual add (``binary`` form, post-op ``sum``) optionally followed by ReLU: ``relu(conv(x) + accum)``
  with one requantization, so a ResNet block's ``conv → add → relu`` is one kernel. The sum is computed
  in the accumulator domain, which is also *more* exact than ``conv`` then ``add`` (one rounding, not two).

The kernel works on plain ``uint8`` tensors with the scale / zero point passed alongside; fxopt's int8
graphs pass quantized tensors between ops. :func:`as_uint8` / :func:`as_quint8` view one as the other
without copying (same storage), so the module takes and returns ``quint8`` tensors like every other
int8 module. Its input qparams are fixed at lowering (the kernel needs them at packing time): the
input tensor must carry them (lowering guarantees it; ``forward`` checks cheaply).

Weights are int8 symmetric (zero point 0), per output channel. oneDNN chooses the packed (blocked)
layout from the input shape, so the module packs once per input shape it sees (a few kept) rather than
once for all: a weight packed without the shape is reordered at every call. The packed forms are never
saved (``fxopt_state`` stores the int8 weight).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from fxopt.quant.qstate import qtensor_from_state, qtensor_state

from .int8 import _QOutput, quantize_weight

__all__ = ["QConvPointwise", "as_uint8", "as_quint8", "onednn_fusion_available", "UNARY_POST_OPS"]

UNARY_POST_OPS = ("none", "relu", "hardtanh", "swish", "hardswish")
_MAX_PACKS = 4  # input shapes a module keeps a packed weight for


@functools.lru_cache(maxsize=1)
def onednn_fusion_available() -> bool:
    """oneDNN's int8 pointwise conv is in this torch build and the CPU has int8 dot-product (VNNI) units."""
    try:
        torch.ops.onednn.qconv2d_pointwise.default  # noqa: B018 - existence check
        torch.ops.onednn.qconv_prepack.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    if "onednn" not in torch.backends.quantized.supported_engines or not torch.backends.mkldnn.is_available():
        return False
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(is_vnni()) if callable(is_vnni) else False


def _storage_alias(t: torch.Tensor) -> torch.Tensor:
    """An empty (so contiguous) view of ``t``'s storage: ``set_`` takes a storage from a contiguous tensor. Unlike
    ``t.untyped_storage()``, ``torch.jit.trace`` records it as a use of ``t``, not as a constant storage."""
    return t.as_strided((0,), (1,), 0)


def as_uint8(q: torch.Tensor) -> torch.Tensor:
    """The integer values of a ``quint8`` tensor as a plain ``uint8`` tensor sharing its storage."""
    out = torch.empty(0, dtype=torch.uint8)
    if torch.jit.is_tracing():
        return out.set_(_storage_alias(q), q.storage_offset(), q.size(), q.stride())
    return out.set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


def as_quint8(u: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """A plain ``uint8`` tensor as a ``quint8`` tensor with ``(scale, zero_point)``, sharing its storage."""
    q = torch._empty_affine_quantized([0], scale=scale, zero_point=zero_point, dtype=torch.quint8)
    if torch.jit.is_tracing():
        return q.set_(_storage_alias(u), u.storage_offset(), u.size(), u.stride())
    return q.set_(u.untyped_storage(), u.storage_offset(), u.size(), u.stride())


# torch.jit.trace cannot record an op with a ``Scalar?[]`` argument ("unsupported input list type: Scalar?"),
# which every qconv2d_pointwise overload has (the post-op's scalars). While tracing, the call goes through
# these TorchScript functions instead: the tracer inlines their graph, so the traced module still runs the
# same kernel with the same arguments. Compiled on first use (tracing only), eager calls never pay for it.
_Number = Union[int, float, complex]  # TorchScript's ``number``, the element type ``Scalar`` maps to


def _scalar_list(values: List[float]) -> List[Optional[_Number]]:
    out: List[Optional[_Number]] = []
    for v in values:
        out.append(v)
    return out


def _qconv_unary(qx: torch.Tensor, x_scale: float, x_zero_point: int, qw: torch.Tensor, w_scale: torch.Tensor,
                 w_zero_point: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                 dilation: List[int], groups: int, output_scale: float, output_zero_point: int,
                 output_dtype: Optional[int], attr: str, scalars: List[float], algorithm: str) -> torch.Tensor:
    return torch.ops.onednn.qconv2d_pointwise(
        qx, x_scale, x_zero_point, qw, w_scale, w_zero_point, bias, stride, padding, dilation, groups, output_scale,
        output_zero_point, output_dtype, attr, _scalar_list(scalars), algorithm)


def _qconv_binary(qx: torch.Tensor, x_scale: float, x_zero_point: int, qw: torch.Tensor, w_scale: torch.Tensor,
                  w_zero_point: torch.Tensor, qaccum: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                  padding: List[int], dilation: List[int], groups: int, output_scale: float, output_zero_point: int,
                  output_dtype: Optional[int], accum_scale: float, accum_zero_point: int, binary_attr: str,
                  alpha: float, unary_attr: str, unary_scalars: List[float], unary_algorithm: str) -> torch.Tensor:
    return torch.ops.onednn.qconv2d_pointwise(  # TorchScript resolves the ``binary`` overload from the arguments
        qx, x_scale, x_zero_point, qw, w_scale, w_zero_point, qaccum, bias, stride, padding, dilation, groups,
        output_scale, output_zero_point, output_dtype, accum_scale, accum_zero_point, binary_attr, alpha, unary_attr,
        _scalar_list(unary_scalars), unary_algorithm)


@functools.lru_cache(maxsize=1)
def _traceable_unary():
    return torch.jit.script(_qconv_unary)


@functools.lru_cache(maxsize=1)
def _traceable_binary():
    return torch.jit.script(_qconv_binary)


def _pack_name(shape: tuple[int, ...]) -> str:
    """The buffer name of the weight packed for inputs of ``shape``."""
    return "packed_" + "x".join(str(int(d)) for d in shape)


class QConvPointwise(_QOutput):
    """``post_op(conv2d(x) [+ accum])`` on int8 tensors, one oneDNN kernel (see the module docstring).

    ``post_op`` is one of :data:`UNARY_POST_OPS` (``hardtanh`` takes ``post_scalars=(lo, hi)``). With
    ``accum_qparams`` set the module is binary: ``forward(x, accum)`` computes ``post_op(conv(x) + accum)``
    and ``post_op`` may only be ``none`` or ``relu``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int, input_qparams: Sequence,
                 scale: float, zero_point: int, post_op: str = "none", post_scalars: Sequence[float] = (),
                 accum_qparams: Sequence | None = None, accum_inplace: bool = False) -> None:
        super().__init__(scale, zero_point)
        if post_op not in UNARY_POST_OPS:
            raise ValueError(f"post_op must be one of {UNARY_POST_OPS}, got {post_op!r}")
        if accum_qparams is not None and post_op not in ("none", "relu"):
            raise ValueError(f"a conv + add kernel fuses only 'none' or 'relu' after the add, got {post_op!r}")
        if not weight.is_quantized or weight.dim() != 4:
            raise ValueError("QConvPointwise needs a quantized 4-D (conv2d) int8 weight")
        self.stride = [int(s) for s in stride]
        self.padding = [int(p) for p in padding]
        self.dilation = [int(d) for d in dilation]
        self.groups = int(groups)
        self.input_scale, self.input_zero_point = float(input_qparams[0]), int(input_qparams[1])
        self.post_op, self.post_scalars = post_op, [float(s) for s in post_scalars]
        self.accum_qparams = None if accum_qparams is None else (float(accum_qparams[0]), int(accum_qparams[1]))
        self.accum_inplace = bool(accum_inplace)
        self.set_weight_bias(weight, bias)

    @property
    def relu(self) -> bool:
        return self.post_op == "relu"

    def set_weight_bias(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scales = torch.full((weight.shape[0],), float(weight.q_scale()))
            zero_points = torch.full((weight.shape[0],), int(weight.q_zero_point()), dtype=torch.int64)
        else:
            scales = weight.q_per_channel_scales().float()
            zero_points = weight.q_per_channel_zero_points().long()
        if bool((zero_points != 0).any()):
            raise ValueError("QConvPointwise needs symmetric int8 weights (zero point 0)")
        self.weight = weight
        self.bias = None if bias is None else bias.detach().float().clone()
        self._w_scales = scales.contiguous()
        self._w_zero_points = zero_points.contiguous()
        for key in list(getattr(self, "_packs", ())):
            del self._buffers[_pack_name(key)]
        self._packs: dict[tuple[int, ...], torch.Tensor] = {}

    def _packed(self, shape: torch.Size) -> torch.Tensor:
        """The weight packed for inputs of ``shape``: oneDNN picks the weight layout from the input shape, and
        a layout packed for another shape is reordered at every call (6x slower on 7x7 maps).

        Each pack is also a non-persistent buffer (never saved): ``torch.jit.trace`` then reads it as a module
        attribute, which ``torch.jit.freeze`` keeps as one; a packed oneDNN tensor cannot be a graph constant
        (the tracer refuses it, "Unsupported value kind: Tensor"). While tracing, sizes are traced values: the
        pack is looked up by the concrete shape, so a trace holds the pack for the shape it saw."""
        key = tuple(int(d) for d in shape) if torch.jit.is_tracing() else tuple(shape)
        packed = self._packs.get(key)
        if packed is None:
            if len(self._packs) >= _MAX_PACKS:
                oldest = next(iter(self._packs))
                del self._packs[oldest], self._buffers[_pack_name(oldest)]
            packed = torch.ops.onednn.qconv_prepack(
                self.weight.int_repr().contiguous(), self._w_scales, self.input_scale, self.input_zero_point,
                self.stride, self.padding, self.dilation, self.groups, list(key))
            self._packs[key] = packed
            self.register_buffer(_pack_name(key), packed, persistent=False)
        return packed

    def prepack(self, shape: Sequence[int]) -> None:
        """Pack the weight ahead of time for inputs of ``shape`` (lowering does it for the example input)."""
        self._packed(torch.Size(shape))

    @classmethod
    def from_float(cls, conv: nn.Module, weight_qparams: Sequence[torch.Tensor], input_qparams: Sequence,
                   output_qparams: Sequence, *, padding: Sequence[int] | None = None, post_op: str = "none",
                   post_scalars: Sequence[float] = (), accum_qparams: Sequence | None = None,
                   accum_inplace: bool = False) -> "QConvPointwise":
        pad = padding if padding is not None else conv.padding
        if isinstance(pad, str):
            raise ValueError(f"QConvPointwise needs explicit padding, got {pad!r}; resolve it first")
        weight = quantize_weight(conv.weight, *weight_qparams)
        scale, zero_point = output_qparams
        return cls(weight, conv.bias, conv.stride, pad, conv.dilation, conv.groups, input_qparams, float(scale),
                   int(zero_point), post_op=post_op, post_scalars=post_scalars, accum_qparams=accum_qparams,
                   accum_inplace=accum_inplace)

    def forward(self, x: torch.Tensor, accum: torch.Tensor | None = None) -> torch.Tensor:
        if self.accum_qparams is None:
            call = _traceable_unary() if torch.jit.is_tracing() else torch.ops.onednn.qconv2d_pointwise
            out = call(
                as_uint8(x), self.input_scale, self.input_zero_point, self._packed(x.shape), self._w_scales,
                self._w_zero_points, self.bias, self.stride, self.padding, self.dilation, self.groups, self.scale,
                self.zero_point, None, self.post_op, self.post_scalars, "")
            return as_quint8(out, self.scale, self.zero_point)
        # the kernel writes its result into the accumulator's buffer: a private channels-last copy unless
        # lowering proved nothing reads the accumulator afterwards
        acc = as_uint8(accum)
        if not (self.accum_inplace and acc.is_contiguous(memory_format=torch.channels_last)):
            acc = acc.clone(memory_format=torch.channels_last)
        call = _traceable_binary() if torch.jit.is_tracing() else torch.ops.onednn.qconv2d_pointwise.binary
        out = call(
            as_uint8(x), self.input_scale, self.input_zero_point, self._packed(x.shape), self._w_scales,
            self._w_zero_points,
            acc, self.bias, self.stride, self.padding, self.dilation, self.groups, self.scale, self.zero_point, None,
            self.accum_qparams[0], self.accum_qparams[1], "sum", 1.0, self.post_op, [], "")
        return as_quint8(out, self.scale, self.zero_point)

    def __deepcopy__(self, memo: dict) -> "QConvPointwise":
        return type(self).fxopt_from_state(self.fxopt_state())

    def __getstate__(self) -> dict:
        raise TypeError("QConvPointwise holds a oneDNN packed weight: save with fxopt.save or state_dict()")

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        found = {"weight": self.weight}
        if self.bias is not None:
            found["bias"] = self.bias
        return found

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight
        destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            self.set_weight_bias(state_dict.pop(prefix + "weight"), state_dict.pop(prefix + "bias", None))
        else:
            missing_keys.append(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def fxopt_state(self) -> dict:
        return {**super().fxopt_state(), "weight": qtensor_state(self.weight), "bias": self.bias,
                "stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "input_qparams": [self.input_scale, self.input_zero_point], "post_op": self.post_op,
                "post_scalars": self.post_scalars,
                "accum_qparams": None if self.accum_qparams is None else list(self.accum_qparams),
                "accum_inplace": self.accum_inplace}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "QConvPointwise":
        accum = state["accum_qparams"]
        return cls(qtensor_from_state(state["weight"]), state["bias"], state["stride"], state["padding"],
                   state["dilation"], int(state["groups"]), (float(state["input_qparams"][0]),
                                                            int(state["input_qparams"][1])),
                   float(state["scale"]), int(state["zero_point"]), post_op=str(state["post_op"]),
                   post_scalars=[float(s) for s in state["post_scalars"]],
                   accum_qparams=None if accum is None else (float(accum[0]), int(accum[1])),
                   accum_inplace=bool(state.get("accum_inplace", False)))

    def extra_repr(self) -> str:
        fused = self.post_op if self.accum_qparams is None else f"add+{self.post_op}" + (
            " (in place)" if self.accum_inplace else "")
        return (f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"fused={fused}, {super().extra_repr()}")
