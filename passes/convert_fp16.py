"""``convert-fp16``: half-precision weights; the graph's inputs and outputs stay float32.

What was measured on this AVX-512 (with AVX512-FP16) CPU, 2 threads (``bench/bench_dynamic.py``):

* linear: fbgemm's fp16 GEMM (``linear_dynamic_fp16``: fp16 weights, fp32 activations) is faster than
  fp32 ``F.linear``; plain ``F.linear`` on half tensors is slower. Linear layers (and the projections of
  attention, LSTM and GRU) therefore become fp16 dynamic modules, as in ``QuantizeDynamic(dtype=float16)``.
* conv, batch norm, layer norm...: PyTorch's fp16 CPU kernels are no faster than fp32 ones, and casting
  activations to half and back at every layer costs more; these modules keep their weights stored in
  fp16 and upcast them right before the op (:class:`~fxopt.quant.nn.FP16Module`, ``compute="fp32"``).
  ``compute="fp16"`` runs them in half precision instead (for CPUs where that pays off).
* under the qnnpack engine (no fp16 linear kernels) every module is an upcasting ``FP16Module``.

The module tree is walked (leaves the tracer kept opaque included). Float tensors the graph reads with
``get_attr`` are stored in fp16 and upcast where they are read. Stats count converted modules per type
and the bytes before/after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fxopt import Pass, PassResult
from fxopt.graph_utils import get_attr_path, set_attr_path
from fxopt.quant.nn.base import DescribesWeights
from fxopt.quant.nn.dynamic import fp16_linear_available
from fxopt.quant.nn.fp16 import COMPUTE_MODES, FP16Module
from fxopt.quant.nn.swap import dynamic_factory, skip_reason


__all__ = ["ConvertFP16"]

logger = logging.getLogger(__name__)


def _own_float_tensors(module: nn.Module) -> list[torch.Tensor]:
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return [t for t in own if t is not None and t.is_floating_point() and t.dtype != torch.float16]


def _float_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class ConvertFP16(Pass):
    """Store weights in fp16; Linear/attention/RNN compute with fp16 kernels, the rest upcasts (see above)."""

    name = "convert-fp16"
    module_level = True  # walks the module tree; runs on an untraced root too

    compute: str = "fp32"  # for modules other than Linear/attention/RNN/Embedding: "fp32" (upcast) or "fp16"

    def __post_init__(self) -> None:
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"ConvertFP16(compute={self.compute!r}): choose one of {COMPUTE_MODES}")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        before = _float_bytes(gm)
        stats: dict[str, Any] = {}
        notes: list[str] = []
        attr_targets = self._convert_get_attrs(gm, stats)
        native = fp16_linear_available()
        replaced: dict[int, nn.Module] = {}
        plan: list[tuple[str, nn.Module]] = []
        done: list[str] = []
        for qualname, module in gm.named_modules(remove_duplicate=False):
            if not qualname or any(qualname.startswith(p + ".") for p in done):
                continue
            if any(t.startswith(qualname + ".") for t in attr_targets):
                continue  # the graph reads some of its tensors directly: convert its children only
            factory = dynamic_factory(module, dtype=torch.float16)
            if factory is not None and skip_reason(module) is None and native:
                make = factory
            elif factory is not None:  # no fp16 linear kernels (qnnpack): store fp16, upcast the whole module
                make = lambda m=module: FP16Module(m, "fp32")  # noqa: E731
            elif _own_float_tensors(module):
                make = lambda m=module: FP16Module(m, self.compute)  # noqa: E731
            else:
                continue
            if id(module) not in replaced:
                replaced[id(module)] = make()
                stats[type(module).__name__] = stats.get(type(module).__name__, 0) + 1
            plan.append((qualname, replaced[id(module)]))
            done.append(qualname)
        for qualname, new in plan:
            set_attr_path(gm, qualname, new)
        for encoder in gm.modules():
            if isinstance(encoder, nn.TransformerEncoder):
                encoder.use_nested_tensor = False
        modified = bool(plan) or bool(stats.get("attributes"))
        if modified:
            gm.graph.lint()
            gm.recompile()
        after = sum(t.numel() * t.element_size() for t in _stored_tensors(gm))
        stats["bytes_before"], stats["bytes_after"] = before, after
        if modified:
            notes.append(f"weights {before} -> {after} bytes ({after / max(before, 1):.1%})")
        logger.debug("convert-fp16: %s", stats)
        return PassResult(gm, modified, stats, notes)

    @staticmethod
    def _convert_get_attrs(gm: torch.fx.GraphModule, stats: dict[str, Any]) -> set[str]:
        """fp16 storage for float tensors read by ``get_attr``, with an upcast after each read."""
        targets: set[str] = set()
        for node in list(gm.graph.nodes):
            if node.op != "get_attr":
                continue
            value = get_attr_path(gm, node.target)
            targets.add(node.target)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype != torch.float32:
                continue
            half = value.detach().to(torch.float16)
            set_attr_path(gm, node.target, nn.Parameter(half, requires_grad=False)
                          if isinstance(value, nn.Parameter) else half)
            with gm.graph.inserting_after(node):
                up = gm.graph.call_method("to", (node, torch.float32))
            node.replace_all_uses_with(up, delete_user_cb=lambda user: user is not up)
            stats["attributes"] = stats.get("attributes", 0) + 1
        return targets


def _stored_tensors(gm: nn.Module) -> list[torch.Tensor]:
    """Every tensor the module stores, fp16 packed weights included (via ``fxopt_weights``)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        describes = isinstance(module, DescribesWeights)
        tensors = list(module.fxopt_weights().values()) if describes else \
            [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        if not describes:
            for child in module.children():
                visit(child)

    visit(gm)
    return out
