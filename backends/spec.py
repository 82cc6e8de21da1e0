"""The one object per backend that says what it runs in int8, and how.

Stub insertion (``fxopt.passes.InsertQuantStubs``), observer placement and lowering all read a
:class:`BackendSpec`; there is no second config that could disagree with it.

Every graph node is first normalised to an *op key* (``"conv2d"``, ``"add"``, ``"max_pool2d"`` …) by
:func:`op_key`, whatever its form (module call, function call, method call). The spec's ``ops`` table
maps op keys to an :class:`OpRule` whose ``kind`` says how the op takes part in an int8 region:

``compute``      computes new values: its output gets its own observer / qparams (conv, linear, add, cat…)
``share``        does not change values (max-pool, flatten, reshape, relu after an int8 op…): its output
                 shares the qparams of its first input, no observer
``fixed``        has a fixed output range (sigmoid, hardsigmoid, tanh): fixed qparams, no observer
``weight_only``  float in, float out, int8 weights (embedding)

Ops that are not in the table stay float.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.quant.nn import FusedModule
from fxopt.quant.spec import QSpec

__all__ = ["OpRule", "BackendSpec", "op_key", "common_int8_ops", "MODULE_KEYS", "FUNCTION_KEYS", "METHOD_KEYS",
           "SHAPE_READERS", "weighted_compute_ops", "matmul_ops"]


@dataclass(frozen=True)
class OpRule:
    """How one op key runs on a backend."""

    kind: str  # "compute" | "share" | "fixed" | "weight_only"
    per_channel: bool = False  # weights may be per output channel
    fused_activations: frozenset[str] = frozenset()  # activations with a fused kernel ("relu", ...)
    fixed_qparams: tuple[float, int] | None = None  # (scale, zero_point) for kind == "fixed"
    reason: str = ""  # free text shown by supports()
    # the operands' own activation qspec (each operand gets its own QuantStub, int8 inputs are requantized):
    # matmul between two activations, which the runtimes run in int8 only with zero points of 0
    operand_activation: QSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("compute", "share", "fixed", "weight_only"):
            raise ValueError(f"OpRule kind {self.kind!r} is not one of compute/share/fixed/weight_only")
        if self.kind == "fixed" and self.fixed_qparams is None:
            raise ValueError("an OpRule of kind 'fixed' needs fixed_qparams=(scale, zero_point)")


@dataclass(frozen=True)
class BackendSpec:
    """Everything a pass needs to know about an int8 backend."""

    name: str
    engine: str  # torch.backends.quantized.engine to run under
    activation: QSpec  # activation qspec (per tensor)
    weight: QSpec  # weight qspec for per-channel-capable ops (axis 0)
    weight_per_tensor: QSpec  # weight qspec where only per-tensor is possible
    ops: Mapping[str, OpRule] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # add/cat whose input ranges differ by more than this factor stay float (one scale would wipe out
    # the small input, e.g. box coordinates in pixels concatenated with scores in [0, 1])
    max_range_ratio: float = 100.0
    # weights of depthwise convs (one input channel per group), where the kernels need a narrower range
    depthwise_weight: QSpec | None = None

    def rule(self, key: str | None) -> OpRule | None:
        return self.ops.get(key) if key is not None else None


# ---- op keys -------------------------------------------------------------------------------

MODULE_KEYS: dict[type, str] = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.Linear: "linear",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Hardtanh: "hardtanh",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.MaxPool1d: "max_pool1d",
    nn.MaxPool2d: "max_pool2d",
    nn.MaxPool3d: "max_pool3d",
    nn.AvgPool1d: "avg_pool1d",
    nn.AvgPool2d: "avg_pool2d",
    nn.AvgPool3d: "avg_pool3d",
    nn.AdaptiveAvgPool1d: "adaptive_avg_pool1d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
    nn.AdaptiveAvgPool3d: "adaptive_avg_pool3d",
    nn.Flatten: "flatten",
    nn.Dropout: "identity",
    nn.Dropout1d: "identity",
    nn.Dropout2d: "identity",
    nn.Dropout3d: "identity",
    nn.Identity: "identity",
    nn.LayerNorm: "layer_norm",
    nn.BatchNorm2d: "batch_norm2d",
    nn.BatchNorm3d: "batch_norm3d",
    nn.Embedding: "embedding",
    nn.EmbeddingBag: "embedding_bag",
}

FUNCTION_KEYS: dict[Any, str] = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.linear: "linear",
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.max_pool1d: "max_pool1d",
    F.max_pool2d: "max_pool2d",
    F.max_pool3d: "max_pool3d",
    F.avg_pool1d: "avg_pool1d",
    F.avg_pool2d: "avg_pool2d",
    F.avg_pool3d: "avg_pool3d",
    F.adaptive_avg_pool1d: "adaptive_avg_pool1d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    F.adaptive_avg_pool3d: "adaptive_avg_pool3d",
    torch.flatten: "flatten",
    torch.unflatten: "unflatten",
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    torch.bmm: "matmul",
    torch.reshape: "reshape",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze",
    F.dropout: "identity",
    operator.getitem: "getitem",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    torch.cat: "cat",
    torch.concat: "cat",
    F.layer_norm: "layer_norm",
    F.pad: "pad",
    torch.chunk: "chunk",
    torch.split: "split",
    torch.mean: "mean",
}

METHOD_KEYS: dict[str, str] = {
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "flatten": "flatten",
    "unflatten": "unflatten",
    "matmul": "matmul",
    "bmm": "matmul",
    "view": "reshape",
    "reshape": "reshape",
    "permute": "permute",
    "transpose": "transpose",
    "squeeze": "squeeze",
    "unsqueeze": "unsqueeze",
    "contiguous": "contiguous",
    "add": "add",
    "add_": "add",
    "mul": "mul",
    "mul_": "mul",
    "chunk": "chunk",
    "split": "split",
    "size": "size",
    "mean": "mean",
}


# op keys that read a value's shape, not its values: they take the float or the int8 form alike
SHAPE_READERS = frozenset({"size"})


def op_key(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> str | None:
    """Normalise a node to an op key (``None`` for placeholders, outputs, attributes, unknown ops).

    Module calls need ``gm`` to look up the module type. Subclasses of a known module type map to the
    same key only when they do not override ``forward`` (a custom forward could compute anything).
    Fused float modules (:class:`fxopt.quant.nn.FusedModule`) are keyed by their ``op_key``.
    """
    if node.op == "call_module":
        if gm is None:
            return None
        try:
            mod = gm.get_submodule(node.target)
        except AttributeError:
            return None
        if isinstance(mod, FusedModule):
            return mod.op_key
        for cls in type(mod).__mro__:
            key = MODULE_KEYS.get(cls)
            if key is not None:
                if cls is not type(mod) and type(mod).forward is not cls.forward:
                    return None
                return key
        return None
    if node.op == "call_function":
        return FUNCTION_KEYS.get(node.target)
    if node.op == "call_method":
        return METHOD_KEYS.get(node.target)
    return None


# ---- the part of the support table PyTorch's int8 engines share -----------------------------

_SHARE_KEYS = (
    "relu", "relu6", "hardtanh", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "flatten", "unflatten", "reshape", "permute",
    "transpose", "squeeze", "unsqueeze", "identity", "contiguous", "getitem", "chunk", "split", "pad",
)
_FIXED = {  # output range of the quantized kernel, whatever the input qparams
    "sigmoid": (1.0 / 256.0, 0),
    "hardsigmoid": (1.0 / 256.0, 0),
    "tanh": (2.0 / 256.0, 128),
}


def weighted_compute_ops(per_channel: bool, fused_activations: frozenset[str] = frozenset({"relu"}),
                         ) -> dict[str, OpRule]:
    """conv1d/2d/3d and linear as int8 compute ops (``quantized::<op>`` kernels, ReLU fused by default)."""
    return {key: OpRule("compute", per_channel=per_channel, fused_activations=fused_activations,
                        reason=f"quantized::{key}") for key in ("conv1d", "conv2d", "conv3d", "linear")}


def matmul_ops() -> dict[str, OpRule]:
    """``matmul`` of two activations (attention's q @ kᵀ and weights @ v) in int8: for runtimes that run a
    MatMul between two QDQ inputs in int8 (ONNX Runtime, OpenVINO). PyTorch's int8 engines have no
    quantized matmul kernel, so the x86 / qnnpack tables leave it out (it stays float there). Both operands
    are quantized symmetric int8 (zero point 0): OpenVINO's CPU plugin runs a MatMul of two activations in
    int8 only without zero points (no weight-side compensation as for a constant weight)."""
    signed = QSpec(dtype=torch.qint8, symmetric=True)
    return {"matmul": OpRule("compute", operand_activation=signed,
                             reason="MatMul with both operands QDQ, int8 symmetric (int8 MatMul in the runtime)")}


def common_int8_ops() -> dict[str, OpRule]:
    """Op rules both PyTorch int8 engines (x86/fbgemm and qnnpack) satisfy; backends add conv/linear.
    No ``matmul``: PyTorch has no quantized matmul kernel (see :func:`matmul_ops`)."""
    ops: dict[str, OpRule] = {key: OpRule("share", reason=f"{key} runs on quantized tensors")
                              for key in _SHARE_KEYS}
    ops.update({key: OpRule("fixed", fixed_qparams=qp, reason=f"quantized {key}, fixed output range")
                for key, qp in _FIXED.items()})
    ops.update({
        "add": OpRule("compute", fused_activations=frozenset({"relu"}), reason="quantized::add"),
        "mul": OpRule("compute", fused_activations=frozenset({"relu"}), reason="quantized::mul"),
        "cat": OpRule("compute", reason="quantized::cat"),
        "hardswish": OpRule("compute", reason="quantized::hardswish"),
        "layer_norm": OpRule("compute", reason="quantized::layer_norm"),
        "batch_norm2d": OpRule("compute", reason="quantized::batch_norm2d (BatchNorm that could not be folded)"),
        "batch_norm3d": OpRule("compute", reason="quantized::batch_norm3d (BatchNorm that could not be folded)"),
        "embedding": OpRule("weight_only", reason="int8 rows, float output"),
        "embedding_bag": OpRule("weight_only", reason="int8 rows, float output"),
    })
    return ops
