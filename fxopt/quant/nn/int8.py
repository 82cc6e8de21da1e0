"""fxopt's own int8 modules: thin wrappers around ``torch.ops.quantized.*`` kernels.

Lowering (``fxopt.backends.lowering``) builds these from the float modules of a calibrated graph.
Each module

* takes quantized inputs and returns a quantized output with fixed output qparams (``scale``,
  ``zero_point``), except :class:`QuantizeInput` (float in);
* is built with ``from_float(float_module, weight_qparams, output_qparams, ...)``;
* describes its stored tensors with ``fxopt_weights()`` (``fxopt.report`` counts them as int8 bytes);
* survives ``copy.deepcopy`` and ``state_dict`` / ``load_state_dict`` (packed weights are saved
  unpacked and packed again on load, under the engine the module was built for).

Embeddings are weight-only (float in, float out): lowering uses :class:`fxopt.quant.nn.dynamic.DynamicEmbedding`.

Packed weights are engine specific: they are packed under ``engine`` (``"x86"``/``"fbgemm"`` or
``"qnnpack"``), whatever the global engine is at construction time.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from ..qstate import dtype_from_name, dtype_name, qtensor_from_state, qtensor_state
from .base import QuantizedModule
from .engine import engine_scope, local_engine

__all__ = [
    "quantize_weight",
    "QuantizeInput",
    "QConv",
    "QLinear",
    "QAdd",
    "QMul",
    "QCat",
    "QHardswish",
    "QLayerNorm",
    "QBatchNorm",
]

logger = logging.getLogger(__name__)

_Q = torch.ops.quantized
_CONV_PREPACK = {1: _Q.conv1d_prepack, 2: _Q.conv2d_prepack, 3: _Q.conv3d_prepack}
_CONV_UNPACK = {1: _Q.conv2d_unpack, 2: _Q.conv2d_unpack, 3: _Q.conv3d_unpack}
_CONV_OPS = {
    (1, False): _Q.conv1d, (1, True): _Q.conv1d_relu,
    (2, False): _Q.conv2d, (2, True): _Q.conv2d_relu,
    (3, False): _Q.conv3d, (3, True): _Q.conv3d_relu,
}


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    dtype: torch.dtype = torch.qint8, *, per_channel: bool | None = None) -> torch.Tensor:
    """``weight`` as a quantized tensor: per channel (axis 0) when ``per_channel`` (default: when ``scale`` has
    more than one element), else per tensor."""
    weight = weight.detach().float()
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    zero_point = torch.as_tensor(zero_point, dtype=torch.int64).reshape(-1)
    with warnings.catch_warnings():  # torch warns (once) that quantized tensor creation is deprecated
        warnings.simplefilter("ignore", UserWarning)
        if not (per_channel if per_channel is not None else scale.numel() > 1):
            return torch.quantize_per_tensor(weight, float(scale[0]), int(zero_point[0]), dtype)
        return torch.quantize_per_channel(weight, scale, zero_point, 0, dtype)


def _qparams(output_qparams: Sequence) -> tuple[float, int]:
    scale, zero_point = output_qparams
    return float(scale), int(zero_point)


class _QOutput(QuantizedModule):
    """Base for modules with an output scale / zero point (saved in the state dict)."""

    def __init__(self, scale: float, zero_point: int) -> None:
        super().__init__()
        self.scale = float(scale)
        self.zero_point = int(zero_point)

    def _state_tensors(self) -> dict[str, torch.Tensor | None]:
        return {"scale": torch.tensor(self.scale, dtype=torch.float64),
                "zero_point": torch.tensor(self.zero_point, dtype=torch.int64)}

    def _set_state_tensors(self, tensors: dict[str, torch.Tensor | None]) -> None:
        self.scale, self.zero_point = float(tensors["scale"]), int(tensors["zero_point"])

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}"

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        return {}

    # fxopt.save / fxopt.load: constructor state as plain data (tensors, numbers, strings)
    def fxopt_state(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "_QOutput":
        return cls(float(state["scale"]), int(state["zero_point"]))


class QuantizeInput(_QOutput):
    """Float → quantized tensor with fixed qparams (the lowered form of a QuantStub)."""

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype = torch.quint8) -> None:
        super().__init__(scale, zero_point)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(x, self.scale, self.zero_point, self.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}, dtype={self.dtype}"

    def fxopt_state(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": dtype_name(self.dtype)}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "QuantizeInput":
        return cls(float(state["scale"]), int(state["zero_point"]), dtype_from_name(state["dtype"]))


class _Packed(_QOutput):
    """Base for modules holding prepacked weights (``self._packed``).

    ``weight_bits`` is the grid the int8 weights lie on: 8, or fewer for weights trained on a coarser
    grid (QAT with 4-bit weights: int8 storage, values in ``[-8, 7]``); ``fxopt.report`` notes it.
    """

    engine: str | None = None
    weight_bits: int = 8
    _kept: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _prepack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> object:  # pragma: no cover
        raise TypeError("subclass must implement _prepack")

    def _unpack(self) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise TypeError("subclass must implement _unpack")

    def set_weight_bias(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        bias = None if bias is None else bias.detach().float()
        with engine_scope(self.engine):
            self._packed = self._prepack(weight, bias)
        # qnnpack cannot unpack conv3d weights ("QNNPACK only supports Conv2d now"): keep the tensors then
        self._kept = (weight, bias) if self._cannot_unpack() else None

    def _cannot_unpack(self) -> bool:
        return False

    def weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._kept is not None:
            return self._kept
        with engine_scope(self.engine):
            return self._unpack()

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        weight, bias = self.weight_bias()
        found = {"weight": weight}
        if bias is not None:
            found["bias"] = bias
        return found

    def fxopt_state(self) -> dict:
        weight, bias = self.weight_bias()
        return {**super().fxopt_state(), "weight": qtensor_state(weight), "bias": bias, "relu": self.relu,
                "engine": self.engine, "weight_bits": self.weight_bits}

    def _with_weight_bits(self, state: dict) -> "_Packed":
        """Restore the weight grid recorded by ``fxopt_state`` (files written before it existed: 8)."""
        bits = state.get("weight_bits", 8)
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"weight_bits must be an int in [2, 8], got {bits!r}")
        if bits != 8:
            self.weight_bits = bits
        return self

    def _state_tensors(self) -> dict[str, torch.Tensor | None]:
        weight, bias = self.weight_bias()
        return {**super()._state_tensors(), "weight": weight, "bias": bias}

    def _set_state_tensors(self, tensors: dict[str, torch.Tensor | None]) -> None:
        super()._set_state_tensors(tensors)
        self.set_weight_bias(tensors["weight"], tensors["bias"])


class QConv(_Packed):
    """Quantized conv1d/2d/3d (``torch.ops.quantized.conv{n}d`` / ``conv{n}d_relu``), zero padding only."""

    def __init__(self, dim: int, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int, scale: float, zero_point: int,
                 relu: bool = False, engine: str | None = None) -> None:
        super().__init__(scale, zero_point)
        if dim not in _CONV_PREPACK:
            raise ValueError(f"QConv supports 1, 2 or 3 spatial dims, got {dim}")
        self.dim, self.groups, self.relu, self.engine = dim, int(groups), bool(relu), engine
        self.stride = [int(s) for s in stride]
        self.padding = [int(p) for p in padding]
        self.dilation = [int(d) for d in dilation]
        self.set_weight_bias(weight, bias)

    def _cannot_unpack(self) -> bool:
        engine = self.engine or torch.backends.quantized.engine
        return self.dim == 3 and engine == "qnnpack"

    def _prepack(self, weight, bias):
        return _CONV_PREPACK[self.dim](weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _unpack(self):
        return _CONV_UNPACK[self.dim](self._packed)

    @classmethod
    def from_float(cls, conv: nn.Module, weight_qparams: Sequence[torch.Tensor], output_qparams: Sequence,
                   *, relu: bool = False, padding: Sequence[int] | None = None, engine: str | None = None) -> "QConv":
        """From an ``nn.Conv{n}d``; ``padding`` overrides the conv's (explicit ints, e.g. resolved ``'same'``)."""
        dim = conv.weight.dim() - 2
        pad = padding if padding is not None else conv.padding
        if isinstance(pad, str):
            raise ValueError(f"QConv needs explicit padding, got {pad!r}; resolve it first")
        weight = quantize_weight(conv.weight, *weight_qparams)
        return cls(dim, weight, conv.bias, conv.stride, pad, conv.dilation, conv.groups, *_qparams(output_qparams),
                   relu=relu, engine=engine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CONV_OPS[(self.dim, self.relu)](x, self._packed, self.scale, self.zero_point)

    def fxopt_state(self) -> dict:
        return {**super().fxopt_state(), "dim": self.dim, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "groups": self.groups}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "QConv":
        return cls(int(state["dim"]), qtensor_from_state(state["weight"]), state["bias"], state["stride"],
                   state["padding"], state["dilation"], int(state["groups"]), float(state["scale"]),
                   int(state["zero_point"]), relu=bool(state["relu"]), engine=local_engine(state["engine"]))._with_weight_bits(state)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, relu={self.relu}, {super().extra_repr()}")


class QLinear(_Packed):
    """Quantized linear (``torch.ops.quantized.linear`` / ``linear_relu``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, zero_point: int,
                 relu: bool = False, engine: str | None = None) -> None:
        super().__init__(scale, zero_point)
        self.relu, self.engine = bool(relu), engine
        self.set_weight_bias(weight, bias)

    def _prepack(self, weight, bias):
        return _Q.linear_prepack(weight, bias)

    def _unpack(self):
        return _Q.linear_unpack(self._packed)

    @classmethod
    def from_float(cls, linear: nn.Module, weight_qparams: Sequence[torch.Tensor], output_qparams: Sequence,
                   *, relu: bool = False, engine: str | None = None) -> "QLinear":
        weight = quantize_weight(linear.weight, *weight_qparams)
        return cls(weight, linear.bias, *_qparams(output_qparams), relu=relu, engine=engine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return _Q.linear_relu(x, self._packed, self.scale, self.zero_point)
        return _Q.linear(x, self._packed, self.scale, self.zero_point)

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "QLinear":
        return cls(qtensor_from_state(state["weight"]), state["bias"], float(state["scale"]),
                   int(state["zero_point"]), relu=bool(state["relu"]), engine=local_engine(state["engine"]))._with_weight_bits(state)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, {super().extra_repr()}"


class QAdd(_QOutput):
    """``a + b`` (broadcasting) requantized to the output qparams; ``relu=True`` uses ``add_relu``."""

    def __init__(self, scale: float, zero_point: int, relu: bool = False) -> None:
        super().__init__(scale, zero_point)
        self.relu = bool(relu)

    @classmethod
    def from_float(cls, _module: nn.Module | None, output_qparams: Sequence, *, relu: bool = False) -> "QAdd":
        return cls(*_qparams(output_qparams), relu=relu)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return _Q.add_relu(a, b, self.scale, self.zero_point)
        return _Q.add(a, b, self.scale, self.zero_point)

    def fxopt_state(self) -> dict:
        return {**super().fxopt_state(), "relu": self.relu}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "QAdd":
        return cls(float(state["scale"]), int(state["zero_point"]), relu=bool(state["relu"]))


def _broadcast_materialized(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` at their common shape, the smaller one copied out in the larger one's memory format.

    The quantized mul kernels broadcast through a slow generic loop (a squeeze-excitation gate of shape
    ``[N, C, 1, 1]`` times a ``[N, C, H, W]`` map: 2-3x slower than materializing the gate first).
    """
    shape = torch.broadcast_shapes(a.shape, b.shape)
    big = a if a.shape == shape else b
    fmt = torch.channels_last if big.dim() == 4 and big.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    if a.shape != shape:
        a = a.expand(shape).contiguous(memory_format=fmt)
    if b.shape != shape:
        b = b.expand(shape).contiguous(memory_format=fmt)
    return a, b


_GATE_VIEW_MAX_PIXELS = 196  # 14 x 14: at and below this, the channels-last view beats materializing the gate


def _gate_view(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A channels-last ``[N, C, H, W]`` map and an ``[N, C, 1, 1]`` gate as ``[N, H, W, C]`` / ``[N, 1, 1, C]``
    views (no copy), or ``None`` when the operands are not that.

    In that view the gate broadcasts over the outer dims and the kernel's inner loop runs along contiguous
    channels. Measured (AMD EPYC Zen 4, 1 thread) it beats materializing the gate on small maps only
    (1152x7x7: 20 vs 42 us; 672x14x14: 53 vs 62 us; 240x28x28: 135 vs 78 us), hence the pixel limit.
    """
    big, gate = (a, b) if b.dim() == 4 and b.shape[2:] == (1, 1) else (b, a)
    if big.dim() != 4 or gate.dim() != 4 or gate.shape[2:] != (1, 1) or gate.shape[1] != big.shape[1] \
            or gate.shape[0] not in (1, big.shape[0]) or big.shape[2] * big.shape[3] > _GATE_VIEW_MAX_PIXELS \
            or not big.is_contiguous(memory_format=torch.channels_last):
        return None
    return big.permute(0, 2, 3, 1), gate.permute(0, 2, 3, 1)


class QMul(QAdd):
    """``a * b`` (broadcasting) requantized to the output qparams; ``relu=True`` uses ``mul_relu``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            views = _gate_view(a, b)
            if views is not None:  # squeeze-excitation gate on a small map
                op = _Q.mul_relu if self.relu else _Q.mul
                return op(*views, self.scale, self.zero_point).permute(0, 3, 1, 2)
            a, b = _broadcast_materialized(a, b)
        if self.relu:
            return _Q.mul_relu(a, b, self.scale, self.zero_point)
        return _Q.mul(a, b, self.scale, self.zero_point)


class QCat(_QOutput):
    """``torch.cat(tensors, dim)`` requantized to the output qparams."""

    def __init__(self, dim: int, scale: float, zero_point: int) -> None:
        super().__init__(scale, zero_point)
        self.dim = int(dim)

    @classmethod
    def from_float(cls, dim: int, output_qparams: Sequence) -> "QCat":
        return cls(dim, *_qparams(output_qparams))

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return _Q.cat(list(tensors), self.dim, self.scale, self.zero_point)

    def fxopt_state(self) -> dict:
        return {**super().fxopt_state(), "dim": self.dim}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "QCat":
        return cls(int(state["dim"]), float(state["scale"]), int(state["zero_point"]))


class QHardswish(_QOutput):
    """Hardswish on a quantized tensor (aten's hardswish has no quantized kernel)."""

    @classmethod
    def from_float(cls, _module: nn.Module | None, output_qparams: Sequence) -> "QHardswish":
        return cls(*_qparams(output_qparams))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Q.hardswish(x, self.scale, self.zero_point)


class QLayerNorm(_QOutput):
    """Quantized layer norm with float affine parameters."""

    def __init__(self, normalized_shape: Sequence[int], weight: torch.Tensor | None, bias: torch.Tensor | None,
                 eps: float, scale: float, zero_point: int) -> None:
        super().__init__(scale, zero_point)
        self.normalized_shape = [int(s) for s in normalized_shape]
        self.eps = float(eps)
        shape = tuple(self.normalized_shape)
        self.register_buffer("weight", torch.ones(shape) if weight is None else weight.detach().float().clone())
        self.register_buffer("bias", torch.zeros(shape) if bias is None else bias.detach().float().clone())

    @classmethod
    def from_float(cls, ln: nn.LayerNorm, output_qparams: Sequence) -> "QLayerNorm":
        return cls(ln.normalized_shape, ln.weight, ln.bias, ln.eps, *_qparams(output_qparams))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Q.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.scale,
                             self.zero_point)

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def fxopt_state(self) -> dict:
        return {**super().fxopt_state(), "normalized_shape": self.normalized_shape, "weight": self.weight,
                "bias": self.bias, "eps": self.eps}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "QLayerNorm":
        return cls(state["normalized_shape"], state["weight"], state["bias"], float(state["eps"]),
                   float(state["scale"]), int(state["zero_point"]))


class QBatchNorm(_QOutput):
    """Quantized eval-mode batch norm (2d/3d), for BatchNorms that could not be folded into a conv."""

    def __init__(self, dim: int, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                 running_var: torch.Tensor, eps: float, scale: float, zero_point: int) -> None:
        super().__init__(scale, zero_point)
        if dim not in (2, 3):
            raise ValueError(f"QBatchNorm supports 2d and 3d inputs, got dim={dim}")
        self.dim, self.eps = dim, float(eps)
        for name, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                            ("running_var", running_var)):
            self.register_buffer(name, value.detach().float().clone())

    @classmethod
    def from_float(cls, bn: nn.modules.batchnorm._BatchNorm, output_qparams: Sequence) -> "QBatchNorm":
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("QBatchNorm needs running statistics (track_running_stats=True)")
        n = bn.num_features
        weight = bn.weight if bn.weight is not None else torch.ones(n)
        bias = bn.bias if bn.bias is not None else torch.zeros(n)
        dim = 3 if isinstance(bn, nn.BatchNorm3d) else 2
        return cls(dim, weight, bias, bn.running_mean, bn.running_var, bn.eps, *_qparams(output_qparams))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = _Q.batch_norm3d if self.dim == 3 else _Q.batch_norm2d
        return op(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.scale,
                  self.zero_point)

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, "running_mean": self.running_mean,
                "running_var": self.running_var}

    def fxopt_state(self) -> dict:
        return {**super().fxopt_state(), "dim": self.dim, "eps": self.eps, **self.fxopt_weights()}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "QBatchNorm":
        return cls(int(state["dim"]), state["weight"], state["bias"], state["running_mean"], state["running_var"],
                   float(state["eps"]), float(state["scale"]), int(state["zero_point"]))
