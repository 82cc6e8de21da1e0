"""The ``tflite`` backend: a full-integer ``.tflite`` written from fxopt's calibrated graph, run by LiteRT.

``lower(gm)`` takes a prepared + calibrated static int8 graph (``recipes.static_int8(data)``, any of the
``tflite``, ``edgetpu``, ``x86``, ``qnnpack``, ``onnx`` preparations) and writes the TFLite flatbuffer
itself, with the schema's object API that ``ai-edge-litert`` ships (``ai_edge_litert.schema_py_generated``):

* **no converter in between**: litert-torch re-quantizes with its own PT2E quantizer and onnx2tf
  re-calibrates from a representative dataset (and needs TensorFlow), so either would throw away
  fxopt's calibration. Writing the file directly puts *fxopt's* observer scales and zero points into
  every tensor, exactly (the uint8 grids fxopt calibrates are the TFLite int8 grids shifted by 128);
* **TFLite's int8 spec**: activations int8 asymmetric per tensor; conv / depthwise weights int8
  symmetric per output channel (zero point 0, range ``[-127, 127]``), fully-connected weights per tensor;
  biases int32 with scale ``input_scale * weight_scale``. ``TFLiteBackend(per_tensor=True)`` makes every
  weight per tensor;
* **layout**: 4-D values are stored NHWC, Conv1d values NWC (the returned module transposes its inputs and
  outputs); every value records the order its tensor is stored in and, after a view, the tensor's real shape, so
  reshapes / transposes / permutes cost no op until a reader needs another order, and then one TRANSPOSE on the
  smallest equivalent shape (ShuffleNet's channel shuffle: [N, H*W, 2, C/2], never 5-D); a flatten of a spatial
  map or sequence feeding a linear layer permutes the layer's weight columns instead;
* **ops**: CONV_2D, DEPTHWISE_CONV_2D (also for Conv1d, on the [N, 1, T, C] view; a grouped conv as SPLIT, one
  CONV_2D per group and CONCATENATION, which the EdgeTPU maps), FULLY_CONNECTED, ADD, MUL, CONCATENATION (inputs
  re-quantized to the output's qparams, as the int8 kernel requires), AVERAGE_POOL_2D, MAX_POOL_2D (also 1-D),
  MEAN (global average pool, ``torch.mean``), RESHAPE, TRANSPOSE, SPLIT / SPLIT_V (chunk / split), HARD_SWISH,
  LOGISTIC, TANH, SiLU as ``x * LOGISTIC(x)``, RELU / RELU6 (fused into the op before them where the int8
  lowering fuses them, as in the reference simulation), PAD (PyTorch's explicit padding when TFLite's SAME
  padding would place it differently), QUANTIZE / DEQUANTIZE at the boundaries. Not written (an error says
  what to do): LayerNorm, attention / batch matmul, softmax, ``F.pad``, tensor slicing;
* **full integer**: every op in int8. A float island (an op fxopt kept float, a value leaving int8
  mid-graph) raises :class:`UnsupportedError` listing them; an op this writer cannot express raises one
  naming the node.

Inputs and outputs are float32 with QUANTIZE / DEQUANTIZE inside the file by default; with
``TFLiteBackend(int8_io=True)`` the file's inputs and outputs are int8 (what the EdgeTPU wants) and the
returned :class:`TFLiteModule` quantizes / dequantizes at its boundary in torch, so it stays a drop-in
replacement; ``module.run_int8(*int8_inputs)`` runs the raw int8 interface. ``module.input_qparams`` /
``output_qparams`` hold the boundary qparams. The module runs the bytes in
``ai_edge_litert.interpreter.Interpreter`` with ``threads`` threads (``torch.get_num_threads()`` read at
lowering unless given); a batch other than the example's resizes the interpreter's inputs.
``fxopt.save(module, "m.tflite")`` writes the exact bytes; ``fxopt.load`` runs them again.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from fxopt import meta
from fxopt.errors import CalibrationError, UnsupportedError
from fxopt.graph_utils import bind_args, get_attr_path, is_observer
from fxopt.quant.nn import FusedModule
from fxopt.quant.spec import QSpec, fused_activation_qparams
from fxopt.quant.stubs import DeQuantStub, QuantStub

from ._lower_ops import is_depthwise, weight_qparams
from .edgetpu import edgetpu_spec, shape_nodes
from .lowering import Int8Backend
from .onnx import _bind_inputs, require
from .spec import BackendSpec, OpRule, op_key

__all__ = ["TFLiteBackend", "TFLiteModule", "tflite_spec", "export_tflite", "read_info"]

_FORMAT_KEY = "fxopt.tflite.v1"
_METADATA = "fxopt"
_IDENTIFIER = b"TFL3"
_NCHW_TO_NHWC = (0, 2, 3, 1)
_SIGMOID_QPARAMS = (1.0 / 256.0, 0)  # LOGISTIC's fixed output grid (uint8 form; int8: zero point -128)
_ONE_D = {"conv1d", "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d"}
_UNWRITTEN = {  # ops with no int8 form here, and what to do
    "layer_norm": " (TFLite has no int8 LayerNorm kernel and the EdgeTPU none at all: its converter decomposes "
                  "it into float mean / variance ops; keep LayerNorm outside the exported model or use BatchNorm)",
    "softmax": " (not written yet: export the logits and apply softmax on the host)",
    "multiheadattention": " (attention is not written yet: its matmuls of two activations need BATCH_MATMUL, which "
                          "the EdgeTPU does not run)",
    "scaled_dot_product_attention": " (attention is not written yet: its matmuls of two activations need "
                                    "BATCH_MATMUL, which the EdgeTPU does not run)",
    "matmul": " (a matmul of two activations, e.g. attention, is not written yet: the EdgeTPU has no BATCH_MATMUL)",
    "sub": " (not written yet: SUB of two int8 tensors; write it as an add of a negated conv output)",
    "pad": " (F.pad is not written; use the conv's own padding)",
}
_ALIASES = {"identity", "contiguous"}
# op versions for int8 kernels (what the TFLite converter writes for them)
_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2, "MUL": 2, "CONCATENATION": 2,
             "AVERAGE_POOL_2D": 2, "MAX_POOL_2D": 2, "MEAN": 2, "RESHAPE": 1, "HARD_SWISH": 1, "LOGISTIC": 2,
             "TANH": 2, "QUANTIZE": 2, "DEQUANTIZE": 2, "RELU": 2, "RELU6": 2, "RELU_N1_TO_1": 1, "PAD": 2,
             "PADV2": 2, "TRANSPOSE": 2, "SPLIT": 2, "SPLIT_V": 2}


def _schema():
    require("ai_edge_litert", "tflite")
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415

    return schema


def tflite_spec(per_tensor: bool = False) -> BackendSpec:
    """What the writer emits in int8: the EdgeTPU table plus HardSwish and Tanh, weights in [-127, 127]
    (TFLite's symmetric weight range), conv per channel unless ``per_tensor``, FullyConnected per tensor."""
    base = edgetpu_spec()
    relu = frozenset({"relu", "relu6"})
    ops = dict(base.ops)
    ops.update({
        "conv2d": OpRule("compute", per_channel=not per_tensor, fused_activations=relu,
                         reason="CONV_2D / DEPTHWISE_CONV_2D"),
        "linear": OpRule("compute", per_channel=False, fused_activations=relu, reason="FULLY_CONNECTED (per tensor)"),
        "hardswish": OpRule("compute", reason="HARD_SWISH"),
        "mul": OpRule("compute", fused_activations=relu, reason="MUL"),
        "cat": OpRule("compute", fused_activations=relu, reason="CONCATENATION"),
    })
    ops.update({
        "conv1d": OpRule("compute", per_channel=not per_tensor, fused_activations=relu,
                         reason="CONV_2D / DEPTHWISE_CONV_2D on a [N, 1, T, C] view"),
        "silu": OpRule("compute", reason="x * LOGISTIC(x) (MUL)"),
    })
    ops["unflatten"] = OpRule("share", reason="RESHAPE")
    ops.pop("pad", None)  # F.pad is not written: it stays float (and is reported)
    weight = QSpec(torch.qint8, symmetric=True, axis=0, quant_min=-127, quant_max=127)
    return BackendSpec(name="tflite", engine=base.engine, activation=base.activation, weight=weight,
                       weight_per_tensor=replace(weight, axis=None), ops=ops,
                       notes=("full-integer TFLite (int8 spec); uint8 activation grids written as int8 (zp - 128)",))


# ---- the flatbuffer writer ---------------------------------------------------------------------

@dataclass
class _Value:
    """A value of the TFLite graph: its tensor, torch-order shape, int8 qparams and how it is stored.

    ``perm``: the tensor holds the torch value permuted by ``perm`` (``None``: torch order; 4-D maps are NHWC,
    Conv1d maps NWC). ``phys``: the tensor's actual shape where a reshape was not written yet (same memory
    order, another shape: a view / transpose chain costs no op until a reader needs the shape)."""

    tensor: int
    shape: tuple[int, ...]  # the torch shape
    qparams: tuple[float, int] | None
    perm: tuple[int, ...] | None = None
    flat_hwc: tuple[int, int, int] | None = None  # (C, H, W) of a flatten written in NHWC order
    phys: tuple[int, ...] | None = None

    @property
    def order(self) -> tuple[int, ...]:
        return self.perm if self.perm is not None else tuple(range(len(self.shape)))

    @property
    def nhwc(self) -> bool:
        """Channels last (NHWC for 4-D, NWC for 3-D)."""
        return len(self.shape) >= 3 and self.order == _channels_last(len(self.shape))

    @property
    def stored(self) -> tuple[int, ...]:
        return tuple(self.shape[p] for p in self.order)


class _Writer:
    """Builds the TFLite model (object API) from a prepared graph, node by node."""

    def __init__(self, gm: torch.fx.GraphModule, spec: BackendSpec, int8_io: bool) -> None:
        self.s = _schema()
        self.gm, self.spec, self.int8_io = gm, spec, int8_io
        self.modules = dict(gm.named_modules())
        self.config = meta.quant_config(gm)
        self.act = self.config.activation_spec if self.config is not None else spec.activation
        self.offset = 128 if self.act.dtype == torch.quint8 else 0  # uint8 grid -> int8 grid
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [self.s.BufferT()]  # buffer 0: the empty buffer
        self.operators: list[Any] = []
        self.opcodes: dict[int, int] = {}
        self.opcode_list: list[Any] = []
        self.env: dict[torch.fx.Node, _Value] = {}
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.info: dict[str, Any] = {"inputs": [], "outputs": [], "input_layouts": [], "output_layouts": [],
                                     "input_qparams": [], "output_qparams": []}
        self.counts: dict[str, int] = {}

    # ---- tensors and operators ------------------------------------------------------------------
    def tensor(self, name: str, shape, dtype: str, qparams=None, data: np.ndarray | None = None) -> int:
        """Add a tensor (``qparams``: (scale, zero_point) per tensor, or (scales, zero_points, dim))."""
        s = self.s
        t = s.TensorT()
        t.name = f"{name}_{len(self.tensors)}"
        t.shape = np.asarray([int(d) for d in shape], dtype=np.int32)
        t.type = getattr(s.TensorType, dtype)
        t.buffer = 0
        if data is not None:
            buf = _AlignedBufferT()
            buf.data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        if qparams is not None:
            q = s.QuantizationParametersT()
            if len(qparams) == 3:
                scales, zps, dim = qparams
                q.scale = np.asarray(scales, dtype=np.float32)
                q.zeroPoint = np.asarray(zps, dtype=np.int64)
                q.quantizedDimension = int(dim)
            else:
                q.scale = np.asarray([qparams[0]], dtype=np.float32)
                q.zeroPoint = np.asarray([qparams[1]], dtype=np.int64)
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def act_tensor(self, name: str, shape_nhwc, qparams) -> int:
        return self.tensor(name, shape_nhwc, "INT8", qparams)

    def const_i32(self, name: str, values) -> int:
        arr = np.asarray(values, dtype=np.int32)
        return self.tensor(name, arr.shape, "INT32", data=arr)

    def op(self, code: str, inputs: list[int], outputs: list[int], options_type: str | None = None,
           options: Any = None) -> None:
        s = self.s
        builtin = getattr(s.BuiltinOperator, code)
        if builtin not in self.opcodes:
            oc = s.OperatorCodeT()
            oc.builtinCode = builtin
            oc.deprecatedBuiltinCode = min(builtin, 127)
            oc.version = _VERSIONS.get(code, 1)
            self.opcode_list.append(oc)
            self.opcodes[builtin] = len(self.opcode_list) - 1
        o = s.OperatorT()
        o.opcodeIndex = self.opcodes[builtin]
        o.inputs = np.asarray(inputs, dtype=np.int32)
        o.outputs = np.asarray(outputs, dtype=np.int32)
        if options_type is not None:
            o.builtinOptionsType = getattr(s.BuiltinOptions, options_type)
            o.builtinOptions = options
        self.operators.append(o)
        self.counts[code] = self.counts.get(code, 0) + 1

    def options(self, cls: str, **fields) -> Any:
        obj = getattr(self.s, cls)()
        for k, v in fields.items():
            setattr(obj, k, v)
        return obj

    # ---- qparams --------------------------------------------------------------------------------
    def int8_qparams(self, qparams: tuple[float, int]) -> tuple[float, int]:
        return float(qparams[0]), int(qparams[1]) - self.offset

    def observed(self, node: torch.fx.Node) -> tuple[torch.fx.Node, tuple[float, int]]:
        """The observer reading ``node`` and its calibrated (uint8-grid) qparams."""
        obs = [u for u in node.users if u.op == "call_module" and is_observer(self.modules.get(u.target))]
        if len(obs) != 1:
            raise UnsupportedError(f"{node.name}: an int8 op needs exactly one observer on its output, found "
                                   f"{len(obs)}; prepare the graph with fxopt.recipes.static_int8(data)")
        scale, zp = self.modules[obs[0].target].calculate_qparams()
        return obs[0], (float(torch.as_tensor(scale).reshape(-1)[0]), int(torch.as_tensor(zp).reshape(-1)[0]))

    def fusable_follower(self, obs: torch.fx.Node) -> tuple[torch.fx.Node, str] | None:
        """The lowering's rule: the observed value's only reader is a ReLU / ReLU6 in the int8 region."""
        if len(obs.users) != 1:
            return None
        user = next(iter(obs.users))
        if meta.quant_region(user) is None or not user.args or user.args[0] is not obs:
            return None
        act = _activation_of(user, self.gm, self.modules)
        return (user, act) if act in ("relu", "relu6") else None

    def output_of(self, node: torch.fx.Node, fused: str | None, can_fuse: bool = True,
                  ) -> tuple[tuple[float, int], str | None, list[torch.fx.Node]]:
        """Output qparams (uint8 grid), the fused activation and the nodes that alias the output."""
        obs, qparams = self.observed(node)
        aliases = [obs]
        if fused is not None:
            qparams = fused_activation_qparams(self.act, qparams, fused)
        elif can_fuse:
            follower = self.fusable_follower(obs)
            if follower is not None:
                aliases.append(follower[0])
                fused = follower[1]
                qparams = fused_activation_qparams(self.act, qparams, fused)
        return qparams, fused, aliases

    # ---- values ---------------------------------------------------------------------------------
    def value(self, node: Any, who: torch.fx.Node) -> _Value:
        if not isinstance(node, torch.fx.Node) or node not in self.env:
            raise UnsupportedError(f"{who.name} ({_describe(who, self.gm)}): input {node!r} is not an int8 value of "
                                   "the graph (constants and values computed outside int8 cannot be written)")
        return self.env[node]

    def canonical(self, v: _Value, name: str) -> _Value:
        """``v`` ready for an op that reads its tensor: a flatten written in NHWC order put back in torch order,
        a 4-D value NHWC, and the tensor in its stored shape (a pending reshape written)."""
        if v.flat_hwc is not None:
            c, h, w = v.flat_hwc
            n = v.shape[0]
            shaped = self.act_tensor(name, (n, h, w, c), self.int8_qparams(v.qparams))
            self.reshape_op(v.tensor, shaped, (n, h, w, c), name)
            nchw = self.act_tensor(name, (n, c, h, w), self.int8_qparams(v.qparams))
            self.op("TRANSPOSE", [shaped, self.const_i32(f"{name}_perm", [0, 3, 1, 2])], [nchw],
                    "TransposeOptions", self.options("TransposeOptionsT"))
            out = self.act_tensor(name, v.shape, self.int8_qparams(v.qparams))
            self.reshape_op(nchw, out, v.shape, name)
            v = _Value(out, v.shape, v.qparams)
        if len(v.shape) == 4:
            v = self.arrange(v, _channels_last(4), name)
        return self.physical(v, name)

    def reshape_op(self, src: int, dst: int, shape, name: str) -> None:
        """RESHAPE ``src`` into ``dst`` of ``shape`` (the batch dimension left to the runtime: -1)."""
        target = [-1, *[int(d) for d in shape[1:]]]
        self.op("RESHAPE", [src, self.const_i32(f"{name}_shape", target)], [dst], "ReshapeOptions",
                self.options("ReshapeOptionsT", newShape=target))

    def physical(self, v: _Value, name: str) -> _Value:
        """``v`` with its tensor in the stored shape (a RESHAPE where a view left it in another)."""
        if v.phys is None or tuple(v.phys) == v.stored:
            return replace(v, phys=None)
        out = self.act_tensor(name, v.stored, self.int8_qparams(v.qparams))
        self.reshape_op(v.tensor, out, v.stored, name)
        return replace(v, tensor=out, phys=None)

    def arrange(self, v: _Value, perm: tuple[int, ...], name: str) -> _Value:
        """``v`` stored in ``perm`` order: one TRANSPOSE on the smallest shape that moves the same data (size-1
        axes dropped, axes that stay neighbours merged, the batch kept first), or none when only a reshape."""
        perm = tuple(perm)
        norm = None if perm == tuple(range(len(v.shape))) else perm
        if v.order == perm:
            return replace(v, perm=norm)
        if v.flat_hwc is not None:
            v = self.canonical(v, name)
            if v.order == perm:
                return replace(v, perm=norm)
        moves = [v.order.index(p) for p in perm]  # target stored axis j = current stored axis moves[j]
        src, dst = _collapse(v.stored, moves)
        out_stored = tuple(v.shape[p] for p in perm)
        if dst == sorted(dst):  # the memory order does not change: a reshape at most (written when read)
            return _Value(v.tensor, v.shape, v.qparams, norm, phys=v.phys or v.stored)
        tensor = v.tensor
        if tuple(v.phys or v.stored) != src:
            tensor = self.act_tensor(f"{name}_collapsed", src, self.int8_qparams(v.qparams))
            self.reshape_op(v.tensor, tensor, src, f"{name}_collapse")
        moved = tuple(src[d] for d in dst)
        out = self.act_tensor(f"{name}_moved", moved, self.int8_qparams(v.qparams))
        self.op("TRANSPOSE", [tensor, self.const_i32(f"{name}_perm", list(dst))], [out], "TransposeOptions",
                self.options("TransposeOptionsT"))
        return _Value(out, v.shape, v.qparams, norm, phys=moved if moved != out_stored else None)

    def new_value(self, node: torch.fx.Node, shape: tuple[int, ...], qparams: tuple[float, int],
                  perm: tuple[int, ...] | None | str = "default") -> _Value:
        """A fresh int8 tensor for ``node`` (``perm="default"``: NHWC for 4-D values, torch order otherwise)."""
        if perm == "default":
            perm = _channels_last(4) if len(shape) == 4 else None
        v = _Value(-1, tuple(shape), qparams, perm)
        return replace(v, tensor=self.act_tensor(node.name, v.stored, self.int8_qparams(qparams)))

    # ---- the walk -------------------------------------------------------------------------------
    def run(self) -> None:
        sizes = shape_nodes(self.gm)
        for node in self.gm.graph.nodes:
            if node in self.env or node in sizes:
                continue  # sizes are read from the recorded shapes: the file's shapes are static
            if node.op == "placeholder":
                continue  # read by its QuantStub
            if node.op == "output":
                self.output(node)
                continue
            if node.op == "get_attr":
                continue  # read by the op that takes it as a weight
            module = self.modules.get(node.target) if node.op == "call_module" else None
            if module is not None and is_observer(module):
                self.env[node] = self.value(node.args[0], node)
                continue
            if isinstance(module, QuantStub):
                self.quant_stub(node)
                continue
            if isinstance(module, DeQuantStub):
                self.env[node] = self.value(node.args[0], node)
                continue
            key = op_key(node, self.gm)
            handler = getattr(self, f"op_{key}", None) if key else None
            if handler is None or self.spec.rule(key) is None:
                raise UnsupportedError(
                    f"{node.name} ({_describe(node, self.gm)}): the tflite backend has no int8 TFLite op for it"
                    f"{_UNWRITTEN.get(_describe(node, self.gm).lower(), '')}. Rewrite it with supported ops "
                    f"({', '.join(sorted(self.spec.ops))}) or keep it outside the exported model")
            handler(node, module)

    def quant_stub(self, node: torch.fx.Node) -> None:
        src = node.args[0]
        shape = _shape(src)
        _, qparams = self.observed(node)
        perm = _channels_last(len(shape)) if len(shape) == 4 or (len(shape) == 3 and self._feeds_conv1d(node)) \
            else None
        v = _Value(-1, tuple(shape), qparams, perm)
        q8 = self.int8_qparams(qparams)
        name = src.name
        if self.int8_io:
            tensor = self.act_tensor(name, v.stored, q8)
        else:
            inp = self.tensor(name, v.stored, "FLOAT32")
            tensor = self.act_tensor(f"{name}_int8", v.stored, q8)
            self.op("QUANTIZE", [inp], [tensor], "QuantizeOptions", self.options("QuantizeOptionsT"))
            self.inputs.append(inp)
        if self.int8_io:
            self.inputs.append(tensor)
        self.info["inputs"].append(name)
        self.info["input_layouts"].append(_layout(v))
        self.info["input_qparams"].append(list(q8))
        self.env[node] = replace(v, tensor=tensor)

    def _feeds_conv1d(self, node: torch.fx.Node) -> bool:
        """Whether a 3-D input goes (through its observer) into a Conv1d / 1-D pool: then it is stored NWC."""
        readers = [r for u in node.users for r in (u.users if is_observer(self.modules.get(u.target)) else [u])]
        return any(op_key(r, self.gm) in _ONE_D for r in readers)

    def output(self, node: torch.fx.Node) -> None:
        leaves, treespec = pytree.tree_flatten(node.args[0])
        for i, leaf in enumerate(leaves):
            v = self.canonical(self.value(leaf, node), f"output_{i}")
            if self.int8_io:
                tensor = v.tensor
            else:
                tensor = self.tensor(f"output_{i}", v.stored, "FLOAT32")
                self.op("DEQUANTIZE", [v.tensor], [tensor], "DequantizeOptions", self.options("DequantizeOptionsT"))
            self.outputs.append(tensor)
            self.info["outputs"].append(f"output_{i}")
            self.info["output_layouts"].append(_layout(v))
            self.info["output_qparams"].append(list(self.int8_qparams(v.qparams)))
        self.info["treespec"] = pytree.treespec_dumps(treespec)

    # ---- weighted ops -----------------------------------------------------------------------------
    def _weights(self, node: torch.fx.Node, module: nn.Module | None, key: str):
        """(inner module or None, weight, bias, fused activation) of a conv / linear node."""
        if module is not None:
            if callable(getattr(module, "fxopt_lowering", None)):
                raise UnsupportedError(f"{node.name}: QAT layers are not written by the tflite backend yet; convert "
                                       "the QAT model to a calibrated static graph first")
            inner = module.inner if isinstance(module, FusedModule) else module
            fused = _fused_kind(node, module)
            return inner, inner.weight.detach().float(), inner.bias, fused
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            raise UnsupportedError(f"{node.name}: its weight is computed at run time; TFLite needs constant weights")
        b = get_attr_path(self.gm, bias.target) if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else bias
        if b is not None and not isinstance(b, torch.Tensor):
            raise UnsupportedError(f"{node.name}: its bias is computed at run time; TFLite needs a constant bias")
        return None, get_attr_path(self.gm, weight.target).detach().float(), b, None

    def _quantize_weight(self, weight: torch.Tensor, key: str, depthwise: bool):
        rule = self.spec.rule(key)
        per_channel = bool(rule and rule.per_channel) and (self.config is None or self.config.per_channel)
        config = self.config if self.config is not None and self.config.backend == self.spec.name else None
        scale, zp = weight_qparams(weight, per_channel, self.spec, config, depthwise)
        if bool((zp != 0).any()):
            raise UnsupportedError("TFLite's int8 weights are symmetric (zero point 0); prepare with symmetric "
                                   "weights (the default of recipes.static_int8)")
        lo, hi = self.spec.weight.qmin, self.spec.weight.qmax
        shape = [-1] + [1] * (weight.dim() - 1)
        s = scale.float().reshape(shape) if scale.numel() > 1 else scale.float().reshape(())
        q = torch.clamp(torch.round(weight / s), lo, hi).to(torch.int8)
        scales = scale.double().expand(weight.shape[0]) if scale.numel() == 1 else scale.double()
        return q, scale.double(), scales

    def _bias(self, name: str, bias: torch.Tensor | None, in_scale: float, w_scales: torch.Tensor,
              out_channels: int) -> int:
        b = torch.zeros(out_channels, dtype=torch.float64) if bias is None else bias.detach().double()
        scales = in_scale * w_scales.reshape(-1).expand(out_channels) if w_scales.numel() == 1 \
            else in_scale * w_scales
        q = torch.clamp(torch.round(b / scales), -(2**31), 2**31 - 1).to(torch.int32).numpy()
        if w_scales.numel() == 1:
            qp = (float(in_scale * w_scales.reshape(-1)[0]), 0)
        else:
            qp = (scales.tolist(), [0] * out_channels, 0)
        return self.tensor(f"{name}_bias", q.shape, "INT32", qp, data=q)

    def _conv_args(self, node: torch.fx.Node, inner: nn.Module | None, fn) -> tuple:
        if inner is not None:
            if getattr(inner, "padding_mode", "zeros") != "zeros":
                raise UnsupportedError(f"{node.name}: padding_mode={inner.padding_mode!r} has no TFLite conv; use "
                                       "zero padding")
            stride, padding, dilation, groups = inner.stride, inner.padding, inner.dilation, inner.groups
        else:
            args = _bind(fn, node)
            stride, padding, dilation, groups = args["stride"], args["padding"], args["dilation"], args["groups"]
        if isinstance(padding, str):
            raise UnsupportedError(f"{node.name}: padding={padding!r}: write the padding as numbers")
        return stride, padding, dilation, int(groups)

    def op_conv2d(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        inner, weight, bias, fused = self._weights(node, module, "conv2d")
        stride, padding, dilation, groups = self._conv_args(node, inner, F.conv2d)
        x = self.canonical(self.value(node.args[0], node), f"{node.name}_in")
        if len(x.shape) != 4:
            raise UnsupportedError(f"{node.name}: conv2d on a {len(x.shape)}-D value; TFLite's CONV_2D takes NHWC")
        qparams, fused, aliases = self.output_of(node, fused)
        out = self._conv(node, x, weight, bias, fused, _pair(stride), _pair(padding), _pair(dilation), groups,
                         _shape(node), qparams, "conv2d")
        self.bind(node, out, aliases)

    def op_conv1d(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        """Conv1d as CONV_2D / DEPTHWISE_CONV_2D over a [N, 1, T, C] view of the NWC-stored value."""
        inner, weight, bias, fused = self._weights(node, module, "conv1d")
        stride, padding, dilation, groups = self._conv_args(node, inner, F.conv1d)
        x = self._as_2d(self.value(node.args[0], node), f"{node.name}_in")
        qparams, fused, aliases = self.output_of(node, fused)
        n, c_out, t_out = _shape(node)
        out4 = self._conv(node, x, weight.unsqueeze(2), bias, fused, (1, _pair(stride)[0]), (0, _pair(padding)[0]),
                          (1, _pair(dilation)[0]), groups, (n, c_out, 1, t_out), qparams, "conv1d")
        self.bind(node, self._from_2d(out4), aliases)

    def _as_2d(self, v: _Value, name: str) -> _Value:
        """A 3-D [N, C, T] value as the 4-D NHWC value [N, 1, T, C] (a RESHAPE of the NWC tensor)."""
        if len(v.shape) != 3:
            raise UnsupportedError(f"{name}: a 1-D conv / pool on a {len(v.shape)}-D value (it takes [N, C, T])")
        v = self.arrange(v, _channels_last(3), name)
        n, c, t = v.shape
        v4 = _Value(v.tensor, (n, c, 1, t), v.qparams, _channels_last(4), phys=v.phys or v.stored)
        return self.physical(v4, name)

    @staticmethod
    def _from_2d(v4: _Value) -> _Value:
        n, c, _, t = v4.shape
        return _Value(v4.tensor, (n, c, t), v4.qparams, _channels_last(3), phys=v4.phys or v4.stored)

    def _conv(self, node: torch.fx.Node, x: _Value, weight: torch.Tensor, bias, fused, stride, padding, dilation,
              groups: int, out_shape, qparams, key: str) -> _Value:
        """CONV_2D / DEPTHWISE_CONV_2D on the NHWC value ``x``; a grouped conv (not depthwise) as SPLIT, one
        CONV_2D per group and CONCATENATION on the output grid (the EdgeTPU has no grouped conv)."""
        out_c, in_per_group, kh, kw = weight.shape
        in_c = x.shape[1]
        depthwise = groups > 1 and groups == in_c and in_per_group == 1
        wq, wscale, scales = self._quantize_weight(weight, key, is_depthwise(weight, groups))
        per_channel = wscale.numel() > 1
        src, pad = self._padding(node, x, (kh, kw), stride, dilation, padding, out_shape, pad_value="zero")
        out = self.new_value(node, out_shape, qparams)
        act = _ACT[fused]
        if depthwise:
            w_data = wq.permute(1, 2, 3, 0).contiguous().numpy()  # [1, kh, kw, out]
            w_qp = (scales.tolist(), [0] * out_c, 3) if per_channel else (float(wscale), 0)
            w = self.tensor(f"{node.name}_weight", w_data.shape, "INT8", w_qp, data=w_data)
            b = self._bias(node.name, bias, x.qparams[0], wscale, out_c)
            opts = self.options("DepthwiseConv2DOptionsT", padding=pad, strideH=stride[0], strideW=stride[1],
                                depthMultiplier=out_c // in_c, fusedActivationFunction=act,
                                dilationHFactor=dilation[0], dilationWFactor=dilation[1])
            self.op("DEPTHWISE_CONV_2D", [src, w, b], [out.tensor], "DepthwiseConv2DOptions", opts)
            return out
        srcs, outs = [src], [out.tensor]
        if groups > 1:  # SPLIT the (padded) input by channel; every group's conv writes on the output's grid
            shape = [int(d) for d in self.tensors[src].shape]
            shape[3] //= groups
            srcs = [self.act_tensor(f"{node.name}_group{g}_in", shape, self.int8_qparams(x.qparams))
                    for g in range(groups)]
            self.op("SPLIT", [self.const_i32(f"{node.name}_split_axis", 3), src], srcs, "SplitOptions",
                    self.options("SplitOptionsT", numSplits=groups))
            n, _, oh, ow = out_shape
            outs = [self.act_tensor(f"{node.name}_group{g}", (n, oh, ow, out_c // groups),
                                    self.int8_qparams(qparams)) for g in range(groups)]
        per = out_c // groups
        for g, (gsrc, gout) in enumerate(zip(srcs, outs)):
            rows = slice(g * per, (g + 1) * per)
            w_data = wq[rows].permute(0, 2, 3, 1).contiguous().numpy()  # [out, kh, kw, in]
            gscale = wscale[rows] if per_channel else wscale
            w_qp = (scales[rows].tolist(), [0] * per, 0) if per_channel else (float(wscale), 0)
            w = self.tensor(f"{node.name}_weight", w_data.shape, "INT8", w_qp, data=w_data)
            b = self._bias(node.name, None if bias is None else bias[rows], x.qparams[0], gscale, per)
            opts = self.options("Conv2DOptionsT", padding=pad, strideH=stride[0], strideW=stride[1],
                                fusedActivationFunction=act, dilationHFactor=dilation[0], dilationWFactor=dilation[1])
            self.op("CONV_2D", [gsrc, w, b], [gout], "Conv2DOptions", opts)
        if groups > 1:
            self.op("CONCATENATION", outs, [out.tensor], "ConcatenationOptions",
                    self.options("ConcatenationOptionsT", axis=3, fusedActivationFunction=0))
        return out

    def _padding(self, node: torch.fx.Node, x: _Value, kernel, stride, dilation, padding, out_shape,
                 pad_value: str, same_ok: bool = True) -> tuple[int, int]:
        """The input tensor and TFLite padding (SAME / VALID) giving PyTorch's symmetric ``padding``; an explicit
        PAD (or PADV2 with the int8 minimum before a max pool) where SAME would place the padding differently
        (or where SAME would mean something else: ``same_ok=False``)."""
        s = self.s
        if padding == (0, 0):
            return x.tensor, s.Padding.VALID
        if same_ok and _same_matches(x.shape, kernel, stride, dilation, padding, out_shape):
            return x.tensor, s.Padding.SAME
        if pad_value == "none":
            raise UnsupportedError(f"{node.name}: avg_pool2d with padding and count_include_pad=False is written only "
                                   "where TFLite's SAME padding matches PyTorch's (it leaves the padding out too)")
        n, c, h, w = x.shape
        padded_shape = (n, h + 2 * padding[0], w + 2 * padding[1], c)
        padded = self.act_tensor(f"{node.name}_pad", padded_shape, self.int8_qparams(x.qparams))
        pads = self.const_i32(f"{node.name}_paddings", [[0, 0], [padding[0], padding[0]], [padding[1], padding[1]],
                                                        [0, 0]])
        zp8 = self.int8_qparams(x.qparams)[1]
        if pad_value == "zero" or zp8 == -128:  # PAD writes the zero point (the int8 minimum after a ReLU)
            self.op("PAD", [x.tensor, pads], [padded], "PadOptions", self.options("PadOptionsT"))
        else:  # max pooling: pad with the smallest int8 value, which never wins the max
            low = self.tensor(f"{node.name}_pad_value", (), "INT8", self.int8_qparams(x.qparams),
                              data=np.asarray(-128, dtype=np.int8))
            self.op("PADV2", [x.tensor, pads, low], [padded], "PadV2Options", self.options("PadV2OptionsT"))
        return padded, s.Padding.VALID

    def op_linear(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        inner, weight, bias, fused = self._weights(node, module, "linear")
        x = self.value(node.args[0], node)
        if x.flat_hwc is None:  # a linear layer reads the last torch dimension: the value in torch order
            x = self.physical(self.arrange(x, tuple(range(len(x.shape))), f"{node.name}_in"), f"{node.name}_in")
        else:  # read the NHWC-ordered flatten: permute the weight's columns instead
            c, h, w = x.flat_hwc
            weight = weight.reshape(weight.shape[0], c, h, w).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
        out_shape = _shape(node)
        qparams, fused, aliases = self.output_of(node, fused)
        wq, wscale, _ = self._quantize_weight(weight, "linear", False)
        w_qp = (float(wscale), 0) if wscale.numel() == 1 else (wscale.tolist(), [0] * weight.shape[0], 0)
        w = self.tensor(f"{node.name}_weight", wq.shape, "INT8", w_qp, data=wq.numpy())
        b = self._bias(node.name, bias, x.qparams[0], wscale, weight.shape[0])
        out = self.new_value(node, out_shape, qparams, perm=None)
        opts = self.options("FullyConnectedOptionsT", fusedActivationFunction=_ACT[fused],
                            keepNumDims=len(out_shape) > 2)
        self.op("FULLY_CONNECTED", [x.tensor, w, b], [out.tensor], "FullyConnectedOptions", opts)
        self.bind(node, out, aliases)

    def bind(self, node: torch.fx.Node, out: _Value, aliases: list[torch.fx.Node]) -> None:
        self.env[node] = out
        for a in aliases:
            self.env[a] = out

    # ---- elementwise ----------------------------------------------------------------------------
    def _binary(self, node: torch.fx.Node, module: nn.Module | None, code: str) -> None:
        operands = [a for a in node.args[:2]]
        if len(operands) != 2 or not all(isinstance(a, torch.fx.Node) for a in operands):
            raise UnsupportedError(f"{node.name} ({code.lower()}) with a constant operand: only tensor {code.lower()} "
                                   "tensor is written in int8; make the constant a tensor input or fold it")
        a, b = (self.canonical(self.value(o, node), f"{node.name}_in{i}") for i, o in enumerate(operands))
        if len(a.shape) != len(b.shape):
            raise UnsupportedError(f"{node.name} ({code.lower()}): operands of rank {len(a.shape)} and {len(b.shape)}; "
                                   "broadcast them to the same rank first")
        b = self.physical(self.arrange(b, a.order, f"{node.name}_in1"), f"{node.name}_in1")
        fused = _fused_kind(node, module) if module is not None else None
        qparams, fused, aliases = self.output_of(node, fused)
        out = self.new_value(node, _shape(node), qparams, perm=a.perm)
        opts = self.options(f"{code.capitalize()}OptionsT", fusedActivationFunction=_ACT[fused])
        self.op(code, [a.tensor, b.tensor], [out.tensor], f"{code.capitalize()}Options", opts)
        self.bind(node, out, aliases)

    def op_add(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        if node.kwargs.get("alpha", 1) != 1:
            raise UnsupportedError(f"{node.name}: add with alpha has no int8 TFLite form")
        self._binary(node, module, "ADD")

    def op_mul(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._binary(node, module, "MUL")

    def op_cat(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        args = _bind(torch.cat, node)
        values = [self.canonical(self.value(t, node), f"{node.name}_in{i}") for i, t in enumerate(args["tensors"])]
        rank = len(values[0].shape)
        dim = args["dim"] % rank
        if any(len(v.shape) != rank for v in values):
            raise UnsupportedError(f"{node.name}: cat of values with different ranks")
        order = values[0].order
        values = [self.physical(self.arrange(v, order, f"{node.name}_in{i}"), f"{node.name}_in{i}")
                  for i, v in enumerate(values)]
        qparams, fused, aliases = self.output_of(node, None)
        q8 = self.int8_qparams(qparams)
        inputs = []
        for i, v in enumerate(values):  # TFLite's int8 CONCATENATION needs the inputs on the output's grid
            if self.int8_qparams(v.qparams) == q8:
                inputs.append(v.tensor)
                continue
            t = self.act_tensor(f"{node.name}_requant{i}", v.stored, q8)
            self.op("QUANTIZE", [v.tensor], [t], "QuantizeOptions", self.options("QuantizeOptionsT"))
            inputs.append(t)
        out = self.new_value(node, _shape(node), qparams, perm=values[0].perm)
        opts = self.options("ConcatenationOptionsT", axis=order.index(dim), fusedActivationFunction=_ACT[fused])
        self.op("CONCATENATION", inputs, [out.tensor], "ConcatenationOptions", opts)
        self.bind(node, out, aliases)

    def op_hardswish(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        x = self.canonical(self.value(node.args[0], node), f"{node.name}_in")
        qparams, _, aliases = self.output_of(node, None, can_fuse=False)
        out = self.new_value(node, _shape(node), qparams, perm=x.perm)
        self.op("HARD_SWISH", [x.tensor], [out.tensor], "HardSwishOptions", self.options("HardSwishOptionsT"))
        self.bind(node, out, aliases)

    def _fixed(self, node: torch.fx.Node, code: str, key: str) -> None:
        x = self.canonical(self.value(node.args[0], node), f"{node.name}_in")
        qparams = self.spec.rule(key).fixed_qparams
        out = self.new_value(node, _shape(node), qparams, perm=x.perm)
        self.op(code, [x.tensor], [out.tensor])
        self.env[node] = out

    def op_sigmoid(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._fixed(node, "LOGISTIC", "sigmoid")

    def op_tanh(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._fixed(node, "TANH", "tanh")

    def op_silu(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        """SiLU as ``x * LOGISTIC(x)``: TFLite has no int8 SiLU (its converter writes the same pair); the
        sigmoid lands on LOGISTIC's fixed 1/256 grid, the product on the SiLU's calibrated grid."""
        x = self.canonical(self.value(node.args[0], node), f"{node.name}_in")
        qparams, _, aliases = self.output_of(node, None, can_fuse=False)
        gate = self.act_tensor(f"{node.name}_sigmoid", x.stored, self.int8_qparams(_SIGMOID_QPARAMS))
        self.op("LOGISTIC", [x.tensor], [gate])
        out = self.new_value(node, _shape(node), qparams, perm=x.perm)
        self.op("MUL", [x.tensor, gate], [out.tensor], "MulOptions",
                self.options("MulOptionsT", fusedActivationFunction=0))
        self.bind(node, out, aliases)

    # ---- share ops: output on the input's grid ------------------------------------------------------
    def _activation(self, node: torch.fx.Node, kind: str) -> None:
        x = self.canonical(self.value(node.args[0], node), f"{node.name}_in")
        out = self.new_value(node, _shape(node), x.qparams, perm=x.perm)
        self.op({"relu": "RELU", "relu6": "RELU6", "relu_n1_to_1": "RELU_N1_TO_1"}[kind], [x.tensor], [out.tensor])
        self.env[node] = out

    def op_relu(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._activation(node, "relu")

    def op_relu6(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._activation(node, "relu6")

    def op_hardtanh(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        kind = _activation_of(node, self.gm, self.modules)
        if kind is None:
            raise UnsupportedError(f"{node.name}: hardtanh is written only as ReLU6 (0, 6) or ReLU_N1_TO_1 (-1, 1)")
        self._activation(node, kind)

    def op_identity(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self.env[node] = self.value(node.args[0], node)

    op_contiguous = op_identity

    def _pool(self, node: torch.fx.Node, module: nn.Module | None, code: str, one_d: bool = False) -> None:
        fn = {("MAX_POOL_2D", False): F.max_pool2d, ("AVERAGE_POOL_2D", False): F.avg_pool2d,
              ("MAX_POOL_2D", True): F.max_pool1d, ("AVERAGE_POOL_2D", True): F.avg_pool1d}[code, one_d]
        if module is not None:
            args = {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "ceil_mode")}
            args["dilation"] = getattr(module, "dilation", 1)
            args["count_include_pad"] = getattr(module, "count_include_pad", True)
            args["divisor_override"] = getattr(module, "divisor_override", None)
            args["return_indices"] = getattr(module, "return_indices", False)
        else:
            args = _bind(fn, node)
        kernel = _pair(args["kernel_size"])
        stride = _pair(args["stride"] or args["kernel_size"])
        padding, dilation = _pair(args["padding"]), _pair(args.get("dilation", 1))
        if one_d:  # a 1-D pool runs as the 2-D one on the [N, 1, T, C] view
            kernel, stride, padding, dilation = (1, kernel[0]), (1, stride[0]), (0, padding[0]), (1, dilation[0])
        if dilation != (1, 1) or args.get("divisor_override") or args.get("return_indices"):
            raise UnsupportedError(f"{node.name}: pooling with dilation / divisor_override / indices has no TFLite op")
        if one_d:
            x = self._as_2d(self.value(node.args[0], node), f"{node.name}_in")
            n, c, t = _shape(node)
            out_shape = (n, c, 1, t)
        else:
            x = self.canonical(self.value(node.args[0], node), f"{node.name}_in")
            out_shape = _shape(node)
        if args.get("ceil_mode") and any(
                out_shape[2 + i] != (x.shape[2 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2)):
            raise UnsupportedError(f"{node.name}: ceil_mode=True changes the output size here; TFLite pools floor")
        if code == "MAX_POOL_2D":  # SAME max pooling ignores the padding, as PyTorch's -inf padding does
            src, pad = self._padding(node, x, kernel, stride, (1, 1), padding, out_shape, pad_value="min")
        elif args.get("count_include_pad", True):  # zeros counted in the average: explicit PAD, never SAME
            src, pad = self._padding(node, x, kernel, stride, (1, 1), padding, out_shape, "zero", same_ok=False)
        else:  # SAME average pooling leaves the padding out of the count
            src, pad = self._padding(node, x, kernel, stride, (1, 1), padding, out_shape, pad_value="none")
        out = self.new_value(node, out_shape, x.qparams)
        opts = self.options("Pool2DOptionsT", padding=pad, strideH=stride[0], strideW=stride[1],
                            filterHeight=kernel[0], filterWidth=kernel[1])
        self.op(code, [src], [out.tensor], "Pool2DOptions", opts)
        self.env[node] = self._from_2d(out) if one_d else out

    def op_max_pool2d(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._pool(node, module, "MAX_POOL_2D")

    def op_avg_pool2d(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._pool(node, module, "AVERAGE_POOL_2D")

    def op_max_pool1d(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._pool(node, module, "MAX_POOL_2D", one_d=True)

    def op_avg_pool1d(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._pool(node, module, "AVERAGE_POOL_2D", one_d=True)

    def op_adaptive_avg_pool2d(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        x = self.canonical(self.value(node.args[0], node), f"{node.name}_in")
        out_shape = _shape(node)
        if tuple(out_shape[2:]) == (1, 1):
            self._mean(node, x, [2, 3], True, out_shape)
            return
        h, w = x.shape[2:]
        oh, ow = out_shape[2:]
        if h % oh or w % ow:
            raise UnsupportedError(f"{node.name}: adaptive average pooling {h}x{w} -> {oh}x{ow} is not a fixed "
                                   "window; only a global pool (MEAN) or an exact division (AVERAGE_POOL_2D) is written")
        out = self.new_value(node, out_shape, x.qparams)
        opts = self.options("Pool2DOptionsT", padding=self.s.Padding.VALID, strideH=h // oh, strideW=w // ow,
                            filterHeight=h // oh, filterWidth=w // ow)
        self.op("AVERAGE_POOL_2D", [x.tensor], [out.tensor], "Pool2DOptions", opts)
        self.env[node] = out

    def op_adaptive_avg_pool1d(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        x = self.physical(self.value(node.args[0], node), f"{node.name}_in")
        n, c, t = _shape(node)
        if t != 1:
            raise UnsupportedError(f"{node.name}: adaptive average pooling to {t} steps; only the global pool "
                                   "(output size 1, a MEAN) is written")
        self._mean(node, x, [2], True, (n, c, t))

    def op_mean(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        x = self.canonical(self.value(node.args[0], node), f"{node.name}_in")
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        rank = len(x.shape)
        dims = list(range(rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
        self._mean(node, x, sorted(d % rank for d in dims), keep, _shape(node))

    def _mean(self, node: torch.fx.Node, x: _Value, dims: list[int], keep: bool, out_shape) -> None:
        """MEAN over the torch ``dims`` of ``x`` (read in its stored order); the result keeps that order."""
        if keep:
            perm = x.perm
        else:
            rest = [d for d in x.order if d not in dims]
            perm = tuple(sorted(rest).index(d) for d in rest)
            perm = None if perm == tuple(range(len(perm))) else perm
        out = self.new_value(node, out_shape, x.qparams, perm=perm)
        axis = self.const_i32(f"{node.name}_axes", sorted(x.order.index(d) for d in dims))
        self.op("MEAN", [x.tensor, axis], [out.tensor], "ReducerOptions",
                self.options("ReducerOptionsT", keepDims=keep))
        self.env[node] = out

    # ---- data movement: views cost no op until a reader needs the shape -----------------------------
    def _reshape(self, node: torch.fx.Node) -> None:
        x = self.value(node.args[0], node)
        out_shape = _shape(node)
        if x.nhwc and len(x.shape) in (3, 4) and len(out_shape) == 2 and out_shape[0] == x.shape[0] \
                and int(np.prod(x.shape[2:])) > 1:
            # a flatten of a spatial map (NHWC) or a sequence (NWC): written in stored order; a linear layer reading
            # it permutes its weight columns instead (other readers put it back in torch order: canonical)
            x = self.canonical(x, f"{node.name}_in")
            n, c, h, w = x.shape if len(x.shape) == 4 else (x.shape[0], x.shape[1], 1, x.shape[2])
            out = _Value(self.act_tensor(node.name, out_shape, self.int8_qparams(x.qparams)), tuple(out_shape),
                         x.qparams, None, (c, h, w))
            self.reshape_op(x.tensor, out.tensor, out_shape, node.name)
            self.env[node] = out
            return
        if x.flat_hwc is not None:
            x = self.canonical(x, f"{node.name}_in")
        plan = _reshape_plan(x.shape, x.order, out_shape)
        if plan is None:  # the storage keeps apart what the reshape merges: reshape in torch order
            in_order, out_order = tuple(range(len(x.shape))), tuple(range(len(out_shape)))
        else:
            in_order, out_order = plan
        x = self.arrange(x, in_order, f"{node.name}_in")
        norm = None if out_order == tuple(range(len(out_shape))) else tuple(out_order)
        self.env[node] = _Value(x.tensor, tuple(out_shape), x.qparams, norm, phys=x.phys or x.stored)

    def op_flatten(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._reshape(node)

    op_reshape = op_squeeze = op_unsqueeze = op_unflatten = op_flatten

    def op_transpose(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        """transpose / permute: the stored tensor stays; only the order it is read in changes."""
        x = self.value(node.args[0], node)
        if x.flat_hwc is not None:
            x = self.canonical(x, f"{node.name}_in")
        rank = len(x.shape)
        if op_key(node, self.gm) == "transpose":
            d0 = node.args[1] if len(node.args) > 1 else node.kwargs["dim0"]
            d1 = node.args[2] if len(node.args) > 2 else node.kwargs["dim1"]
            sigma = list(range(rank))
            sigma[d0 % rank], sigma[d1 % rank] = sigma[d1 % rank], sigma[d0 % rank]
        else:
            dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) \
                else node.args[1]
            dims = node.kwargs.get("dims", dims)
            sigma = [int(d) % rank for d in dims]
        if sigma[0] != 0:
            raise UnsupportedError(f"{node.name}: a transpose that moves the batch dimension is not written (the "
                                   "file keeps the batch first so that the interpreter can resize it)")
        perm = tuple(sigma.index(p) for p in x.order)
        norm = None if perm == tuple(range(rank)) else perm
        self.env[node] = _Value(x.tensor, _shape(node), x.qparams, norm, phys=x.phys)

    op_permute = op_transpose

    def _split(self, node: torch.fx.Node, key: str) -> None:
        """chunk / split as SPLIT (equal parts) or SPLIT_V on the stored axis of ``dim``."""
        x = self.canonical(self.value(node.args[0], node), f"{node.name}_in")
        rest, kw = list(node.args[1:]), node.kwargs
        parts = rest[0] if rest else kw.get("chunks", kw.get("split_size_or_sections", kw.get("split_size")))
        dim = (rest[1] if len(rest) > 1 else kw.get("dim", 0)) % len(x.shape)
        length = x.shape[dim]
        sizes = [len(p) for p in (torch.arange(length).chunk(parts) if key == "chunk"
                                  else torch.arange(length).split(parts))]
        axis = x.order.index(dim)
        values = []
        for i, size in enumerate(sizes):
            shape = list(x.shape)
            shape[dim] = size
            v = _Value(-1, tuple(shape), x.qparams, x.perm)
            tensor = self.act_tensor(f"{node.name}_{i}", v.stored, self.int8_qparams(x.qparams))
            values.append(replace(v, tensor=tensor))
        outs = [v.tensor for v in values]
        if len(set(sizes)) == 1:
            self.op("SPLIT", [self.const_i32(f"{node.name}_axis", axis), x.tensor], outs, "SplitOptions",
                    self.options("SplitOptionsT", numSplits=len(sizes)))
        else:
            self.op("SPLIT_V", [x.tensor, self.const_i32(f"{node.name}_sizes", sizes),
                                self.const_i32(f"{node.name}_axis", axis)], outs, "SplitVOptions",
                    self.options("SplitVOptionsT", numSplits=len(sizes)))
        self.env[node] = tuple(values)

    def op_chunk(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._split(node, "chunk")

    def op_split(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._split(node, "split")

    def op_getitem(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        parts = self.env.get(node.args[0])
        if not isinstance(parts, tuple) or not isinstance(node.args[1], int):
            raise UnsupportedError(f"{node.name}: indexing / slicing a tensor is not written by the tflite backend "
                                   "(only the parts of a chunk / split); use torch.chunk or torch.split")
        self.env[node] = parts[node.args[1]]

    # ---- the model ------------------------------------------------------------------------------
    def model_bytes(self) -> bytes:
        import flatbuffers  # noqa: PLC0415

        s = self.s
        sub = s.SubGraphT()
        sub.tensors, sub.operators, sub.name = self.tensors, self.operators, "main"
        sub.inputs = np.asarray(self.inputs, dtype=np.int32)
        sub.outputs = np.asarray(self.outputs, dtype=np.int32)
        info = dict(self.info, format=_FORMAT_KEY, int8_io=self.int8_io)
        buf = _AlignedBufferT()
        buf.data = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
        self.buffers.append(buf)
        md = s.MetadataT()
        md.name, md.buffer = _METADATA, len(self.buffers) - 1
        model = s.ModelT()
        model.version, model.description = 3, "fxopt full-integer export"
        model.operatorCodes, model.subgraphs, model.buffers, model.metadata = self.opcode_list, [sub], self.buffers, [md]
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=_IDENTIFIER)
        return bytes(builder.Output())


class _AlignedBufferT:
    """``BufferT`` whose data starts on a 16-byte boundary (TFLite reads int32 / float buffers in place)."""

    data: np.ndarray | None = None

    def Pack(self, builder):  # noqa: N802 - the object API's name
        s = _schema()
        vec = None
        if self.data is not None:
            raw = self.data.tobytes()
            builder.StartVector(1, len(raw), 16)
            builder.head = builder.head - len(raw)
            builder.Bytes[builder.head:builder.head + len(raw)] = raw
            vec = builder.EndVector()
        s.BufferStart(builder)
        if vec is not None:
            s.BufferAddData(builder, vec)
        return s.BufferEnd(builder)


_ACT = {None: 0, "relu": 1, "relu_n1_to_1": 2, "relu6": 3}


def _channels_last(rank: int) -> tuple[int, ...]:
    """NHWC for 4-D values, NWC for 3-D: the order TFLite's convs and pools read."""
    return (0, *range(2, rank), 1)


def _layout(v: _Value) -> str | list[int]:
    """How the module moves an input / output between torch order and the file's: plain, nhwc or a perm."""
    if v.perm is None:
        return "plain"
    return "nhwc" if len(v.shape) == 4 and v.nhwc else list(v.perm)


def _file_perm(layout: str | list[int], rank: int) -> tuple[int, ...] | None:
    if layout == "plain":
        return None
    return _NCHW_TO_NHWC if layout == "nhwc" else tuple(int(p) for p in layout)


def _collapse(shape: tuple[int, ...], moves: list[int]) -> tuple[tuple[int, ...], list[int]]:
    """The smallest transpose that moves data as ``moves`` does on ``shape`` (output axis j = input axis
    ``moves[j]``): size-1 axes dropped, input axes that stay neighbours merged, axis 0 (the batch) kept on its
    own. Returns the collapsed input shape and the permutation of it."""
    keep = [a for a in range(len(shape)) if shape[a] != 1 or a == 0]
    runs: list[list[int]] = []
    for a in (m for m in moves if m in keep):
        if runs and a != 0 and runs[-1][-1] != 0 and keep.index(a) == keep.index(runs[-1][-1]) + 1:
            runs[-1].append(a)
        else:
            runs.append([a])
    ordered = sorted(runs, key=lambda r: r[0])
    src = tuple(int(np.prod([shape[a] for a in r])) for r in ordered)
    return src, [ordered.index(r) for r in runs]


def _reshape_groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]] | None:
    """The input dims each group of output dims is made of (size-1 dims and the batch left out)."""
    a = [d for d in range(1, len(in_shape)) if in_shape[d] != 1]
    b = [d for d in range(1, len(out_shape)) if out_shape[d] != 1]
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        gi, gj, pi, pj = [a[i]], [b[j]], in_shape[a[i]], out_shape[b[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(a):
                    return None
                gi.append(a[i])
                pi, i = pi * in_shape[a[i]], i + 1
            else:
                if j >= len(b):
                    return None
                gj.append(b[j])
                pj, j = pj * out_shape[b[j]], j + 1
        groups.append((gi, gj))
    return groups if i == len(a) and j == len(b) else None


def _reshape_plan(in_shape, order, out_shape) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """How a reshape runs on a value stored in ``order`` without putting it back in torch order: the order the
    input must be stored in (``order`` itself where possible) and the order the output is then stored in.
    ``None`` when the batch changes (the reshape then runs in torch order)."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if not in_shape or not out_shape or in_shape[0] != out_shape[0] or order[0] != 0:
        return None
    groups = _reshape_groups(in_shape, out_shape)
    if groups is None:
        return None
    group_of = {d: g for g, (dims, _) in enumerate(groups) for d in dims}
    seen: list[int] = []
    for d in order:
        if d in group_of and group_of[d] not in seen:
            seen.append(group_of[d])
    core_in = [0, *[d for g in seen for d in groups[g][0]]]
    ones_in = [d for d in range(1, len(in_shape)) if in_shape[d] == 1]
    in_order = tuple(order) if [d for d in order if d not in ones_in] == core_in else tuple(core_in + ones_in)
    core_out = [0, *[d for g in seen for d in groups[g][1]]]
    ones_out = [d for d in range(1, len(out_shape)) if out_shape[d] == 1]
    rank = len(out_shape)
    candidates = [_channels_last(rank)] if rank == 4 else []
    candidates += [tuple(range(rank))] + ([_channels_last(rank)] if rank == 3 else [])
    out_order = next((c for c in candidates if [d for d in c if d not in ones_out] == core_out),
                     (0, *ones_out, *core_out[1:]))
    if not _same_memory(in_shape, in_order, out_shape, out_order):
        return None
    return in_order, tuple(out_order)


def _same_memory(in_shape, in_order, out_shape, out_order) -> bool:
    """Whether the stored input, read flat, is the stored output (checked on element indices)."""
    numel = int(np.prod(in_shape))
    if numel > 1 << 22:
        return True  # the group analysis above is exact; the index check only guards it on small values
    t = torch.arange(numel).reshape(in_shape)
    return torch.equal(t.permute(*in_order).reshape(-1), t.reshape(out_shape).permute(*out_order).reshape(-1))


def _same_matches(shape, kernel, stride, dilation, padding, out_shape) -> bool:
    """Whether TFLite's SAME padding (``ceil(in / stride)`` outputs, the odd pixel after) reads the same windows
    as PyTorch's symmetric ``padding`` for this input (NCHW ``shape``) and output size."""
    for i in range(2):
        size, k = shape[2 + i], (kernel[i] - 1) * dilation[i] + 1
        out = -(-size // stride[i])
        before = max((out - 1) * stride[i] + k - size, 0) // 2
        if out != out_shape[2 + i] or before != padding[i]:
            return False
    return True


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1] if len(v) > 1 else v[0]))


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    shape = meta.shape_of(node)
    if shape is None:
        raise UnsupportedError(f"{node.name}: no shape recorded; compile with example_inputs, e.g. "
                               "fxopt.compile(model, recipes.static_int8(data), example_inputs=(x,), backend='tflite')")
    return tuple(int(d) for d in shape)


def _bind(fn, node: torch.fx.Node) -> dict:
    """The call's arguments by name; UnsupportedError when they cannot be read."""
    try:
        return bind_args(fn, node)
    except TypeError as exc:
        raise UnsupportedError(f"{node.name}: cannot read the arguments of {getattr(fn, '__name__', fn)}: {exc}") from exc


def _fused_kind(node: torch.fx.Node, module: nn.Module | None) -> str | None:
    if not isinstance(module, FusedModule):
        return None
    return meta.fused_activation(node) or module.activation_kind


def _activation_of(node: torch.fx.Node, gm: torch.fx.GraphModule, modules: dict) -> str | None:
    """``relu`` / ``relu6`` / ``relu_n1_to_1`` for a ReLU-like node (hardtanh by its bounds), else ``None``."""
    key = op_key(node, gm)
    if key in ("relu", "relu6"):
        return key
    if key != "hardtanh":
        return None
    if node.op == "call_module":
        mod = modules[node.target]
        bounds = float(mod.min_val), float(mod.max_val)
    else:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        bounds = float(lo), float(hi)
    return {(0.0, 6.0): "relu6", (-1.0, 1.0): "relu_n1_to_1"}.get(bounds)


def _describe(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    key = op_key(node, gm)
    if key:
        return key
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


# ---- checks before writing ------------------------------------------------------------------------

def float_islands_of(gm: torch.fx.GraphModule) -> list[str]:
    """Every op of a prepared graph that is not int8 (full-integer export needs none), with its reason."""
    modules = dict(gm.named_modules())
    reasons = {i.node: i.reason for i in meta.float_islands(gm)}
    placeholders = set(gm.graph.find_nodes(op="placeholder"))
    sizes = shape_nodes(gm)
    islands = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node in sizes:
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and is_observer(module):
            continue
        if isinstance(module, QuantStub):
            if node.args[0] not in placeholders:
                islands.append(f"{node.name} (quantize): {node.args[0].name} is computed in float and re-enters "
                               "int8 here")
            continue
        if isinstance(module, DeQuantStub):
            if not all(u.op == "output" or u in sizes for u in node.users):  # x.shape reads are constants
                islands.append(f"{node.name} (dequantize): an int8 value leaves int8 for float ops mid-graph")
            continue
        if meta.quant_region(node) is None:
            why = reasons.get(node.name, "no int8 TFLite op for it")
            islands.append(f"{node.name} ({_describe(node, gm)}): runs in float: {why}"
                           f"{_UNWRITTEN.get(_describe(node, gm).lower(), '')}")
    return islands


def export_tflite(gm: torch.fx.GraphModule, spec: BackendSpec | None = None, *, int8_io: bool = False,
                  ) -> tuple[bytes, dict]:
    """The full-integer ``.tflite`` bytes of a prepared + calibrated graph and what was written (op counts)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"the tflite backend lowers an fxopt graph (torch.fx.GraphModule), got {type(gm).__name__}")
    spec = spec or tflite_spec()
    if not any(isinstance(m, QuantStub) for m in gm.modules()):
        raise UnsupportedError(
            "the tflite backend writes full-integer models, but this graph is float: prepare it with "
            "fxopt.compile(model, fxopt.recipes.static_int8(data), example_inputs=(x,), backend='tflite')")
    blind = [n for n, m in gm.named_modules() if is_observer(m) and not m.calibrated]
    if blind:
        raise CalibrationError(f"{len(blind)} observer(s) saw no data ({', '.join(blind[:5])}): run "
                               "fxopt.passes.Calibrate(data) before lowering to tflite")
    islands = float_islands_of(gm)
    if islands:
        raise UnsupportedError(
            f"a full-integer .tflite needs every op in int8, but {len(islands)} run in float:\n"
            + "\n".join(f"  {i}" for i in islands)
            + "\nRemove them (an int8-capable op instead) or prepare without fallback "
            "(recipes.static_int8(data, backend='tflite'))")
    writer = _Writer(gm, spec, int8_io)
    with torch.no_grad():
        writer.run()
    return writer.model_bytes(), dict(writer.counts)


# ---- the runtime module ---------------------------------------------------------------------------

def read_info(model_bytes: bytes) -> dict:
    """The fxopt metadata of a ``.tflite`` written by this backend."""
    s = _schema()
    if len(model_bytes) < 8 or model_bytes[4:8] != _IDENTIFIER:
        raise UnsupportedError("not a TFLite flatbuffer (no 'TFL3' identifier)")
    model = s.Model.GetRootAs(model_bytes, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() is not None and entry.Name().decode() == _METADATA:
            data = model.Buffers(entry.Buffer()).DataAsNumpy()
            info = json.loads(bytes(data).decode())
            if info.get("format") == _FORMAT_KEY:
                return info
    raise UnsupportedError("this .tflite was not written by fxopt (no 'fxopt' metadata): run it with "
                           "ai_edge_litert.interpreter.Interpreter directly")


class TFLiteModule(nn.Module):
    """Runs a ``.tflite`` in LiteRT's interpreter with the original model's call signature (NCHW, float)."""

    def __init__(self, model_bytes: bytes, threads: int | None = None) -> None:
        super().__init__()
        require("ai_edge_litert", "tflite")
        self.model_bytes = bytes(model_bytes)
        self.info = read_info(self.model_bytes)
        self.threads = int(threads) if threads else torch.get_num_threads()
        self.meta: dict = {}
        meta.set_backend(self, "tflite")
        self._interpreter = None

    @property
    def int8_io(self) -> bool:
        return bool(self.info["int8_io"])

    @property
    def input_qparams(self) -> list[tuple[float, int]]:
        return [tuple(q) for q in self.info["input_qparams"]]

    @property
    def output_qparams(self) -> list[tuple[float, int]]:
        return [tuple(q) for q in self.info["output_qparams"]]

    @property
    def interpreter(self):
        if self._interpreter is None:
            from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

            self._interpreter = Interpreter(model_content=self.model_bytes, num_threads=self.threads)
            self._interpreter.allocate_tensors()
        return self._interpreter

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        interp = self.interpreter
        details = interp.get_input_details()
        if any(tuple(d["shape"]) != a.shape for d, a in zip(details, arrays)):
            for d, a in zip(details, arrays):
                interp.resize_tensor_input(d["index"], list(a.shape))
            interp.allocate_tensors()
            details = interp.get_input_details()
        for d, a in zip(details, arrays):
            if d["dtype"] != a.dtype:
                raise TypeError(f"TFLiteModule input {d['name']} takes {np.dtype(d['dtype']).name}, got {a.dtype}")
            interp.set_tensor(d["index"], a)
        interp.invoke()
        return [interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()]

    def _to_file(self, values: list[torch.Tensor]) -> list[np.ndarray]:
        """NCHW torch tensors as the file's arrays (NHWC for 4-D inputs), transposed in numpy (see forward)."""
        arrays = []
        for v, layout in zip(values, self.info["input_layouts"]):
            a = v.detach().cpu().numpy()
            perm = _file_perm(layout, a.ndim)
            arrays.append(np.ascontiguousarray(a.transpose(*perm)) if perm is not None else a)
        return arrays

    def _from_file(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        outs = []
        for a, layout in zip(arrays, self.info["output_layouts"]):
            perm = _file_perm(layout, a.ndim)
            outs.append(torch.from_numpy(np.ascontiguousarray(a.transpose(*np.argsort(perm))) if perm is not None
                                         else a))
        return outs

    def run_int8(self, *args: torch.Tensor) -> list[torch.Tensor]:
        """The raw int8 interface of an ``int8_io`` file: int8 NCHW tensors in, int8 tensors out (a flat list)."""
        if not self.int8_io:
            raise UnsupportedError("run_int8 needs a file with int8 inputs/outputs: lower with "
                                   "fxopt.backends.TFLiteBackend(int8_io=True)")
        if any(a.dtype != torch.int8 for a in args):
            raise TypeError("run_int8 takes int8 tensors (quantize with module.input_qparams)")
        return self._from_file(self._invoke(self._to_file(list(args))))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        values = _bind_inputs(self.info["inputs"], args, kwargs, "TFLiteModule")
        arrays = self._to_file([v if v.dtype == torch.int8 else v.float() for v in values])
        if self.int8_io:
            # quantize / dequantize at the boundary, so that the module stays a float drop-in. In numpy: a torch
            # op here would wake torch's OpenMP threads, which then spin on the cores the interpreter runs on
            arrays = [a if a.dtype == np.int8 else
                      np.clip(np.rint(a / np.float32(s)) + np.float32(z), -128, 127).astype(np.int8)
                      for a, (s, z) in zip(arrays, self.input_qparams)]
        outs = self._invoke(arrays)
        if self.int8_io:
            outs = [(o.astype(np.float32) - np.float32(z)) * np.float32(s) for o, (s, z) in zip(outs, self.output_qparams)]
        return pytree.tree_unflatten(self._from_file(outs), pytree.treespec_loads(self.info["treespec"]))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_interpreter"] = None
        return state

    def __deepcopy__(self, memo: dict) -> "TFLiteModule":
        new = TFLiteModule(self.model_bytes, self.threads)
        new.meta = copy.deepcopy(self.meta, memo)
        return new

    def extra_repr(self) -> str:
        return f"int8_io={self.int8_io}, threads={self.threads}, bytes={len(self.model_bytes)}"


class TFLiteBackend(Int8Backend):
    """``backend="tflite"``: a full-integer ``.tflite`` from fxopt's calibrated graph, run by LiteRT."""

    name = "tflite"

    def __init__(self, threads: int | None = None, int8_io: bool = False, per_tensor: bool = False) -> None:
        super().__init__(tflite_spec(per_tensor))
        self.threads, self.int8_io, self.per_tensor = threads, int8_io, per_tensor

    def accepts_prepared_for(self, backend_name: str) -> bool:
        return backend_name in ("tflite", "edgetpu", "x86", "qnnpack", "onnx")

    def lower(self, gm: torch.fx.GraphModule) -> TFLiteModule:
        require("ai_edge_litert", "tflite")
        data, counts = export_tflite(gm, self.spec, int8_io=self.int8_io)
        module = TFLiteModule(data, self.threads or torch.get_num_threads())
        module.meta["ops"] = counts
        return module

    def save(self, module: nn.Module, path: str | Path) -> None:
        if not isinstance(module, TFLiteModule):
            raise UnsupportedError(f"the tflite backend saves modules it lowered (TFLiteModule), got "
                                   f"{type(module).__name__}; lower first: fxopt.lower(prepared, 'tflite')")
        path = Path(path)
        if path.suffix.lower() != ".tflite":
            raise UnsupportedError(f"a TFLite model is saved to a .tflite path, got {str(path)!r}")
        path.write_bytes(module.model_bytes)

    def load(self, path: str | Path) -> TFLiteModule:
        return TFLiteModule(Path(path).read_bytes(), self.threads)

    def __repr__(self) -> str:
        return f"TFLiteBackend(threads={self.threads}, int8_io={self.int8_io}, per_tensor={self.per_tensor})"
