"""Typed accessors for the metadata fxopt keeps on graphs and nodes.

Passes never read or write ``node.meta[...]`` with ad-hoc string keys; they go through these helpers,
so every piece of state that travels between phases has one name, one type and one place to look.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

__all__ = [
    "LeafInfo",
    "operand_spec",
    "set_operand_spec",
    "keep_float",
    "set_keep_float",
    "tensor_meta",
    "shape_of",
    "dtype_of",
    "leaves",
    "set_leaves",
    "untraced_root",
    "trace_notes",
    "set_trace_notes",
    "records",
    "set_records",
    "fused_activation",
    "set_fused_activation",
    "fusion_group",
    "set_fusion_group",
    "backend_of",
    "set_backend",
    "module_notes",
    "add_module_note",
]

# Keys, kept in one place.
_LEAVES = "fxopt.leaves"
_RECORDS = "fxopt.records"
_TRACE_NOTES = "fxopt.trace_notes"


@dataclass(frozen=True)
class LeafInfo:
    """A submodule the tracer kept as an opaque call (a float island), and why."""

    qualname: str  # the model's own name: a module path, ``module.method`` for a method island, "" for the root
    type_name: str
    reason: str
    requested: bool = False  # True when the user asked for it via ``leaf_modules``
    attribute: str | None = None  # where the graph calls it, when that is not ``qualname`` (method islands)

    def __str__(self) -> str:
        why = "requested by the user" if self.requested else self.reason
        return f"{self.qualname} ({self.type_name}): {why}"


def tensor_meta(node: torch.fx.Node) -> Any:
    """The ``TensorMetadata`` recorded by shape propagation, or ``None``."""
    return node.meta.get("tensor_meta")


def shape_of(node: torch.fx.Node) -> torch.Size | None:
    tm = tensor_meta(node)
    return getattr(tm, "shape", None)


def dtype_of(node: torch.fx.Node) -> torch.dtype | None:
    tm = tensor_meta(node)
    return getattr(tm, "dtype", None)


def _gm_meta(gm: torch.nn.Module) -> dict:
    meta = getattr(gm, "meta", None)
    if meta is None:  # GraphModule always has .meta; other modules get none written
        return {}
    return meta


def leaves(gm: torch.nn.Module) -> list[LeafInfo]:
    return list(_gm_meta(gm).get(_LEAVES, []))


def set_leaves(gm: torch.fx.GraphModule, infos: list[LeafInfo]) -> None:
    gm.meta[_LEAVES] = list(infos)


def untraced_root(gm: torch.nn.Module) -> LeafInfo | None:
    """The leaf record of the root when no frontend could trace its ``forward`` (``fxopt.untraced(gm) == [""]``:
    the graph is one opaque call of the model), else None."""
    return next((info for info in leaves(gm) if info.qualname == ""), None)


def trace_notes(gm: torch.nn.Module) -> list[str]:
    """What the tracer specialized on the example inputs (``len()``, ``bool()``, iteration), with source lines."""
    return list(_gm_meta(gm).get(_TRACE_NOTES, []))


def set_trace_notes(gm: torch.fx.GraphModule, notes: list[str]) -> None:
    gm.meta[_TRACE_NOTES] = list(notes)


def records(gm: torch.nn.Module) -> list:
    """Per-pass records (``fxopt.PassRecord``) kept by ``compile``; empty if none."""
    return list(_gm_meta(gm).get(_RECORDS, []))


def _set_module_meta(module: torch.nn.Module, key: str, value: Any) -> None:
    """Write ``value`` under ``key`` where ``module`` has a meta dict (GraphModule, QuantizedModel)."""
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict):
        meta[key] = value


def _set_node_meta(node: torch.fx.Node, key: str, value: Any) -> None:
    """Write ``value`` under ``key`` (``None`` removes the entry)."""
    if value is None:
        node.meta.pop(key, None)
    else:
        node.meta[key] = value


def set_records(gm: torch.nn.Module, recs: list) -> None:
    _set_module_meta(gm, _RECORDS, list(recs))


# ---- quantization state -------------------------------------------------------------------
# Written by InsertQuantStubs / PlaceObservers, read by lowering and report.

_QREGION = "fxopt.qregion"
_ISLANDS = "fxopt.float_islands"
_QCONFIG = "fxopt.quant_config"
_BACKEND = "fxopt.backend"


def quant_region(node: torch.fx.Node) -> str | None:
    """The backend name if ``node`` runs in an int8 region, else ``None`` (float)."""
    return node.meta.get(_QREGION)


def set_quant_region(node: torch.fx.Node, backend: str | None) -> None:
    _set_node_meta(node, _QREGION, backend)


_OPERAND_SPEC = "fxopt.operand_spec"


def operand_spec(node: torch.fx.Node) -> Any:
    """The activation ``QSpec`` of a QuantStub that quantizes one operand of an op with its own operand spec
    (a matmul of two activations: symmetric int8), or ``None`` for the backend's activation spec."""
    return node.meta.get(_OPERAND_SPEC)


def set_operand_spec(node: torch.fx.Node, spec: Any) -> None:
    _set_node_meta(node, _OPERAND_SPEC, spec)


_KEEP_FLOAT = "fxopt.keep_float"


