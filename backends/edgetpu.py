"""The ``edgetpu`` backend: will this graph run on a Coral EdgeTPU, and a full-integer export for it.

The EdgeTPU runs only fully 8-bit quantized TFLite models compiled by ``edgetpu_compiler``; the compiler
maps ops to the TPU up to the first op it cannot run and leaves *everything after it* on the host CPU.
``check(module)`` walks a prepared (calibrated) fxopt graph and lists every op that would break that,
each with its reason, following Coral's published model requirements:

* **float islands**: ops outside the int8 regions (no int8 kernel, untraced submodules, ops the int8
  lowering keeps float) and values that leave int8 in the middle of the graph;
* **float inputs / outputs** (only with ``full_integer=False``: the full-integer export makes them int8);
* **per-channel where per-tensor is required**: FullyConnected weights (the TFLite int8 spec the compiler
  follows quantizes them per tensor); conv / depthwise conv may be per channel;
* **dynamic shapes**: sizes read at run time (``x.size()`` feeding a reshape), and tensors with more than
  three dimensions larger than 1 (a batch > 1 in the recorded example input);
* **ops outside the EdgeTPU's supported set** (the support table below), and the listed limits of
  supported ones (Mean / AvgPool only over the spatial dimensions, no hardswish / layer norm).

``check`` also reads a ``.tflite`` module lowered by the ``tflite`` backend (``backends/tflite.py``): its
ops against Coral's TFLite op list, float tensors, per-channel FullyConnected weights, shapes, and (with
``full_integer=True``) float inputs / outputs.

``EdgeTpuBackend.lower(gm)`` is the full-integer export mode: it raises :class:`UnsupportedError` listing
the islands if ``check`` finds any, else writes the graph as ONNX QDQ whose inputs and outputs are uint8
(the first QuantizeLinear and the last DequantizeLinear are dropped, their qparams recorded in the
module's ``info["input_qparams"]`` / ``["output_qparams"]``), checked with ``onnx.checker`` and run by
ONNX Runtime. That ONNX is what the TFLite converters take; ``edgetpu_compiler`` then compiles the
``.tflite`` (see the README).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.fx
from tabulate import tabulate

from fxopt import meta
from fxopt.errors import UnsupportedError
from fxopt.quant.spec import QSpec
from fxopt.quant.stubs import DeQuantStub, QuantStub

from fxopt.graph_utils import is_observer

from .lowering import Int8Backend
from .onnx import OnnxModule, export_onnx, require
from .spec import BackendSpec, OpRule, op_key

__all__ = ["EdgeTpuBackend", "EdgeTpuIssue", "EdgeTpuReport", "edgetpu_spec", "shape_nodes"]

_PER_TENSOR_ONLY = {"linear": "FullyConnected"}
_MOVES = {"reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "squeeze", "unsqueeze"}
_SPATIAL_ONLY = {"adaptive_avg_pool2d", "adaptive_avg_pool1d", "avg_pool2d", "max_pool2d", "mean"}
_NOT_ON_TPU = {  # ops in PyTorch's int8 tables that the EdgeTPU compiler does not map
    "hardswish": "HardSwish is not in the EdgeTPU's supported op list",
    "layer_norm": "LayerNorm has no EdgeTPU kernel (it decomposes into float mean/variance ops)",
    "batch_norm2d": "a BatchNorm that was not folded into a conv has no EdgeTPU kernel",
    "batch_norm3d": "3-D ops do not run on the EdgeTPU",
    "conv3d": "3-D convolutions do not run on the EdgeTPU",
    "hardsigmoid": "HardSigmoid is not in the EdgeTPU's supported op list",
}


def edgetpu_spec() -> BackendSpec:
    """Coral's supported ops, as fxopt op keys: conv per channel, FullyConnected per tensor, uint8 I/O."""
    relu = frozenset({"relu", "relu6"})
    share = ("relu", "relu6", "hardtanh", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "flatten",
             "reshape", "squeeze", "unsqueeze", "identity", "contiguous", "getitem", "split", "chunk", "pad",
             "transpose", "permute", "mean", "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d")
    ops = {k: OpRule("share", reason=f"{k} (EdgeTPU supported op)") for k in share}
    ops.update({
        "conv1d": OpRule("compute", per_channel=True, fused_activations=relu, reason="Conv2d"),
        "conv2d": OpRule("compute", per_channel=True, fused_activations=relu, reason="Conv2d / DepthwiseConv2d"),
        "linear": OpRule("compute", per_channel=False, fused_activations=relu, reason="FullyConnected (per-tensor)"),
        "add": OpRule("compute", fused_activations=relu, reason="Add"),
        "mul": OpRule("compute", reason="Mul"),
        "cat": OpRule("compute", reason="Concatenation"),
        "sigmoid": OpRule("fixed", fixed_qparams=(1.0 / 256.0, 0), reason="Logistic"),
        "silu": OpRule("compute", reason="Logistic + Mul (x * sigmoid(x), as TFLite writes SiLU)"),
        "tanh": OpRule("fixed", fixed_qparams=(2.0 / 256.0, 128), reason="Tanh"),
    })
    return BackendSpec(
        name="edgetpu", engine="qnnpack",
        activation=QSpec(torch.quint8, symmetric=False),
        weight=QSpec(torch.qint8, symmetric=True, axis=0),
        weight_per_tensor=QSpec(torch.qint8, symmetric=True),
        ops=ops, notes=("full-integer TFLite compiled by edgetpu_compiler",))


