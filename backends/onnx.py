"""The ``onnx`` backend: fxopt graphs as ONNX files, run in ONNX Runtime.

What ``lower(gm)`` writes, by the kind of graph it is given:

* a float graph: plain ONNX (opset 17);
* a prepared + calibrated static int8 graph (QuantStub / observers / DeQuantStub, see
  :mod:`fxopt.passes.insert_quant_stubs`): the **QDQ** format. Every observer becomes a
  ``QuantizeLinear → DequantizeLinear`` pair with *fxopt's* calibrated scale and zero point (ONNX
  Runtime does not calibrate again); conv / linear weights are per-channel int8 initializers behind a
  ``DequantizeLinear`` and conv biases int32 (scale = input scale × weight scale), which is the pattern
  ONNX Runtime's QDQ fusions turn into ``QLinearConv`` / ``QLinearMatMul``. A ReLU the x86 lowering would
  absorb gets its QDQ after it (range clamped at 0), ops that keep their input's qparams (pooling,
  reshape…) get a QDQ with those qparams after them (not inside a chain of reshapes / transposes: only its
  last op, so OpenVINO can fuse a channel shuffle), fixed-range ops (sigmoid…) their fixed qparams; for
  ONNX Runtime a SiLU becomes ``Sigmoid → QDQ → Mul`` (its QLinearSigmoid / QLinearMul kernels), and a
  linear on a [batch, seq, hidden] input (which the exporter writes as ``MatMul`` + ``Add``) becomes
  ``Reshape → Gemm (int32 bias) → Reshape`` behind QDQs, which ONNX Runtime runs as one ``QGemm``; also for
  ONNX Runtime, a ReLU / ReLU6 whose QuantizeLinear already saturates at its bounds is left out, and
  ``chunk``'s split points are constants (ONNX Runtime then runs one ``Split``). For
  OpenVINO a conv / linear read only by an activation its CPU plugin fuses as a post-op (SiLU, sigmoid,
  hardswish, GELU…) gets no QDQ before it (one requantization, after the activation, as NNCF places it), and
  an activation range whose zero point is within 8 of 128 is written symmetric (zero point 128: s8 there);
  attention's scores and softmax probabilities get no QDQ and q / k / v stay on their projection's output grid,
  written symmetric (one rounding: the plugin's fused int8 attention, NNCF's placement);
* an FP16 graph (:class:`fxopt.quant.fp16.FP16Module` wrappers): float16 weight initializers, each read
  through a ``Cast`` to float32;
* dynamic int8 (:class:`fxopt.quant.dynamic.DynamicLinear`): ``DynamicQuantizeLinear → MatMulInteger``
  with the stored per-channel int8 weights, then the float rescale and bias; a dynamic LSTM as one
  ``com.microsoft.DynamicQuantizeLSTM`` per layer for ONNX Runtime, a dynamic GRU (and an LSTM for other
  runtimes) unrolled over the example's time steps (see :class:`_DynamicRNNExport`).

Sizes the model reads (``x.size(d)``) are constants for every dimension but the dynamic batch, and a
``Shape`` reads a tensor before its ``DequantizeLinear``. A graph from the export frontend (``torch.export``,
e.g. a Hugging Face BERT) keeps every dimension ``torch.export`` kept symbolic dynamic in the file (batch and
sequence length), its size reads traced as ``Shape`` ops instead of the example's numbers. ``onnx.checker`` runs on every export. The returned :class:`OnnxModule` runs the file in an
``onnxruntime.InferenceSession`` on the CPU with ``threads`` intra-op threads (``torch.get_num_threads()``
read at lowering unless the backend was built with ``OnnxBackend(threads=n)``), takes the same arguments
as the original model (any batch size: dimension 0 of every input and output is dynamic) and returns the
same output structure. ``fxopt.save(module, "m.onnx")`` writes the exact bytes the session runs;
``fxopt.load`` rebuilds the module from them.

The export goes through ``torch.onnx.export(dynamo=False)``: ``torch.export`` cannot trace the
fake-quantize ops that carry the QDQ pairs.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import operator
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from fxopt import meta
from fxopt.errors import UnsupportedError
from fxopt.graph_utils import is_observer
from fxopt.quant.nn.fp16 import FP16Module
from fxopt.quant.spec import fused_activation_qparams
from fxopt.quant.stubs import DeQuantStub, QuantStub

from ._lower_ops import weight_qparams
from .lowering import Int8Backend
from .spec import BackendSpec, matmul_ops, op_key
from .x86 import x86_spec

__all__ = ["OnnxBackend", "OnnxModule", "onnx_spec", "export_onnx", "example_inputs_of", "require"]

logger = logging.getLogger(__name__)

OPSET = 17
_FORMAT_KEY = "fxopt.onnx.v1"
_CONV_KEYS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d}
_ABSORBED = {"relu": "relu", "relu6": "relu6", "hardtanh": "relu6"}
_MULTI_OUTPUT = {"chunk", "split"}
_NO_QDQ_AFTER = {"identity", "size", "contiguous"}
# pure data movement: the values (and their int8 grid) pass through unchanged
_MOVES = {"reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "identity"}
_SHAPE_ONLY = {"size"}
# activations OpenVINO's CPU plugin fuses into the conv / FullyConnected before them (eltwise post-ops)
_OV_POST_OPS = {"silu", "sigmoid", "hardswish", "hardsigmoid", "tanh", "gelu"}
# OpenVINO: u8 activation zero points this close to 128 become 128 (a symmetric range, s8 in the CPU plugin);
# the scale widens by at most 1.07x. 16 (1.13x) measured no faster and cost the encoder 0.7 dB
_SYMMETRIC_WINDOW = 8


def require(module: str, extra: str) -> Any:
    """Import an optional runtime, or raise :class:`UnsupportedError` with the pip command."""
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UnsupportedError(
            f"the {extra!r} backend needs the {module!r} package, which is not installed: "
            f"pip install 'fxopt[{extra}]'") from exc


def onnx_spec() -> BackendSpec:
    """What ONNX Runtime runs in int8 from a QDQ graph: the x86 table and its qspecs (u8 activations,
    s8 symmetric per-channel weights, ORT's preferred U8S8 format), plus matmul between two activations
    (attention: QDQ on both operands), under the name ``onnx``."""
    spec = x86_spec()
    return BackendSpec(name="onnx", engine=spec.engine, activation=spec.activation, weight=spec.weight,
                       weight_per_tensor=spec.weight_per_tensor, ops={**spec.ops, **matmul_ops()},
                       notes=("QDQ format; ONNX Runtime fuses DQ→op→Q into QLinear* kernels",),
                       max_range_ratio=spec.max_range_ratio)


# ---- example inputs ----------------------------------------------------------------------------

def example_inputs_of(gm: torch.fx.GraphModule) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Placeholder names and example tensors rebuilt from the shapes ``compile(example_inputs=...)`` recorded."""
    names, args = [], []
    for node in gm.graph.find_nodes(op="placeholder"):
        tm = meta.tensor_meta(node) or node.meta.get("val")
        shape, dtype = getattr(tm, "shape", None), getattr(tm, "dtype", None)
        if shape is None and isinstance(tm, (list, tuple)):  # TensorMetadata is a tuple too, with a shape
            raise UnsupportedError(
                f"input {node.name!r} is a list ({len(tm)} items; torchvision detectors take a list of images), and "
                f"the ONNX and OpenVINO exports take tensor inputs only. Export the tensor part, e.g. "
                f"fxopt.compile(model.backbone, ...), or run the whole model int8 with backend='x86' or 'qnnpack'")
        if shape is None or dtype is None:
            raise UnsupportedError(
                f"exporting to ONNX needs the input shapes, but input {node.name!r} has none recorded: compile "
                f"the model with example_inputs, e.g. fxopt.compile(model, passes, example_inputs=(x,), backend=...)")
        names.append(node.name)
        shape = [int(d) for d in shape]
        gen = torch.Generator().manual_seed(0)
        args.append(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point
                    else torch.zeros(shape, dtype=dtype))
    return names, tuple(args)


# ---- the graph to export -----------------------------------------------------------------------

def _qdq(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize→dequantize in float; exported as QuantizeLinear→DequantizeLinear."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


torch.fx.wrap("_qdq")


class _QDQWeight(nn.Module):
    """A weight read through per-channel (or per-tensor) fake quantization: Q(W)→DQ in the export."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.register_buffer("scale", scale.float().reshape(-1))
        self.register_buffer("zero_point", zero_point.to(torch.int32).reshape(-1))
        self.qmin, self.qmax = qmin, qmax

    def forward(self) -> torch.Tensor:
        if self.scale.numel() == 1:
            return torch.fake_quantize_per_tensor_affine(self.weight, float(self.scale), int(self.zero_point),
                                                         self.qmin, self.qmax)
        return torch.fake_quantize_per_channel_affine(self.weight, self.scale, self.zero_point, 0,
                                                      self.qmin, self.qmax)


def _is_prepared(gm: torch.fx.GraphModule) -> bool:
    return any(isinstance(m, QuantStub) for m in gm.modules())


class _QDQBuilder:
    """Rewrites a copy of a prepared, calibrated graph into its QDQ float simulation (see the module doc)."""

    def __init__(self, gm: torch.fx.GraphModule, spec: BackendSpec, float_outputs: bool = True) -> None:
        self.gm = gm
        self.spec = spec
        self.float_outputs = float_outputs
        self.config = meta.quant_config(gm)
        self.act = self.config.activation_spec if self.config is not None else spec.activation
        self.modules = dict(gm.named_modules())
        self.qparams: dict[torch.fx.Node, tuple[float, int]] = {}
        self.stats = {"qdq": 0, "int8_weights": 0}
        self.fused: dict[torch.fx.Node, str] = {}  # conv/linear + activation rewritten as functional calls
        # ONNX Runtime has QLinearSigmoid and QLinearMul but no int8 SiLU: without a QDQ between its Sigmoid and
        # Mul a SiLU runs in float (efficientnet: 49 float Sigmoid+Mul pairs). OpenVINO runs the float SiLU
        # as one fused eltwise, where the extra rounding would only cost time.
        sigmoid = spec.rule("sigmoid")
        self.split_silu = spec.name == "onnx" and sigmoid is not None and sigmoid.kind == "fixed"
        # OpenVINO's CPU plugin runs an activation after a conv / linear as a post-op of the int8 kernel and wants
        # one quantization, after the activation (NNCF's placement): a QDQ between them is a second requantization
        # post-op in every such kernel (efficientnet_b0: 65 of them, ~5 % of its CPU time) and a rounding fxopt's own
        # x86 lowering does not have either (it fuses conv + SiLU).
        self.float_into_activation = spec.name == "openvino"
        # OpenVINO's low-precision transformations run a FakeQuantize whose range is symmetric ([-128, 127] steps)
        # as s8 without a zero point: FullyConnected / MVN / eltwise kernels then skip the zero-point subtraction
        # (the encoder's linears ran u8 + zero point, NNCF's symmetric ranges i8)
        self.snap_symmetric = spec.name == "openvino" and (self.act.qmin, self.act.qmax) == (0, 255)
        # OpenVINO's CPU plugin runs attention (MatMul → scale → Softmax → MatMul) as one int8 Subgraph when q, k
        # and v enter it int8 without zero points (NNCF's placement): the scores q @ kᵀ and the softmax
        # probabilities stay float inside that kernel (no QDQ on them), and q / k / v are rounded once, on the
        # projection's output range written symmetric, which the reshapes / permutes / indexing between carry
        # as int8 (a second QDQ on each operand's own range cost 0.5 dB and a FakeQuantize layer per operand)
        self.ov_attention = spec.name == "openvino" and spec.rule("matmul") is not None

    def _insert_qdq(self, node: torch.fx.Node, qparams: tuple[float, int],
                    qrange: tuple[int, int] | None = None) -> torch.fx.Node:
        qmin, qmax = qrange or (self.act.qmin, self.act.qmax)
        if qrange is None and self.snap_symmetric:
            qparams = _near_symmetric(qparams)
        with self.gm.graph.inserting_after(node):
            qdq = self.gm.graph.call_function(_qdq, (node, qparams[0], qparams[1], qmin, qmax))
        node.replace_all_uses_with(qdq, delete_user_cb=lambda user: user is not qdq)
        self.qparams[qdq] = qparams
        self.stats["qdq"] += 1
        return qdq

    def _weight(self, weight: torch.Tensor, key: str) -> _QDQWeight:
        rule = self.spec.rule(key)
        per_channel = bool(rule and rule.per_channel) and (self.config is None or self.config.per_channel)
        scale, zp = weight_qparams(weight, per_channel, self.spec, self.config)
        wspec = self.config.weight_spec if self.config is not None else self.spec.weight
        self.stats["int8_weights"] += 1
        return _QDQWeight(weight, scale, zp, wspec.qmin, wspec.qmax)

    def _add_module(self, base: str, module: nn.Module) -> str:
        name, i = base.replace(".", "_"), 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base.replace('.', '_')}_{i}"
        self.gm.add_submodule(name, module)
        return name

    def _weighted(self, node: torch.fx.Node, key: str) -> None:
        """Conv / linear: read the weight through a _QDQWeight, as a functional call."""
        graph = self.gm.graph
        if node.op == "call_module":
            module = self.modules[node.target]
            inner = getattr(module, "conv", None) or getattr(module, "linear", None) or module
            activation = getattr(module, "activation", None) if inner is not module else None
            if getattr(inner, "padding_mode", "zeros") != "zeros":
                return  # kept float (its weight stays float too)
            wname = self._add_module(f"{node.target}_qweight", self._weight(inner.weight, key))
            with graph.inserting_before(node):
                w = graph.call_module(wname, ())
                b = graph.get_attr(self._add_bias(node.target, inner.bias)) if inner.bias is not None else None
                if key == "linear":
                    out = graph.call_function(F.linear, (node.args[0], w, b))
                else:
                    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[_CONV_KEYS[key]]
                    out = graph.call_function(fn, (node.args[0], w, b, inner.stride, inner.padding,
                                                   inner.dilation, inner.groups))
                if activation is not None:
                    relu6 = isinstance(activation, nn.ReLU6)
                    out = graph.call_function(F.relu6 if relu6 else F.relu, (out,))
                    self.fused[out] = "relu6" if relu6 else "relu"
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            return
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            return
        tensor = self.gm.get_parameter(weight.target) if _has_param(self.gm, weight.target) \
            else getattr(self.gm, weight.target)
        wname = self._add_module(f"{weight.target}_qweight", self._weight(tensor, key))
        with graph.inserting_before(node):
            w = graph.call_module(wname, ())
        node.replace_input_with(weight, w)

    def _add_bias(self, target: str, bias: torch.Tensor) -> str:
        name = f"{target.replace('.', '_')}_bias"
        while hasattr(self.gm, name):
            name += "_"
        self.gm.register_buffer(name, bias.detach().float().clone())
        return name

    def run(self) -> torch.fx.GraphModule:
        graph = self.gm.graph
        for node in list(graph.nodes):
            if node.op == "call_module":
                module = self.modules.get(node.target)
                if isinstance(module, (QuantStub, DeQuantStub)):
                    continue  # identities: nothing in the export
                if module is not None and is_observer(module):
                    self._observer(node, module)
                    continue
            if meta.quant_region(node) is None or node.op not in ("call_module", "call_function", "call_method"):
                continue
            key = op_key(node, self.gm)
            rule = self.spec.rule(key)
            if rule is None:
                continue
            if rule.kind == "compute" and (key in _CONV_KEYS or key == "linear"):
                self._weighted(node, key)
            elif key == "silu" and self.split_silu:
                self._silu(node)
            elif rule.kind == "fixed":
                self._insert_qdq(node, rule.fixed_qparams)
            elif rule.kind == "share":
                src = next((a for a in node.all_input_nodes if a in self.qparams), None)
                if src is None:
                    continue
                if key in _MULTI_OUTPUT or key in _NO_QDQ_AFTER or self._feeds_moves_only(node, key):
                    self.qparams[node] = self.qparams[src]
                else:
                    self._insert_qdq(node, self.qparams[src])
        self.gm.delete_all_unused_submodules()
        graph.lint()
        self.gm.recompile()
        return self.gm

    def _silu(self, node: torch.fx.Node) -> None:
        """``silu(x)`` → ``x * QDQ(sigmoid(x))`` with the sigmoid's fixed qparams (its output observer stays)."""
        graph = self.gm.graph
        x = node.args[0] if node.args else node.kwargs.get("input")
        with graph.inserting_before(node):
            gate = graph.call_function(torch.sigmoid, (x,))
            out = graph.call_function(torch.mul, (x, gate))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        self._insert_qdq(gate, self.spec.rule("sigmoid").fixed_qparams)
        self.stats["split_silu"] = self.stats.get("split_silu", 0) + 1

    def _feeds_moves_only(self, node: torch.fx.Node, key: str) -> bool:
        """A reshape / transpose… whose users only move data further: its QDQ would repeat the same qparams
        on the same values, and a QDQ inside a Reshape→Transpose→Reshape channel shuffle keeps OpenVINO from
        fusing it into ShuffleChannels. The users are looked at through ops that never get a QDQ (identity,
        contiguous: their users decide), so the last move of a chain always keeps its QDQ."""
        if key not in _MOVES:
            return False
        users, todo = [], list(node.users)
        while todo:
            user = todo.pop()
            ukey = op_key(user, self.gm) if user.op in ("call_module", "call_function", "call_method") else None
            if ukey in _SHAPE_ONLY:
                continue
            if ukey in _NO_QDQ_AFTER and meta.quant_region(user) is not None:
                todo.extend(user.users)
                continue
            users.append((user, ukey))
        return bool(users) and all(meta.quant_region(u) is not None and k in _MOVES - _NO_QDQ_AFTER
                                   for u, k in users)

    def _observer(self, node: torch.fx.Node, module: nn.Module) -> None:
        scale, zp = module.calculate_qparams()
        qparams = float(torch.as_tensor(scale).reshape(-1)[0]), int(torch.as_tensor(zp).reshape(-1)[0])
        src = node.args[0]
        only_output = self.float_outputs and all(self._is_output_exit(u) for u in node.users)
        producer = self.modules.get(src.target) if src.op == "call_module" else None
        is_stub = isinstance(producer, QuantStub)
        no_qdq = self._ov_attention_without_qdq(node, module, src) if self.ov_attention else None
        # attention's q / k / v for OpenVINO: one symmetric grid, the projection's (see __init__)
        symmetric = self.ov_attention and module.spec.dtype == self.act.dtype and self._feeds_operands_only(node)
        node.replace_all_uses_with(src)
        self.gm.graph.erase_node(node)
        if only_output:  # the model's own output: the runtime's int8 op writes it in float, no rounding
            self.stats["float_outputs"] = self.stats.get("float_outputs", 0) + 1
            return
        if no_qdq is not None:
            self.stats[no_qdq] = self.stats.get(no_qdq, 0) + 1
            return
        if self.float_into_activation and self._feeds_activations_only(src):
            self.stats["float_into_activation"] = self.stats.get("float_into_activation", 0) + 1
            return
        fused = self.fused.get(src) or _activation_name(getattr(producer, "activation", None))
        if fused is not None:
            qparams = fused_activation_qparams(self.act, qparams, fused)
        if symmetric:
            qparams = _symmetric(qparams, self.act.qmin, self.act.qmax)
        if module.spec.dtype != self.act.dtype:  # a matmul operand's own (signed, symmetric) qspec
            self._insert_qdq(src, qparams, module.spec.qrange)
            return
        act = None if is_stub or len(src.users) != 1 else self._absorbable_after(src)
        if act is not None:
            follower = next(iter(src.users))
            self._insert_qdq(follower, fused_activation_qparams(self.act, qparams, act))
            return
        self._insert_qdq(src, qparams)

    def _ov_attention_without_qdq(self, node: torch.fx.Node, module: nn.Module, src: torch.fx.Node) -> str | None:
        """Why this observer gets no QDQ in OpenVINO's attention placement (``None``: it gets one): the softmax
        probabilities going into ``weights @ v``, the scores ``q @ kᵀ`` leaving int8 for the float scale and
        softmax, or an operand of q @ kᵀ / weights @ v that already is int8 on a symmetric grid."""
        if module.spec.dtype != self.act.dtype:  # a matmul operand's observer (its own signed qspec)
            inner = src.args[0] if isinstance(self.modules.get(src.target), QuantStub) else src
            if _is_softmax(inner, self.gm):
                return "float_attention_probs"
            carried = self._quantized_before(inner)
            if carried is not None and carried[1] == (self.act.qmin + self.act.qmax + 1) // 2:
                return "operand_on_projection_grid"
            return None
        if src.op != "placeholder" and op_key(src, self.gm) == "matmul" and \
                all(self._is_dequant(u) for u in node.users):
            return "float_attention_scores"
        return None

    def _quantized_before(self, node: torch.fx.Node) -> tuple[float, int] | None:
        """The qparams ``node``'s values already carry: found through data moves, indexing and stubs back to a
        QDQ this builder wrote."""
        while node not in self.qparams:
            module = self.modules.get(node.target) if node.op == "call_module" else None
            key = op_key(node, self.gm) if node.op in ("call_module", "call_function", "call_method") else None
            if not (isinstance(module, (QuantStub, DeQuantStub)) or key in _MOVES or key == "getitem") or not node.args:
                return None
            node = node.args[0]
        return self.qparams[node]

    def _is_dequant(self, node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.modules.get(node.target), DeQuantStub)

    def _feeds_operands_only(self, node: torch.fx.Node) -> bool:
        """Every reader of ``node``, looked at through data moves (reshape, permute, indexing…) and quant /
        dequant stubs, is a matmul operand's own observer."""
        seen, todo, found = set(), list(node.users), False
        while todo:
            user = todo.pop()
            if user in seen:
                continue
            seen.add(user)
            module = self.modules.get(user.target) if user.op == "call_module" else None
            if module is not None and is_observer(module):
                if module.spec.dtype == self.act.dtype:
                    return False
                found = True
                continue
            key = op_key(user, self.gm) if user.op in ("call_module", "call_function", "call_method") else None
            if isinstance(module, (QuantStub, DeQuantStub)) or key in _MOVES or key == "getitem":
                todo.extend(user.users)
                continue
            return False
        return found

    def _feeds_activations_only(self, src: torch.fx.Node) -> bool:
        """A conv / linear whose every reader is an activation OpenVINO fuses into it as a post-op (looked at
        through DeQuantStubs: a float activation between two int8 regions counts too)."""
        if src.op != "call_function" or src.target not in (*_CONV_FUNCS, F.linear):
            return False
        users, todo = [], list(src.users)
        while todo:
            user = todo.pop()
            if user.op == "call_module" and isinstance(self.modules.get(user.target), DeQuantStub):
                todo.extend(user.users)
                continue
            users.append(user)
        return bool(users) and all(user.args and user.args[0] in (src, *src.users) and _post_op_key(user, self.gm)
                                   in _OV_POST_OPS for user in users)

    def _is_output_exit(self, user: torch.fx.Node) -> bool:
        """A DeQuantStub whose value goes straight to the graph output."""
        module = self.modules.get(user.target) if user.op == "call_module" else None
        return isinstance(module, DeQuantStub) and all(u.op == "output" for u in user.users)

    def _absorbable_after(self, src: torch.fx.Node) -> str | None:
        user = next(iter(src.users))
        if meta.quant_region(user) is None or not user.args or user.args[0] is not src:
            return None
        key = op_key(user, self.gm)
        if key == "hardtanh":
            mod = self.modules.get(user.target) if user.op == "call_module" else None
            if mod is None or (float(mod.min_val), float(mod.max_val)) != (0.0, 6.0):
                return None
        return _ABSORBED.get(key)


def _is_softmax(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in (torch.softmax, F.softmax, torch.Tensor.softmax)
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Softmax)


def _symmetric(qparams: tuple[float, int], qmin: int, qmax: int) -> tuple[float, int]:
    """The zero point moved to the middle of ``[qmin, qmax]``, the scale widened to keep both calibrated ends."""
    scale, zp = qparams
    mid = (qmin + qmax + 1) // 2
    return scale * max((zp - qmin) / (mid - qmin), (qmax - zp) / (qmax - mid)), mid


def _near_symmetric(qparams: tuple[float, int]) -> tuple[float, int]:
    """u8 qparams whose zero point is within ``_SYMMETRIC_WINDOW`` of 128 → zero point 128, the scale widened
    to keep both ends of the calibrated range (at most 1.07× coarser); others unchanged."""
    if abs(qparams[1] - 128) > _SYMMETRIC_WINDOW:
        return qparams
    return _symmetric(qparams, 0, 255)


def _post_op_key(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
    """The op key of an activation (``gelu`` too, which the int8 tables have no key for: it stays float)."""
    if (node.op == "call_function" and node.target is F.gelu) or \
            (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.GELU)):
        return "gelu"
    return op_key(node, gm) if node.op in ("call_module", "call_function", "call_method") else None


def _activation_name(module: Any) -> str | None:
    if isinstance(module, nn.ReLU6):
        return "relu6"
    return "relu" if isinstance(module, nn.ReLU) else None


def _has_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


# ---- dynamic int8 and fp16 ---------------------------------------------------------------------

class _DynamicLinearFn(torch.autograd.Function):
    """``DynamicQuantizeLinear → MatMulInteger → Cast → Mul → Add`` in the export; the real kernel when run."""

    @staticmethod
    def forward(ctx, x, w_t, w_scale, bias):  # noqa: ARG004 - shapes only: the export reads the symbolic
        y = x @ (w_t.float() * w_scale)
        return y if bias is None else y + bias

    @staticmethod
    def symbolic(g, x, w_t, w_scale, bias):
        xq, x_scale, x_zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        n_out = w_t.type().sizes()[1]
        w_zp = g.op("Constant", value_t=torch.zeros(n_out, dtype=torch.int8))
        acc = g.op("MatMulInteger", xq, w_t, x_zp, w_zp)
        y = g.op("Cast", acc, to_i=1)  # FLOAT
        y = g.op("Mul", y, g.op("Mul", x_scale, w_scale))
        if bias is not None and not (hasattr(bias, "node") and bias.node().mustBeNone()):
            y = g.op("Add", y, bias)
        return y


def _int8_operands(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MatMulInteger's operands of a ``qint8`` weight [out, in]: the int8 matrix transposed, one scale per column."""
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale = w.q_per_channel_scales().float()
    else:
        scale = torch.full((w.shape[0],), float(w.q_scale()))
    return w.int_repr().t().contiguous(), scale


class _DynamicLinearExport(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        from fxopt.quant.nn.dynamic import unpack_linear  # noqa: PLC0415

        w, b = unpack_linear(module._packed, module.dtype)
        w_t, scale = _int8_operands(w)
        self._inner = (module,)  # not a submodule: the export must not see its packed weights
        self.register_buffer("w_t", w_t)
        self.register_buffer("w_scale", scale)
        self.register_buffer("bias", None if b is None else b.detach().float())

    def forward(self, x):
        if not torch.jit.is_tracing():
            return self._inner[0](x)
        return _DynamicLinearFn.apply(x, self.w_t, self.w_scale, self.bias)


class _FP16LinearExport(nn.Module):
    """A linear with fp16 weights (``DynamicLinear(dtype=float16)``) as float math on fp16-rounded weights."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        from fxopt.quant.nn.dynamic import unpack_linear  # noqa: PLC0415

        w, b = unpack_linear(module._packed, module.dtype)
        self.weight = nn.Parameter(w.detach().to(torch.float16).float(), requires_grad=False)
        self.bias = None if b is None else nn.Parameter(b.detach().float(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _RNNMatrix(nn.Module):
    """One ``W_ih`` / ``W_hh`` of a dynamic RNN in the export: int8 → ``DynamicQuantizeLinear → MatMulInteger``
    (the activation quantized per call over its own range, as PyTorch's dynamic kernel does), fp16 → a float
    MatMul on the fp16-rounded weight (PyTorch's fp16 kernel: fp16 weights, fp32 activations)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.int8 = weight.is_quantized
        if self.int8:
            w_t, scale = _int8_operands(weight)
            self.register_buffer("w_t", w_t)
            self.register_buffer("w_scale", scale)
        else:
            self.register_buffer("weight", weight.detach().to(torch.float16).float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x):
        if self.int8:
            return _DynamicLinearFn.apply(x, self.w_t, self.w_scale, self.bias)
        return F.linear(x, self.weight, self.bias)


def _missing(g):
    """An omitted optional input of an ONNX node."""
    none = g.op("prim::Constant")
    none.setType(torch._C.OptionalType.ofTensor())
    return none


class _DynamicQuantizeLSTMFn(torch.autograd.Function):
    """One LSTM layer as ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM`` (int8 W / R with per-row scales,
    X and h quantized dynamically inside the kernel); the forward only gives the export its output shapes."""

    @staticmethod
    def forward(ctx, x, w, r, b, w_scale, w_zp, r_scale, r_zp, h0, c0, hidden, directions):  # noqa: ARG004
        steps, batch = x.shape[0], x.shape[1]
        return (x.new_zeros(steps, directions, batch, hidden), x.new_zeros(directions, batch, hidden),
                x.new_zeros(directions, batch, hidden))

    @staticmethod
    def symbolic(g, x, w, r, b, w_scale, w_zp, r_scale, r_zp, h0, c0, hidden, directions):
        return g.op("com.microsoft::DynamicQuantizeLSTM", x, w, r, b, _missing(g), h0, c0, _missing(g),
                    w_scale, w_zp, r_scale, r_zp, hidden_size_i=hidden,
                    direction_s="bidirectional" if directions == 2 else "forward", outputs=3)


def _onnx_gates(t: torch.Tensor) -> torch.Tensor:
    """PyTorch's LSTM gate blocks (i, f, g, o) in ONNX's order (i, o, f, c) along dim 0."""
    i, f, g, o = t.chunk(4, 0)
    return torch.cat([i, o, f, g], 0)


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 rows, scale per row, int8 zero point per row) of a stored RNN matrix; an fp16 one (fxopt keeps the
    first layer's input projection fp16) is quantized per row, symmetric, for the int8-only ONNX kernel."""
    if weight.is_quantized:
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            return (weight.int_repr(), weight.q_per_channel_scales().float(),
                    weight.q_per_channel_zero_points().to(torch.int8))
        rows = weight.shape[0]
        return (weight.int_repr(), torch.full((rows,), float(weight.q_scale())),
                torch.full((rows,), int(weight.q_zero_point()), dtype=torch.int8))
    w = weight.float()
    scale = w.abs().amax(1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale, torch.zeros_like(scale, dtype=torch.int8)


class _DynamicRNNExport(nn.Module):
    """``DynamicLSTM`` / ``DynamicGRU`` for ONNX (outside the export it runs the module itself).

    * LSTM for ONNX Runtime (``fused=True``): one ``com.microsoft.DynamicQuantizeLSTM`` per layer (both
      directions in one node), int8 W / R with fxopt's per-row scales, X and h quantized dynamically inside the
      kernel; measured ~10x faster in ONNX Runtime than the unrolled form (see the README). fxopt's fp16 input
      projection of the first layer is quantized per row to int8 there (the kernel takes int8 weights only).
    * GRU (ONNX Runtime has no quantized GRU kernel), and LSTM for other runtimes: unrolled over the example's
      time steps with the semantics of PyTorch's CPU kernel that fxopt's module runs: each layer's input
      projection over the whole sequence at once (one dynamic quantization of the layer input), then per step the
      hidden state quantized over its own range into ``MatMulInteger`` with ``W_hh``, gates in float. The
      sequence length is then fixed at the example's.

    Layers, both directions, ``batch_first``, ``bias=False`` and initial states follow ``nn.LSTM`` / ``nn.GRU``.
    """

    def __init__(self, module: nn.Module, fused: bool) -> None:
        super().__init__()
        from fxopt.quant.nn.dynamic import unpack_linear  # noqa: PLC0415

        self._inner = (module,)
        self.mode, self.batch_first = module.mode, module.batch_first
        self.num_layers, self.hidden_size = module.num_layers, module.hidden_size
        self.directions = 2 if module.bidirectional else 1
        self.fused = fused and self.mode == "LSTM"
        weights = {name: unpack_linear(packed, store)[0] for name, packed, store in module._packed}
        biases = {name: module._biases[name] if module.bias else None for name in weights}
        self.matrices = nn.ModuleDict()
        if not self.fused:
            for name, weight in weights.items():
                self.matrices[name] = _RNNMatrix(weight, biases[name])
            return
        for layer in range(self.num_layers):
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("w", "r", "b", "ws", "wz", "rs", "rz")}
            for d in range(self.directions):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                for kind, key in (("ih", "w"), ("hh", "r")):
                    q, scale, zp = _int8_rows(weights[f"{kind}{suffix}"])
                    parts[key].append(_onnx_gates(q).t().contiguous())  # [in, 4H]
                    parts[key + "s"].append(_onnx_gates(scale))
                    parts[key + "z"].append(_onnx_gates(zp))
                zeros = torch.zeros(4 * self.hidden_size)
                b_ih, b_hh = biases[f"ih{suffix}"], biases[f"hh{suffix}"]
                parts["b"].append(torch.cat([_onnx_gates(b_ih if b_ih is not None else zeros),
                                             _onnx_gates(b_hh if b_hh is not None else zeros)]))
            for key, tensors in parts.items():
                self.register_buffer(f"{key}{layer}", torch.stack(tensors))

    def forward(self, input, hx=None):
        if not torch.jit.is_tracing():
            return self._inner[0](input, hx)
        if not isinstance(input, torch.Tensor) or input.dim() != 3:
            raise UnsupportedError("the ONNX export of a dynamic LSTM / GRU takes a batched 3-D tensor input "
                                   "(no PackedSequence, no unbatched 2-D input)")
        x = input.transpose(0, 1) if self.batch_first else input  # [T, B, F]
        lstm = self.mode == "LSTM"
        if hx is None:
            zeros = x.new_zeros((self.num_layers * self.directions, x.shape[1], self.hidden_size))
            states = (zeros, zeros) if lstm else (zeros,)
        else:
            states = tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)
        run = self._fused_layer if self.fused else self._unrolled_layer
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            k = slice(layer * self.directions, (layer + 1) * self.directions)
            x, h, c = run(layer, x, states[0][k], states[1][k] if lstm else None)
            h_n.append(h)
            c_n.append(c)
        out = x.transpose(0, 1) if self.batch_first else x
        h_n = torch.cat(h_n)
        return (out, (h_n, torch.cat(c_n))) if lstm else (out, h_n)

    def _fused_layer(self, layer, x, h0, c0):
        b = {k: getattr(self, f"{k}{layer}") for k in ("w", "r", "b", "ws", "wz", "rs", "rz")}
        y, h, c = _DynamicQuantizeLSTMFn.apply(x, b["w"], b["r"], b["b"], b["ws"], b["wz"], b["rs"], b["rz"],
                                               h0, c0, self.hidden_size, self.directions)
        return y.transpose(1, 2).flatten(2), h, c  # [T, D, B, H] -> [T, B, D * H]

    def _unrolled_layer(self, layer, x, h0, c0):
        outs, h_n, c_n = [], [], []
        for d in range(self.directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            proj = self.matrices[f"ih{suffix}"](x)  # [T, B, G * H]: the whole sequence at once
            h, c = h0[d], c0[d] if c0 is not None else None
            steps = list(range(x.shape[0]))
            ys = [None] * len(steps)
            for t in (reversed(steps) if d else steps):
                hh = self.matrices[f"hh{suffix}"](h)
                if self.mode == "LSTM":
                    i, f, g, o = (proj[t] + hh).split(self.hidden_size, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:
                    ir, iz, in_ = proj[t].split(self.hidden_size, 1)
                    hr, hz, hn = hh.split(self.hidden_size, 1)
                    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                    h = (1 - z) * torch.tanh(in_ + r * hn) + z * h
                ys[t] = h
            outs.append(torch.stack(ys))
            h_n.append(h)
            c_n.append(c)
        y = outs[0] if self.directions == 1 else torch.cat(outs, 2)
        return y, torch.stack(h_n), torch.stack(c_n) if c0 is not None else None


def _export_ready(gm: nn.Module, spec: BackendSpec, float_outputs: bool = True) -> tuple[nn.Module, str]:
    """A copy of ``gm`` in the form that exports (QDQ simulation, dynamic-linear symbolics) and its kind."""
    from fxopt.quant.nn import dynamic  # noqa: PLC0415
    from fxopt.quant.nn.dynamic_rnn import DynamicRNN  # noqa: PLC0415

    work = copy.deepcopy(gm)
    if isinstance(work, torch.fx.GraphModule):
        _static_sizes(work)
    if isinstance(work, torch.fx.GraphModule) and _is_prepared(work):
        blind = [n for n, m in work.named_modules() if is_observer(m) and not m.calibrated]
        if blind:
            from fxopt.errors import CalibrationError  # noqa: PLC0415

            raise CalibrationError(f"{len(blind)} observer(s) saw no data ({', '.join(blind[:5])}): run "
                                   "fxopt.passes.Calibrate(data) before lowering to ONNX")
        return _QDQBuilder(work, spec, float_outputs).run(), "int8-qdq"
    kind = "float"
    for name, module in list(work.named_modules()):
        if isinstance(module, dynamic.DynamicLinear):
            if module.dtype == torch.float16:
                _set_submodule(work, name, _FP16LinearExport(module))
                kind = "fp16"
                continue
            _set_submodule(work, name, _DynamicLinearExport(module))
            kind = "dynamic-int8"
        elif isinstance(module, DynamicRNN):
            _set_submodule(work, name, _DynamicRNNExport(module, fused=spec.name == "onnx"))
            kind = "fp16" if module.dtype == torch.float16 and kind != "dynamic-int8" else "dynamic-int8"
        elif isinstance(module, (dynamic.DynamicEmbedding, dynamic.DynamicEmbeddingBag)):
            raise UnsupportedError(
                f"{name} ({type(module).__name__}) has no ONNX export in fxopt; quantize the other layers only "
                f"for ONNX: fxopt.passes.QuantizeDynamic(types=(torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU))")
        elif isinstance(module, FP16Module):
            kind = "fp16"
    return work, kind


def _static_sizes(gm: torch.fx.GraphModule) -> None:
    """``x.size(d)`` / ``x.shape[d]`` for every dimension but the batch (dim 0, the only dynamic one in the
    export) becomes the recorded int, so the export has constants instead of ``Shape → Gather → …`` arithmetic
    at run time (shufflenet's channel shuffle computes its view from ``x.size()``)."""
    def dim_of(node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:  # (size-like node, dim) for x.size(d)
        if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and not node.kwargs:
            return node, node.args[1]
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
            src = node.args[0]
            whole = isinstance(src, torch.fx.Node) and (
                (src.op == "call_method" and src.target == "size" and len(src.args) == 1 and not src.kwargs)
                or (src.op == "call_function" and src.target is getattr and src.args[1:] == ("shape",)))
            return (src, node.args[1]) if whole else None
        return None

    changed = False
    for node in list(gm.graph.nodes):
        found = dim_of(node)
        if found is None or not isinstance(found[1], int):
            continue
        x = found[0].args[0]
        while isinstance(x, torch.fx.Node) and meta.shape_of(x) is None and x.op == "call_module" and x.args \
                and is_observer(gm.get_submodule(x.target)):
            x = x.args[0]  # observers were inserted after shape propagation: their input has the shape
        shape = meta.shape_of(x) if isinstance(x, torch.fx.Node) else None
        if shape is None or not -len(shape) <= found[1] < len(shape) or found[1] % len(shape) == 0:
            continue
        value = int(shape[found[1]])
        for user in list(node.users):
            user.args = torch.fx.node.map_arg(user.args, lambda n, v=value: v if n is node else n)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda n, v=value: v if n is node else n)
        gm.graph.erase_node(node)
        if found[0] is not node and not found[0].users:
            gm.graph.erase_node(found[0])
        changed = True
    if changed:
        gm.recompile()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _Flat(nn.Module):
    """Positional tensors in, a flat tuple of tensors out (what the ONNX graph has)."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *args):
        out = self.module(*args)
        leaves, _ = pytree.tree_flatten(out)
        return tuple(leaves)


# ---- export ------------------------------------------------------------------------------------

def export_onnx(gm: nn.Module, spec: BackendSpec | None = None, *, example_inputs: Any = None,
                dynamic_batch: bool = True, float_outputs: bool = True) -> tuple[Any, dict]:
    """ONNX ``ModelProto`` of ``gm`` (see the module docstring) and its fxopt metadata (inputs, outputs).

    ``float_outputs``: an int8 op whose value is a model output writes it in float (no QDQ after it: the
    runtimes' int8 conv / Gemm / MatMul kernels can), instead of rounding the output to 8 bits.
    """
    onnx = require("onnx", "onnx")
    spec = spec or onnx_spec()
    if example_inputs is None:
        if not isinstance(gm, torch.fx.GraphModule):
            raise UnsupportedError("exporting a module that is not an fxopt graph needs example_inputs")
        names, args = example_inputs_of(gm)
    else:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        names = [n.name for n in gm.graph.find_nodes(op="placeholder")] if isinstance(gm, torch.fx.GraphModule) \
            else [f"input_{i}" for i in range(len(args))]
    work, kind = _export_ready(gm, spec, float_outputs)
    work.eval()
    with torch.no_grad():
        out = work(*args)
    leaves, treespec = pytree.tree_flatten(out)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise UnsupportedError("ONNX export needs a model whose outputs are tensors (or tuples/lists/dicts of them)")
    out_names = [f"output_{i}" for i in range(len(leaves))]
    axes = {n: {0: "batch"} for n in [*names, *out_names]} if dynamic_batch else None
    symbolic = _symbolic_dims(gm, names) if isinstance(gm, torch.fx.GraphModule) and dynamic_batch else {}
    if symbolic:  # a torch.export graph: its dynamic dims (batch, sequence...) stay dynamic in the file
        axes = {**axes, **symbolic}
        for name, out_dims in zip(out_names, _symbolic_output_dims(gm, len(out_names))):
            axes[name] = {**axes[name], **out_dims}
        _traceable_sizes(work)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _no_fastpath():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(_Flat(work, names), args, buf, dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=out_names, dynamic_axes=axes,
                              do_constant_folding=True)
        except Exception as exc:
            raise UnsupportedError(f"torch.onnx could not export this {kind} graph: {exc}") from exc
    model = onnx.load_from_string(buf.getvalue())
    _inline_identities(model)
    _fold_static_shapes(model, vector_indices=spec.name == "onnx")
    if kind == "int8-qdq":
        _fold_weight_quantize(model)
        if spec.name == "onnx":  # ONNX Runtime's QDQ fusions; OpenVINO reads the exporter's MatMul form as it is
            _linear_as_gemm(model)
            _fold_weight_transpose(model)
            _drop_clamps_before_quantize(model)
        _quantize_conv_bias(model)
    if kind == "fp16":
        _float16_initializers(model)
    info = {"format": _FORMAT_KEY, "kind": kind, "inputs": names, "outputs": out_names,
            "treespec": pytree.treespec_dumps(treespec)}
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "fxopt", json.dumps(info)
    model.producer_name = "fxopt"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise UnsupportedError(f"the exported ONNX graph failed onnx.checker: {exc}") from exc
    return model, info


def _axis_name(size: Any, dim: int) -> str:
    return "batch" if dim == 0 else f"dim_{size}"


def _symbolic_dims(gm: torch.fx.GraphModule, names: list[str]) -> dict[str, dict[int, str]]:
    """``{input name: {dim: axis name}}`` for the dims ``torch.export`` kept symbolic (the export frontend's
    placeholders carry their ``val`` with SymInt sizes); equal symbols get equal names (``input_ids`` and
    ``attention_mask`` share their sequence length). Empty for a graph from the symbolic tracer."""
    out: dict[str, dict[int, str]] = {}
    for node, name in zip(gm.graph.find_nodes(op="placeholder"), names):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = {d: _axis_name(size, d) for d, size in enumerate(val.shape) if isinstance(size, torch.SymInt)}
            if dims:
                out[name] = dims
    return out


def _symbolic_output_dims(gm: torch.fx.GraphModule, count: int) -> list[dict[int, str]]:
    """The symbolic dims of each flat output (from the output node's recorded ``val``), or ``{}`` each."""
    output = next(iter(gm.graph.find_nodes(op="output")), None)
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None
            for a in pytree.tree_leaves(output.args[0])] if output is not None else []
    if len(vals) != count:
        return [{} for _ in range(count)]
    return [{d: _axis_name(size, d) for d, size in enumerate(v.shape) if isinstance(size, torch.SymInt)}
            if isinstance(v, torch.Tensor) else {} for v in vals]


def _traceable_sizes(gm: nn.Module) -> None:
    """``aten.sym_size.int(x, d)`` (torch.export's size reads) → ``x.size(d)``: the ONNX tracer records a
    method ``size`` as a ``Shape → Gather`` on the live tensor, where the aten op's int would be a constant
    (the example's batch / sequence length baked into the file)."""
    if not isinstance(gm, torch.fx.GraphModule):
        return
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int]
    sized: set[torch.fx.Node] = set()
    for node in nodes:
        with gm.graph.inserting_before(node):
            size = gm.graph.call_method("size", tuple(node.args), dict(node.kwargs))
        node.replace_all_uses_with(size)
        gm.graph.erase_node(node)
        sized.add(size)
    # a traced size is a 0-d tensor, which aten overloads refuse where they take an int: the ops that read a
    # size go through their Python bindings (which take it), size arithmetic (operator.*) stays as it is
    for node in gm.graph.nodes:
        if not any(a in sized for a in pytree.tree_leaves((node.args, node.kwargs))):
            continue
        if node.op == "call_function" and node.target in _SIZE_READERS:
            node.target = _SIZE_READERS[node.target]
        sized.add(node)  # its value depends on the size (arithmetic, or a tensor shaped by it)
    if nodes:
        gm.recompile()


def _arange(*args, **kwargs):
    return torch.arange(*args, **kwargs)


def _expand(x, size, implicit=False):
    return x.expand(*size)


def _view(x, size):
    return x.reshape(*size)


def _slice(x, dim=0, start=None, end=None, step=1):
    length = x.size(dim) - (start or 0) if end is None or (isinstance(end, int) and end >= 2**62) \
        else end - (start or 0)
    return x.narrow(dim, start or 0, length) if step == 1 else x[(slice(None),) * (dim % x.dim()) +
                                                                 (slice(start, end, step),)]


def _new_ones(x, size, **kwargs):
    kwargs.pop("pin_memory", None)
    return x.new_ones(size, **kwargs)


def _new_zeros(x, size, **kwargs):
    kwargs.pop("pin_memory", None)
    return x.new_zeros(size, **kwargs)


def _full(size, value, **kwargs):
    kwargs.pop("pin_memory", None)
    return torch.full(size, value, **kwargs)


_aten = torch.ops.aten
_SIZE_READERS = {_aten.arange.default: _arange, _aten.arange.start: _arange, _aten.arange.start_step: _arange,
                 _aten.expand.default: _expand, _aten.view.default: _view, _aten.reshape.default: _view,
                 _aten._unsafe_view.default: _view, _aten.slice.Tensor: _slice,
                 _aten.new_ones.default: _new_ones, _aten.new_zeros.default: _new_zeros,
                 _aten.full.default: _full}


def _inline_identities(model) -> None:
    """Drop ``Identity`` nodes (the exporter's de-duplicated initializers): readers use the source name."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    rename = {}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name


class _no_fastpath:
    """nn.TransformerEncoder / MultiheadAttention without their fused inference kernels (no ONNX form)."""

    def __enter__(self):
        self.before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.before)


def _constants(model) -> dict[str, Any]:
    """Initializers and ``Constant`` node outputs by name, as numpy arrays."""
    from onnx import numpy_helper  # noqa: PLC0415

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _fold_weight_quantize(model) -> None:
    """``QuantizeLinear(float initializer)`` → an int8 initializer (the weights are stored as int8)."""
    import numpy as np  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    graph = model.graph
    consts = _constants(model)
    inits = {i.name for i in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w = consts[node.input[0]]
        scale, zp = consts[node.input[1]], consts[node.input[2]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim == 1 and w.ndim > 0:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.astype(np.int64).reshape(shape), info.min, info.max)
        name, k = f"{node.input[0]}_quantized", 0
        while name in inits:  # the exporter shares equal weights (cloned layers): one QuantizeLinear each
            k += 1
            name = f"{node.input[0]}_quantized_{k}"
        inits.add(name)
        graph.initializer.append(numpy_helper.from_array(q.astype(zp.dtype), name))
        for other in graph.node:
            for i, inp in enumerate(other.input):
                if inp == node.output[0]:
                    other.input[i] = name
        graph.node.remove(node)
    _drop_unused(model)


def _graph_index(model, data_prop: bool = False) -> tuple[dict, dict, dict, dict] | None:
    """What the ONNX rewrites read: inferred dims by value name (``None`` for a symbolic dim), constants,
    each value's producer node and each value's user nodes. ``None`` when shape inference fails.
    ``data_prop``: shape inference also evaluates shape arithmetic (a ``Slice`` whose end is computed from
    a ``Shape`` gets its dims), falling back to plain inference where that fails."""
    from onnx import shape_inference  # noqa: PLC0415

    inferred = None
    for prop in ([True, False] if data_prop else [False]):
        try:
            inferred = shape_inference.infer_shapes(model, data_prop=prop).graph
            break
        except Exception:  # noqa: BLE001 - callers treat an uninferable graph as one to leave alone
            continue
    if inferred is None:
        return None
    dims: dict[str, list[int | None]] = {}
    for info in [*inferred.value_info, *inferred.input, *inferred.output]:
        t = info.type.tensor_type
        if t.HasField("shape"):
            dims[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return dims, _constants(model), producer, users


def _linear_as_gemm(model) -> None:
    """An int8 linear on an N-D input (``DQ(x) → MatMul(·, Transpose(DQ(W))) → Add(bias) → Q``, what the
    exporter writes for more than 2 dimensions) → ``Reshape`` to 2-D, ``Gemm(transB=1)`` with the bias,
    ``Reshape`` back, each behind a QDQ with the same qparams. ONNX Runtime fuses the MatMul form into
    ``MatMulIntegerToFloat`` + a float bias ``Add`` + ``QuantizeLinear``; the Gemm form into one ``QGemm``
    (int32 bias, int8 output) with the reshapes run on the int8 tensor. The numerics stay: the output is
    still rounded once, after the bias (the bias becomes int32 in :func:`_quantize_conv_bias`)."""
    import numpy as np  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    index = _graph_index(model)
    if index is None:  # an optimization: an uninferable graph stays as it is
        return
    dims, consts, producer, users = index
    outputs = {o.name for o in graph.output}
    count = 0
    for mm in list(graph.node):
        if mm.op_type != "MatMul":
            continue
        dq_x, tr = producer.get(mm.input[0]), producer.get(mm.input[1])
        if dq_x is None or dq_x.op_type != "DequantizeLinear" or tr is None:
            continue
        # the weight as W [N, K] behind a Transpose (or W [K, N] read directly: the exporter folded the Transpose)
        trans_b = tr.op_type == "Transpose"
        dq_w = producer.get(tr.input[0]) if trans_b else tr
        if dq_w is None or dq_w.op_type != "DequantizeLinear" or dq_w.input[0] not in consts:
            continue
        w_shape = consts[dq_w.input[0]].shape
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), [1, 0]) if trans_b else [1, 0]
        if len(w_shape) != 2 or perm != [1, 0]:
            continue
        n_out, k_in = w_shape if trans_b else w_shape[::-1]
        x_shape = dims.get(mm.input[0]) or None  # None: unknown (the shapes below then come from Shape)
        if x_shape is not None and (len(x_shape) < 3 or x_shape[-1] not in (k_in, None)):
            continue
        add = users.get(mm.output[0], [])
        if len(add) != 1 or add[0].op_type != "Add" or mm.output[0] in outputs:
            continue
        add = add[0]
        bias_name = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
        if bias_name not in consts or consts[bias_name].shape != (n_out,):
            continue
        q = users.get(add.output[0], [])
        if len(q) != 1 or q[0].op_type != "QuantizeLinear" or add.output[0] in outputs:
            continue
        q = q[0]
        if len(dq_x.input) < 3 or len(q.input) < 3:
            continue
        base = f"{mm.output[0]}_gemm"
        if x_shape is not None and all(d is not None for d in x_shape[1:]):
            back = np.array([-1, *x_shape[1:-1], n_out], np.int64)
            graph.initializer.append(numpy_helper.from_array(back, f"{base}_shape_out"))
            shape_nodes = []
        else:  # more than the batch is dynamic (or unknown): x's shape with the last dimension replaced
            graph.initializer.extend([numpy_helper.from_array(np.array([n_out], np.int64), f"{base}_n"),
                                      numpy_helper.from_array(np.array([0], np.int64), f"{base}_s0"),
                                      numpy_helper.from_array(np.array([-1], np.int64), f"{base}_s1")])
            shape_nodes = [
                helper.make_node("Shape", [dq_x.input[0]], [f"{base}_xshape"], name=f"{base}_Shape"),
                helper.make_node("Slice", [f"{base}_xshape", f"{base}_s0", f"{base}_s1"], [f"{base}_lead"],
                                 name=f"{base}_Slice"),
                helper.make_node("Concat", [f"{base}_lead", f"{base}_n"], [f"{base}_shape_out"], axis=0,
                                 name=f"{base}_Concat")]
        graph.initializer.append(numpy_helper.from_array(np.array([-1, k_in], np.int64), f"{base}_shape_in"))
        xq = list(dq_x.input[1:3])
        oq = list(q.input[1:3])
        new = [
            *shape_nodes,
            helper.make_node("Reshape", [mm.input[0], f"{base}_shape_in"], [f"{base}_x2d"], name=f"{base}_Reshape"),
            helper.make_node("QuantizeLinear", [f"{base}_x2d", *xq], [f"{base}_x2d_q"], name=f"{base}_xq"),
            helper.make_node("DequantizeLinear", [f"{base}_x2d_q", *xq], [f"{base}_x2d_dq"], name=f"{base}_xdq"),
            helper.make_node("Gemm", [f"{base}_x2d_dq", dq_w.output[0], bias_name], [f"{base}_y2d"],
                             transB=int(trans_b), name=f"{base}_Gemm"),
            helper.make_node("QuantizeLinear", [f"{base}_y2d", *oq], [f"{base}_y2d_q"], name=f"{base}_yq"),
            helper.make_node("DequantizeLinear", [f"{base}_y2d_q", *oq], [f"{base}_y2d_dq"], name=f"{base}_ydq"),
            helper.make_node("Reshape", [f"{base}_y2d_dq", f"{base}_shape_out"], [f"{base}_y"],
                             name=f"{base}_Reshape_out"),
        ]
        at = list(graph.node).index(q)  # after the constants of both QDQs
        for k, node in enumerate(new):
            graph.node.insert(at + k, node)
        q.input[0] = f"{base}_y"
        graph.node.remove(add)
        graph.node.remove(mm)
        if trans_b and all(u is mm for u in users.get(tr.output[0], [])):
            graph.node.remove(tr)
        count += 1
    if count:
        _drop_dead_nodes(model)


def _fold_weight_transpose(model) -> None:
    """``DequantizeLinear(int8 weight) → Transpose → MatMul`` → ``DequantizeLinear(transposed int8 weight) →
    MatMul``: the exporter writes a linear on a 3-D input as ``MatMul(x, Transpose(W))``, which it
    constant-folds for a float weight but not behind a DQ. ONNX Runtime's QDQ fusions need the DQ to feed the
    MatMul directly (with the Transpose in between the linear ran as a float MatMul on a dequantized weight)."""
    import numpy as np  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    for dq in list(graph.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.output[0] in graph_outputs:
            continue
        readers = users.get(dq.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Transpose":
            continue
        transpose = readers[0]
        w = numpy_helper.to_array(inits[dq.input[0]])
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        if w.ndim != 2 or perm != [1, 0] or transpose.output[0] in graph_outputs:
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        name, k = f"{dq.input[0]}_t", 0
        while name in inits:
            k += 1
            name = f"{dq.input[0]}_t{k}"
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(w.T), name)
        graph.initializer.append(inits[name])
        dq.input[0] = name
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", 1 - axis % 2))
        for reader in users.get(transpose.output[0], []):
            for i, inp in enumerate(reader.input):
                if inp == transpose.output[0]:
                    reader.input[i] = dq.output[0]
        graph.node.remove(transpose)
    _drop_unused(model)


def _drop_clamps_before_quantize(model) -> None:
    """``Relu`` / ``Clip`` → ``QuantizeLinear`` whose int8 grid already saturates at the clamp's bounds → the
    ``QuantizeLinear`` alone (what ONNX Runtime's own quantizer writes). The codes are the same: a value
    below the clamp's minimum rounds to the grid's lowest code either way (likewise above the maximum).
    ONNX Runtime removes such a clamp only at ``ORT_ENABLE_EXTENDED`` and above; at ``ORT_ENABLE_BASIC``
    mobilenet_v2 ran 35 float ``Clip`` nodes more than ``quantize_static``'s graph."""
    import numpy as np  # noqa: PLC0415

    graph = model.graph
    index = _graph_index(model)
    if index is None:
        return
    _, consts, _, users = index
    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type not in ("Relu", "Clip") or node.output[0] in outputs:
            continue
        readers = users.get(node.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or readers[0].input[0] != node.output[0]:
            continue
        q = readers[0]
        if len(q.input) < 3 or q.input[1] not in consts or q.input[2] not in consts:
            continue
        scale, zp = consts[q.input[1]], consts[q.input[2]]
        if scale.size != 1 or zp.size != 1 or zp.dtype not in (np.uint8, np.int8):
            continue
        bounds = [float("-inf"), float("inf")] if node.op_type == "Clip" else [0.0, float("inf")]
        inputs = [n for n in node.input[1:3] if n] if node.op_type == "Clip" else []  # "": that bound is absent
        if any(n not in consts or consts[n].size != 1 for n in inputs):
            continue
        for k, name in enumerate(node.input[1:3] if node.op_type == "Clip" else []):
            if name:
                bounds[k] = float(consts[name].reshape(-1)[0])
        info, s, z = np.iinfo(zp.dtype), float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])

        def code(v: float) -> float:
            return float(np.rint(v / s)) + z if np.isfinite(v) else v

        if code(bounds[0]) > info.min or code(bounds[1]) < info.max:
            continue  # the clamp cuts inside the grid: it changes codes
        q.input[0] = node.input[0]
        graph.node.remove(node)
    _drop_unused(model)


def _quantize_conv_bias(model) -> None:
    """A Conv with DQ'd input and weight gets its float bias as int32 behind a DQ (ONNX Runtime's QDQ Conv)."""
    import numpy as np  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    consts = _constants(model)
    producer = {o: n for n in graph.node for o in n.output}
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x is not None and dq_w is not None and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        if dq_x.input[1] not in consts or dq_w.input[1] not in consts:
            continue
        scale = (consts[dq_x.input[1]].astype(np.float64) * consts[dq_w.input[1]].astype(np.float64))
        bias = consts[node.input[2]].astype(np.float64)
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
        q = np.clip(np.rint(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        base = f"{node.output[0]}_bias"
        graph.initializer.extend([numpy_helper.from_array(q, f"{base}_int32"),
                                  numpy_helper.from_array(scale, f"{base}_int32_scale"),
                                  numpy_helper.from_array(np.zeros_like(q), f"{base}_int32_zp")])
        dq = helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_int32_scale", f"{base}_int32_zp"],
                              [f"{base}_dq"], axis=0, name=f"{base}_DequantizeLinear")
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[2] = f"{base}_dq"
    _drop_unused(model)


def _fold_static_shapes(model, vector_indices: bool = False) -> None:
    """Shape arithmetic the tracer recorded (``x.size(1)`` → ``Shape → Gather``) becomes constants wherever
    the dimension is static (every one but the dynamic batch), and a ``Shape`` still needed reads the
    tensor before its ``DequantizeLinear``: no int8 activation is dequantized only to learn its shape.
    ``vector_indices`` (the ONNX Runtime target) also folds a ``Gather`` with a 1-D index, which is how the
    exporter writes ``chunk``'s split point (``Shape → Gather([1]) → Add → Div → Mul → Slice``: 5 ops per
    chunk at run time, 13 chunks in shufflenet_v2_x1_0)."""
    import numpy as np  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    index = _graph_index(model, data_prop=vector_indices)
    if index is None:  # an optimization: an uninferable graph stays as it is
        return
    dims, consts, producer, users = index

    def constant(name: str, value) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, f"{name}_value"),
                                name=f"{name}_folded")

    for node in list(graph.node):
        if node.op_type != "Shape" or any(a.name in ("start", "end") for a in node.attribute):
            continue
        shape = dims.get(node.input[0])
        if shape is None:
            continue
        if all(d is not None for d in shape):
            graph.node.insert(list(graph.node).index(node), constant(node.output[0], np.array(shape, np.int64)))
            graph.node.remove(node)
            continue
        for gather in users.get(node.output[0], []):
            if gather.op_type != "Gather" or gather.input[0] != node.output[0] or gather.input[1] not in consts:
                continue
            if any(a.name == "axis" and a.i != 0 for a in gather.attribute):
                continue
            idx = consts[gather.input[1]]
            if idx.ndim > (1 if vector_indices else 0):
                continue
            picked = [shape[int(i) % len(shape)] for i in idx.reshape(-1)]
            if any(d is None for d in picked):
                continue
            graph.node.insert(list(graph.node).index(gather),
                              constant(gather.output[0], np.array(picked, np.int64).reshape(idx.shape)))
            graph.node.remove(gather)
        src = producer.get(node.input[0])
        if src is not None and src.op_type == "DequantizeLinear":
            node.input[0] = src.input[0]
    _drop_dead_nodes(model)


def _drop_dead_nodes(model) -> None:
    """Remove nodes none of whose outputs is read (repeatedly), then unused initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}

    def reads(nodes) -> set[str]:  # inputs, including those of If / Loop bodies (outer-scope names)
        names = set()
        for n in nodes:
            names.update(n.input)
            for a in n.attribute:
                for sub in [a.g] if a.HasField("g") else list(a.graphs):
                    names |= reads(sub.node)
        return names

    while True:
        used = reads(graph.node) | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    _drop_unused(model)


def _float16_initializers(model) -> None:
    """fp16-rounded float initializers → float16 initializers read through ``Cast(to=float)``."""
    import numpy as np  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    casts = []
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(init)
        if w.size < 16 or not np.array_equal(w.astype(np.float16).astype(np.float32), w):
            continue
        half = numpy_helper.from_array(w.astype(np.float16), f"{init.name}_fp16")
        graph.initializer.remove(init)
        graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}_Cast"))
    for i, cast in enumerate(casts):
        graph.node.insert(i, cast)


def _drop_unused(model) -> None:
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    for node in list(graph.node):
        if node.op_type == "Constant" and node.output[0] not in used:
            graph.node.remove(node)


# ---- the runtime module -------------------------------------------------------------------------

def _unflatten(leaves: list[torch.Tensor], info: dict) -> Any:
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(info["treespec"]))


def _bind_inputs(names: list[str], args: tuple, kwargs: dict, who: str) -> list[torch.Tensor]:
    if len(args) > len(names):
        raise TypeError(f"{who} takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
    values = list(args) + [None] * (len(names) - len(args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{who} got an unexpected keyword argument {key!r}; inputs: {', '.join(names)}")
        values[names.index(key)] = value
    missing = [n for n, v in zip(names, values) if v is None]
    if missing:
        raise TypeError(f"{who} is missing input(s): {', '.join(missing)}")
    return values


def read_info(model) -> dict:
    for entry in model.metadata_props:
        if entry.key == "fxopt":
            return json.loads(entry.value)
    raise UnsupportedError("this ONNX file was not written by fxopt (no 'fxopt' metadata): run it with "
                           "onnxruntime directly")


class OnnxModule(nn.Module):
    """Runs an ONNX model in ONNX Runtime (CPU) with the original model's call signature and outputs."""

    def __init__(self, model_bytes: bytes, threads: int | None = None) -> None:
        super().__init__()
        onnx = require("onnx", "onnx")
        require("onnxruntime", "onnx")
        self.model_bytes = bytes(model_bytes)
        self.info = read_info(onnx.load_from_string(self.model_bytes))
        self.threads = int(threads) if threads else torch.get_num_threads()
        self.meta: dict = {}
        meta.set_backend(self, "onnx")
        self._session = None

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def session(self):
        if self._session is None:
            ort = require("onnxruntime", "onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            # idle intra-op threads sleep instead of spinning: they would otherwise steal the cores PyTorch
            # code around the call (or another session) runs on
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(self.model_bytes, options, providers=["CPUExecutionProvider"])
        return self._session

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        values = _bind_inputs(self.info["inputs"], args, kwargs, "OnnxModule")
        feed = {name: v.detach().cpu().contiguous().numpy() for name, v in zip(self.info["inputs"], values)}
        outs = self.session.run(self.info["outputs"], feed)
        return _unflatten([torch.from_numpy(o) for o in outs], self.info)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def __deepcopy__(self, memo: dict) -> "OnnxModule":
        new = OnnxModule(self.model_bytes, self.threads)
        new.meta = copy.deepcopy(self.meta, memo)
        return new

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, threads={self.threads}, bytes={len(self.model_bytes)}"


class OnnxBackend(Int8Backend):
    """``backend="onnx"``: export to ONNX (QDQ int8, FP16, dynamic int8 or float) and run it in ONNX Runtime."""

    name = "onnx"

    def __init__(self, threads: int | None = None, *, dynamic_batch: bool = True) -> None:
        super().__init__(onnx_spec())
        self.threads = threads
        self.dynamic_batch = dynamic_batch

    def accepts_prepared_for(self, backend_name: str) -> bool:
        """QDQ carries any PyTorch int8 backend's qparams: an x86-prepared graph exports as it is."""
        return backend_name in ("onnx", "x86", "qnnpack", "edgetpu", "openvino")

    def lower(self, gm: torch.fx.GraphModule) -> OnnxModule:
        require("onnxruntime", "onnx")
        model, _ = export_onnx(gm, self.spec, dynamic_batch=self.dynamic_batch)
        module = OnnxModule(model.SerializeToString(), self.threads or torch.get_num_threads())
        meta.set_float_islands(module, meta.float_islands(gm))
        return module

    def save(self, module: nn.Module, path: str | Path) -> None:
        if not isinstance(module, OnnxModule):
            raise UnsupportedError(f"the onnx backend saves modules it lowered (OnnxModule), got {type(module).__name__}"
                                   f"; lower first: fxopt.compile(model, passes, example_inputs=..., backend='onnx')")
        path = Path(path)
        if path.suffix.lower() != ".onnx":
            raise UnsupportedError(f"an ONNX model is saved to a .onnx path, got {str(path)!r}")
        path.write_bytes(module.model_bytes)

    def load(self, path: str | Path) -> OnnxModule:
        return OnnxModule(Path(path).read_bytes(), self.threads)

    def __repr__(self) -> str:
        return f"OnnxBackend(threads={self.threads})"