def keep_float(node: torch.fx.Node) -> str | None:
    """Why a pass asked ``InsertQuantStubs`` to leave ``node`` float (e.g. a transformer's residual stream), or
    ``None``."""
    return node.meta.get(_KEEP_FLOAT)


def set_keep_float(node: torch.fx.Node, reason: str | None) -> None:
    _set_node_meta(node, _KEEP_FLOAT, reason)


@dataclass(frozen=True)
class FloatIsland:
    """An op left in float inside a quantized model, and why."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


def float_islands(gm: torch.nn.Module) -> list[FloatIsland]:
    return list(_gm_meta(gm).get(_ISLANDS, []))


def set_float_islands(gm: torch.nn.Module, islands: list[FloatIsland]) -> None:
    _set_module_meta(gm, _ISLANDS, list(islands))


def quant_config(gm: torch.nn.Module) -> Any:
    """The ``fxopt.quant.QuantConfig`` PlaceObservers recorded (weights, observers, backend), or None."""
    return _gm_meta(gm).get(_QCONFIG)


def set_quant_config(gm: torch.fx.GraphModule, config: Any) -> None:
    gm.meta[_QCONFIG] = config


def backend_of(module: torch.nn.Module) -> str | None:
    """The backend a module was prepared for (after InsertQuantStubs) or lowered to."""
    return _gm_meta(module).get(_BACKEND)


def set_backend(module: torch.nn.Module, name: str | None) -> None:
    _set_module_meta(module, _BACKEND, name)


# BatchNorm output statistics (written by passes/fold_batchnorm.py, read by analytical bias correction).
_BN_OUTPUT = "fxopt.batchnorm_output"


def batchnorm_output(node: torch.fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel ``(mean, std)`` of this node's output as the BatchNorm folded into it models it
    (``beta``, ``|gamma|``), or ``None`` where no BatchNorm was folded."""
    return node.meta.get(_BN_OUTPUT)


def set_batchnorm_output(node: torch.fx.Node, stats: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    _set_node_meta(node, _BN_OUTPUT, None if stats is None else (stats[0].detach().clone(), stats[1].detach().clone()))


# Fusion tags (written by passes/fuse_activations.py, read by quantization lowering).
_FUSED_ACTIVATION = "fxopt.fused_activation"
_FUSION_GROUP = "fxopt.fusion_group"


def fused_activation(node: torch.fx.Node) -> str | None:
    """The activation (``"relu"``, ``"relu6"``) fused into this producer node, or ``None``."""
    return node.meta.get(_FUSED_ACTIVATION)


def set_fused_activation(node: torch.fx.Node, activation: str | None) -> None:
    _set_node_meta(node, _FUSED_ACTIVATION, None if activation is None else str(activation))


def fusion_group(node: torch.fx.Node) -> str | None:
    """The pattern of the fused kernel this node is (part of), e.g. ``"conv+relu"``, or ``None``."""
    return node.meta.get(_FUSION_GROUP)


def set_fusion_group(node: torch.fx.Node, group: str | None) -> None:
    _set_node_meta(node, _FUSION_GROUP, None if group is None else str(group))


# Lowering provenance (written by int8 lowering, read by ``fxopt.lower(..., check=True)``).
_LOWERED_FROM = "fxopt.lowered_from"
_CHECKPOINT = "fxopt.checkpoint"


def lowered_from(module: torch.nn.Module) -> dict[str, str]:
    """For a lowered graph: prepared node name -> the lowered node holding that value (as int8 readers see it)."""
    return dict(_gm_meta(module).get(_LOWERED_FROM, {}))


def set_lowered_from(module: torch.nn.Module, mapping: dict[str, str]) -> None:
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict):
        meta[_LOWERED_FROM] = dict(mapping)


def checkpoint(node: torch.fx.Node) -> str | None:
    """In a reference simulation: the prepared node whose int8 value this quantize-dequantize node models."""
    return node.meta.get(_CHECKPOINT)


def set_checkpoint(node: torch.fx.Node, name: str) -> None:
    node.meta[_CHECKPOINT] = name


_EXAMPLE_INPUTS = "fxopt.example_inputs"


def example_inputs(module: torch.nn.Module) -> tuple:
    """The positional inputs ``fxopt.compile`` traced with (``()`` when none were given)."""
    return tuple(_gm_meta(module).get(_EXAMPLE_INPUTS, ()))


def set_example_inputs(module: torch.nn.Module, args: tuple) -> None:
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict):
        meta[_EXAMPLE_INPUTS] = tuple(args)


# Per-layer notes written by passes (e.g. prune-channels: why a layer kept its channels); the report shows them.
_MODULE_NOTES = "fxopt.module_notes"


def module_notes(gm: torch.nn.Module) -> dict[str, str]:
    """``{layer qualname: note}`` that passes left for the report."""
    return dict(_gm_meta(gm).get(_MODULE_NOTES, {}))


def add_module_note(gm: torch.nn.Module, qualname: str, note: str) -> None:
    meta = getattr(gm, "meta", None)
    if isinstance(meta, dict):
        notes = meta.setdefault(_MODULE_NOTES, {})
        notes[qualname] = "; ".join(x for x in (notes.get(qualname), note) if x)