@dataclass(frozen=True)
class EdgeTpuIssue:
    """One op that would not run on the EdgeTPU."""

    node: str
    op: str
    kind: str  # float-island | float-io | per-channel | dynamic-shape | unsupported-op | not-prepared
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}) [{self.kind}]: {self.reason}"


@dataclass
class EdgeTpuReport:
    """``check()``'s answer: ``ok`` when nothing would leave the TPU; ``issues`` otherwise."""

    issues: list[EdgeTpuIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def __bool__(self) -> bool:
        return self.ok

    def kinds(self) -> set[str]:
        return {i.kind for i in self.issues}

    def __str__(self) -> str:
        if self.ok:
            return "EdgeTPU check: every op maps to the EdgeTPU"
        rows = [[i.node, i.op, i.kind, i.reason] for i in self.issues]
        return f"EdgeTPU check: {len(rows)} op(s) would not run on the EdgeTPU\n" + tabulate(
            rows, headers=["node", "op", "kind", "reason"])


class EdgeTpuBackend(Int8Backend):
    """``backends.get("edgetpu")``: ``check(module)``; ``lower(gm)`` = full-integer ONNX QDQ (uint8 I/O)."""

    name = "edgetpu"

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(edgetpu_spec())
        self.threads = threads

    def accepts_prepared_for(self, backend_name: str) -> bool:
        return backend_name in ("edgetpu", "tflite", "x86", "qnnpack", "onnx")

    def check(self, module: torch.nn.Module, *, full_integer: bool = True) -> EdgeTpuReport:
        """Every op of ``module`` (a prepared, calibrated fxopt graph, or a ``.tflite`` module lowered by the
        ``tflite`` backend) that would not run on the EdgeTPU.

        On a graph, ``full_integer=True`` (the default) leaves out float inputs / outputs: the full-integer
        export makes them integer. On a ``.tflite`` module the file is final: ``full_integer=True`` reports
        its float inputs / outputs (``TFLiteBackend(int8_io=True)`` writes int8 ones); ``False`` accepts them
        (the boundary QUANTIZE / DEQUANTIZE then run on the host CPU).
        """
        if meta.backend_of(module) == "tflite" and hasattr(module, "model_bytes"):
            return _check_tflite(module.model_bytes, full_integer)
        if not isinstance(module, torch.fx.GraphModule):
            raise TypeError(f"check() reads an fxopt graph (fxopt.compile(..., backend=None)), got "
                            f"{type(module).__name__}")
        return _Checker(module, self.spec, full_integer).run()

    def lower(self, gm: torch.fx.GraphModule) -> OnnxModule:
        report = self.check(gm)
        if not report.ok:
            raise UnsupportedError(
                f"full-integer export for the EdgeTPU needs every op in int8; {len(report.issues)} would not "
                f"run there:\n" + "\n".join(f"  {i}" for i in report.issues))
        onnx = require("onnx", "onnx")
        model, info = export_onnx(gm, self.spec, dynamic_batch=False, float_outputs=False)
        info.update(_integer_io(model))
        info["kind"] = "full-integer"
        for entry in model.metadata_props:
            if entry.key == "fxopt":
                entry.value = json.dumps(info)
        onnx.checker.check_model(model, full_check=True)
        module = OnnxModule(model.SerializeToString(), self.threads or torch.get_num_threads())
        meta.set_backend(module, "onnx")
        return module


class _Checker:
    def __init__(self, gm: torch.fx.GraphModule, spec: BackendSpec, full_integer: bool) -> None:
        self.gm, self.spec, self.full_integer = gm, spec, full_integer
        self.modules = dict(gm.named_modules())
        self.issues: list[EdgeTpuIssue] = []
        self.config = meta.quant_config(gm)

    def add(self, node: torch.fx.Node, op: str, kind: str, reason: str) -> None:
        self.issues.append(EdgeTpuIssue(node.name, op, kind, reason))

    def run(self) -> EdgeTpuReport:
        gm = self.gm
        if not any(isinstance(m, QuantStub) for m in gm.modules()):
            self.issues.append(EdgeTpuIssue("<graph>", "-", "not-prepared",
                                            "the graph is float: prepare it with fxopt.recipes.static_int8(data, "
                                            "backend='edgetpu') so every op gets int8 qparams"))
            return EdgeTpuReport(self.issues)
        islands = {i.node: i for i in meta.float_islands(gm)}
        placeholders = set(gm.graph.find_nodes(op="placeholder"))
        output = next(iter(gm.graph.find_nodes(op="output")))
        sizes = shape_nodes(gm)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                self._shape(node)
                continue
            if node.op not in ("call_module", "call_function", "call_method") or node in sizes:
                continue  # x.size() reads: the full-integer exports write the example's (batch-1) sizes
            module = self.modules.get(node.target) if node.op == "call_module" else None
            if module is not None and is_observer(module):
                continue
            if isinstance(module, QuantStub):
                if node.args[0] not in placeholders:
                    self.add(node, "quantize", "float-island",
                             f"{node.args[0].name} is computed in float and re-enters int8 here")
                elif not self.full_integer:
                    self.add(node, "quantize", "float-io", f"input {node.args[0].name} is float; the full-integer "
                             "export takes it as uint8 (see the lowered module's input_qparams)")
                continue
            if isinstance(module, DeQuantStub):
                if not all(u is output or u in sizes for u in node.users):
                    self.add(node, "dequantize", "float-island",
                             "an int8 value leaves int8 for float ops in the middle of the graph")
                elif not self.full_integer:
                    self.add(node, "dequantize", "float-io", "the output is float; the full-integer export returns "
                             "uint8 (see output_qparams)")
                continue
            key = op_key(node, gm)
            name = key or _target_name(node, gm)
            if meta.quant_region(node) is None:
                why = islands[node.name].reason if node.name in islands else "not in an int8 region"
                kind = "unsupported-op" if key is None or key in _NOT_ON_TPU or self.spec.rule(key) is None \
                    else "float-island"
                if key in _NOT_ON_TPU:
                    why = _NOT_ON_TPU[key]
                self.add(node, name, kind, f"runs in float: {why}")
                continue
            if key in _NOT_ON_TPU or self.spec.rule(key) is None:
                self.add(node, name, "unsupported-op", _NOT_ON_TPU.get(key, f"{name} is not in the EdgeTPU's "
                                                                       "supported op list"))
            if node.name in islands:
                self.add(node, name, "float-island", islands[node.name].reason)
            if key in _PER_TENSOR_ONLY and self._per_channel(key):
                self.add(node, name, "per-channel", f"{_PER_TENSOR_ONLY[key]} weights must be quantized per "
                         "tensor: prepare with fxopt.recipes.static_int8(data, backend='edgetpu')")
            if key in _SPATIAL_ONLY:
                self._spatial(node, key)
            if key not in _MOVES:  # a view / transpose chain is written on at most 3 dims (see tflite.arrange)
                self._shape(node)
        return EdgeTpuReport(self.issues)

    def _per_channel(self, key: str) -> bool:
        """Whether ``key``'s weights are per channel in the graph as prepared (its backend's rule + config)."""
        if self.config is None:
            return False
        from fxopt import backends  # noqa: PLC0415 - the backend the graph was prepared for

        prepared = getattr(backends.get(self.config.backend), "spec", None)
        rule = prepared.rule(key) if prepared is not None else None
        return bool(self.config.per_channel and rule is not None and rule.per_channel)

    def _shape(self, node: torch.fx.Node) -> None:
        shape = meta.shape_of(node)
        if shape is not None and sum(1 for d in shape if d > 1) > 3:
            self.add(node, "tensor", "dynamic-shape",
                     f"shape {tuple(shape)} has more than 3 dimensions larger than 1 (batch must be 1)")

    def _spatial(self, node: torch.fx.Node, key: str) -> None:
        if key == "mean":
            src = node.args[0] if node.args else node.kwargs.get("input")
            shape = meta.shape_of(src) if isinstance(src, torch.fx.Node) else None
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            rank = len(shape) if shape is not None else 4
            dims = list(range(rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
            if rank != 4 or not {d % rank for d in dims} <= {2, 3}:
                self.add(node, key, "unsupported-op", f"Mean over dims {sorted(d % rank for d in dims)} of a "
                         f"{rank}-D value: the EdgeTPU's Mean reduces only over x/y (dims 2, 3 of NCHW)")
            return
        if key not in ("adaptive_avg_pool2d", "adaptive_avg_pool1d"):
            return
        module = self.modules.get(node.target) if node.op == "call_module" else None
        size = getattr(module, "output_size", node.args[1] if len(node.args) > 1 else None)
        if size not in (1, (1,), [1], (1, 1), [1, 1]):
            self.add(node, key, "unsupported-op", f"adaptive average pooling to {size} is not a Mean over x/y "
                     "(only a global average pool maps to the EdgeTPU's Mean)")


def shape_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """``x.size()`` / ``x.shape`` reads and the integer arithmetic on them. The full-integer exports (the
    ``.tflite`` writer, the fixed-batch ONNX) write the sizes the example recorded: constants, not ops."""
    found: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if op_key(node, gm) == "size" or (node.target is getattr and len(node.args) > 1 and node.args[1] == "shape"):
            found.add(node)
        elif node.all_input_nodes and all(a in found for a in node.all_input_nodes) and meta.shape_of(node) is None:
            found.add(node)
    return found


def _target_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


def _integer_io(model) -> dict:
    """Make the graph's inputs and outputs uint8: drop the input QuantizeLinear and the output DequantizeLinear."""
    from onnx import TensorProto, numpy_helper  # noqa: PLC0415

    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    qparams_in, qparams_out = {}, {}
    for value in graph.input:
        readers = [n for n in graph.node if value.name in n.input]
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            raise UnsupportedError(f"input {value.name} is not read by one QuantizeLinear; cannot make it integer")
        q = readers[0]
        qparams_in[value.name] = (float(consts[q.input[1]]), int(consts[q.input[2]]))
        for n in graph.node:
            for i, name in enumerate(n.input):
                if name == q.output[0]:
                    n.input[i] = value.name
        graph.node.remove(q)
        value.type.tensor_type.elem_type = TensorProto.UINT8
    for value in graph.output:
        dq = next((n for n in graph.node if value.name in n.output), None)
        if dq is None or dq.op_type != "DequantizeLinear":
            raise UnsupportedError(f"output {value.name} is not produced by a DequantizeLinear; cannot make it integer")
        qparams_out[value.name] = (float(consts[dq.input[1]]), int(consts[dq.input[2]]))
        src = dq.input[0]
        graph.node.remove(dq)
        for n in graph.node:
            for i, name in enumerate(n.output):
                if name == src:
                    n.output[i] = value.name
            for i, name in enumerate(n.input):
                if name == src:
                    n.input[i] = value.name
        value.type.tensor_type.elem_type = TensorProto.UINT8
    return {"input_qparams": qparams_in, "output_qparams": qparams_out}


# Coral's supported TFLite ops (https://coral.ai/docs/edgetpu/models-intro/#supported-operations)
_TPU_TFLITE_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS", "FULLY_CONNECTED",
    "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD",
    "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE", "STRIDED_SLICE",
    "SUB", "SUM", "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV"})


def _check_tflite(model_bytes: bytes, full_integer: bool) -> EdgeTpuReport:
    """The EdgeTPU check of a ``.tflite`` file: its ops, tensor types, weight granularity and shapes."""
    require("ai_edge_litert", "tflite")
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415

    model = schema.ModelT.InitFromPackedBuf(model_bytes, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    float_type = schema.TensorType.FLOAT32
    issues: list[EdgeTpuIssue] = []
    for sub in model.subgraphs:
        tensors = sub.tensors
        graph_io = {int(i) for i in sub.inputs} | {int(o) for o in sub.outputs}
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            out = tensors[int(op.outputs[0])]
            node = out.name.decode() if isinstance(out.name, bytes) else str(out.name)
            ins, outs = [int(i) for i in op.inputs if i >= 0], [int(o) for o in op.outputs]
            floats = [i for i in ins + outs if tensors[i].type == float_type]
            if name in ("QUANTIZE", "DEQUANTIZE") and floats and all(i in graph_io for i in floats):
                if full_integer:
                    issues.append(EdgeTpuIssue(node, name, "float-io", "a float model input/output: the "
                                               f"{name} runs on the host CPU; lower with TFLiteBackend(int8_io=True)"))
                continue
            if name not in _TPU_TFLITE_OPS:
                issues.append(EdgeTpuIssue(node, name, "unsupported-op", f"{name} is not in the EdgeTPU's "
                                           "supported op list"))
            elif floats:
                issues.append(EdgeTpuIssue(node, name, "float-island", f"{name} computes in float (float32 "
                                           "tensors); the EdgeTPU runs only 8-bit ops"))
            if name == "FULLY_CONNECTED" and len(ins) > 1:
                quant = tensors[ins[1]].quantization
                if quant is not None and quant.scale is not None and len(quant.scale) > 1:
                    issues.append(EdgeTpuIssue(node, name, "per-channel", "FullyConnected weights must be "
                                               "quantized per tensor"))
            for i in outs:
                shape = [int(d) for d in (tensors[i].shape if tensors[i].shape is not None else [])]
                signature = tensors[i].shapeSignature
                if sum(1 for d in shape if d > 1) > 3 or (signature is not None and any(d < 0 for d in signature)):
                    issues.append(EdgeTpuIssue(node, "tensor", "dynamic-shape", f"shape {tuple(shape)}: the "
                                               "EdgeTPU needs static shapes with at most 3 dimensions larger than 1 "
                                               "(batch must be 1)"))
    return EdgeTpuReport(issues)
