"""InsertQuantStubs: automatic quant/dequant placement driven by the backend's support table.

Every node the backend can run in int8 is tagged with the backend name (``fxopt.meta.quant_region``);
a ``QuantStub`` goes on every edge that enters such a region from float and a ``DeQuantStub`` on every
edge that leaves it. Everything else stays float between a dequant and a quant: a float island, listed
with its reason in ``fxopt.meta.float_islands(gm)`` (and so in ``fxopt.report``).

Which ops open a region: conv and linear (they are worth quantizing on their own), and matmul where the
backend runs it in int8 (ONNX Runtime / OpenVINO: attention's q @ kᵀ and weights @ v, both operands
quantized). Every other int8 op
(add, cat, pooling, reshape, activations…) joins a region only when one of its inputs is already int8,
so a lone ``add`` between float islands is not wrapped in a pointless quant/dequant pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from fxopt import meta
from fxopt.backends.lowering import int8_spec
from fxopt.backends.spec import SHAPE_READERS, op_key
from fxopt.errors import UnsupportedError
from fxopt.graph_utils import mutating_users, unique_name
from fxopt.pass_base import Pass, PassContext, PassResult
from fxopt.quant.stubs import DeQuantStub, QuantStub

__all__ = ["InsertQuantStubs", "data_inputs"]

# Ops that start a region even when their input is float.
_REGION_STARTERS = frozenset({"conv1d", "conv2d", "conv3d", "linear", "matmul"})
_FLOAT_DTYPES = (torch.float32,)


def data_inputs(node: torch.fx.Node, key: str) -> list[torch.fx.Node]:
    """The tensor inputs of ``node`` that carry activations (not weights, shapes or dims)."""
    if key in ("add", "mul", "matmul"):
        return [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    if key == "cat":
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return [a for a in tensors if isinstance(a, torch.fx.Node)] if isinstance(tensors, (list, tuple)) else []
    first = node.args[0] if node.args else node.kwargs.get("input")
    return [first] if isinstance(first, torch.fx.Node) else []


def _is_float_tensor(node: torch.fx.Node) -> bool:
    dtype = meta.dtype_of(node)
    return dtype is None or dtype in _FLOAT_DTYPES


@dataclass(frozen=True)
class InsertQuantStubs(Pass):
    name: ClassVar[str] = "insert-quant-stubs"

    # None: the backend the pipeline targets (compile/lower's ``backend``), x86 when none is named
    backend: Any = None

    def with_context(self, context: PassContext) -> "InsertQuantStubs":
        return context.resolve(self, "recipes and InsertQuantStubs(backend=None)")

    def _spec(self):
        return int8_spec(self.backend)

    def requires(self, gm: torch.fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (QuantStub, DeQuantStub)):
                raise UnsupportedError(
                    "the graph already has quant/dequant stubs; run InsertQuantStubs once per graph"
                )

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        spec = self._spec()
        int8: set[torch.fx.Node] = set()
        islands: list[meta.FloatIsland] = []
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            key = op_key(node, gm)
            reason = self._why_float(node, key, spec, int8, gm)
            if reason is None:
                int8.add(node)
            elif reason:
                islands.append(meta.FloatIsland(node.name, key or _target_name(node, gm), reason))

        if not int8:
            return PassResult(gm, False, {"int8_ops": 0}, [f"no op in this graph runs in int8 on {spec.name}"])

        counter = {"quant": 0, "dequant": 0}

        def add_stub(kind: str, value: torch.fx.Node, where: torch.fx.Node | None = None) -> torch.fx.Node:
            """A stub reading ``value``, right after it (dequant) or right before ``where`` (quant)."""
            cls = QuantStub if kind == "quant" else DeQuantStub
            target = unique_name(f"fxopt_{kind}", lambda n: hasattr(gm, n), start=counter[kind])
            counter[kind] = int(target.rsplit("_", 1)[1]) + 1
            gm.add_submodule(target, cls())
            with gm.graph.inserting_before(where) if where is not None else gm.graph.inserting_after(value):
                return gm.graph.call_module(target, (value,))

        # Quantize float values that feed int8 ops: the stub (and so its observer) sits right before the
        # first int8 reader, after any in-place writes that fill the value (``buffer.new_full(...)`` then
        # ``buffer[...].copy_(image)`` in torchvision's detection transform), and is shared by later int8
        # readers unless the value is written in place again in between.
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        quant_of: dict[torch.fx.Node, torch.fx.Node] = {}
        stubs: list[torch.fx.Node] = []
        for node in list(gm.graph.nodes):
            if node not in int8:
                continue
            rule = spec.rule(op_key(node, gm))
            own = rule is not None and rule.operand_activation is not None  # requantized: a stub per operand
            for src in data_inputs(node, op_key(node, gm)):
                if src in int8 and not own:
                    continue
                stub = None if own else quant_of.get(src)
                if stub is None or written_between(src, order[stub], order[node], order):
                    stub = add_stub("quant", src, node)
                    if not own:
                        quant_of[src] = stub
                    else:
                        meta.set_operand_spec(stub, rule.operand_activation)
                    order[stub] = order[node] - 0.5
                    stubs.append(stub)
                node.replace_input_with(src, stub)
        # Dequantize int8 values read by float consumers (one stub per value; a requantizing stub is one).
        for node in list(int8):
            float_users = [u for u in node.users if u not in int8 and op_key(u, gm) not in SHAPE_READERS]
            if not float_users:
                continue
            deq = add_stub("dequant", node)
            for user in float_users:
                user.replace_input_with(node, deq)
        for node in int8:
            meta.set_quant_region(node, spec.name)
        for stub in stubs:
            meta.set_quant_region(stub, spec.name)

        meta.set_float_islands(gm, islands)
        meta.set_backend(gm, spec.name)
        gm.graph.lint()
        gm.recompile()
        stats = {"int8_ops": len(int8), "quant_stubs": len(stubs), "dequant_stubs": counter["dequant"],
                 "float_ops": len(islands)}
        notes = [f"float: {island}" for island in islands]
        return PassResult(gm, True, stats, notes)

    def _why_float(self, node, key, spec, int8, gm) -> str | None:
        """``None`` when ``node`` runs in int8; otherwise the reason it stays float ("" = not worth listing)."""
        rule = spec.rule(key)
        if rule is not None and meta.keep_float(node):
            return meta.keep_float(node)
        if rule is None:
            if node.op == "call_module":
                leaf = {info.qualname: info for info in meta.leaves(gm)}.get(node.target)
                if leaf is not None:
                    return f"untraced submodule kept in float ({leaf.reason})"
            if key in SHAPE_READERS or (node.op == "call_function" and node.target is getattr):
                return ""
            return f"no int8 kernel on {spec.name} for {_target_name(node, gm)}"
        if rule.kind == "weight_only":
            return ""  # float activations, int8 weights: handled by lowering / QuantizeDynamic
        if not _is_float_tensor(node):
            return ""
        inputs = data_inputs(node, key)
        if not inputs:
            return "no tensor input"
        if any(not _is_float_tensor(a) for a in inputs):
            return "input is not a float tensor"
        if key in ("add", "mul", "matmul") and len(inputs) != 2:
            return f"{key} with a Python scalar stays float"
        if key in ("conv1d", "conv2d", "conv3d", "linear") and node.op == "call_function":
            weights = node.args[1:3]
            if not all(w is None or (isinstance(w, torch.fx.Node) and w.op == "get_attr") for w in weights):
                return "weights are computed in the graph, not constants"
        if key == "getitem" and not (isinstance(node.args[1], (int, slice, tuple))):
            return ""
        if key in _REGION_STARTERS:
            return None
        if any(a in int8 for a in inputs):
            if rule.kind == "share" and inputs[0] not in int8:
                return ""
            return None
        return ""


def written_between(value: torch.fx.Node, start: float, end: float, order: dict) -> bool:
    """Whether an in-place op on ``value`` (or a view of it) runs between graph positions ``start`` and ``end``."""
    return any(start < order.get(user, -1) < end for user in mutating_users(value))


def _target_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)

