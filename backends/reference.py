"""The ``reference`` backend: the float simulation of a calibrated (or QAT) int8 graph.

``fxopt.lower(prepared, "reference")`` returns the prepared graph itself with every quantization done in
float (torch.ao calls this the *reference* model):

* each observer (after a ``QuantStub`` or an int8 compute op) becomes a :class:`~fxopt.quant.simulate.QuantDequant`
  with its calibrated qparams; where the int8 kernel fuses the ReLU/ReLU6 that follows (the lowering
  rule), the rounding moves after the activation with the clamped range ``[0, hi]``;
* ops that keep their input's qparams (pooling, reshape, relu …) and ops with a fixed output range
  (sigmoid, tanh …) round to those qparams, as the int8 kernels do;
* conv / linear weights are rounded to their int8 grid (the same weight qparams as lowering: per channel
  where the backend's rule allows it), embedding rows to their 8-bit row grid; biases stay float;
* stubs stay identities, float islands stay float.

Every rounding node is tagged (``fxopt.meta.checkpoint``) with the prepared node whose int8 value it
models, so ``fxopt.lower(prepared, backend, check=True)`` can put the two side by side layer by layer.
The simulation follows the spec of the backend the graph was prepared for (``ReferenceBackend(spec)``
to pick another one).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt import meta
from fxopt.quant.fake_quant import fake_quantize
from fxopt.quant.simulate import QuantDequant
from fxopt.quant.spec import fused_activation_qparams
from fxopt.quant.stubs import QuantStub

from fxopt.graph_utils import bypass_node, is_observer
from fxopt.registry import Backend, Support

from ._lower_ops import is_depthwise, weight_qparams, weight_spec
from .lowering import _check_prepared
from .spec import BackendSpec, op_key

__all__ = ["ReferenceBackend", "simulate"]

_WEIGHTED = {"conv1d", "conv2d", "conv3d", "linear"}
_FUSABLE = {"relu": "relu", "relu6": "relu6", "hardtanh": "relu6"}


class ReferenceBackend(Backend):
    """Lower a calibrated graph to its float simulation (see the module docstring)."""

    name = "reference"

    def __init__(self, spec: BackendSpec | None = None) -> None:
        self.spec = spec

    def supports(self, node: torch.fx.Node) -> Support:
        return Support(True, "the reference simulation runs every op (in float)")

    def lower(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return simulate(gm, self.spec)


def _spec_for(gm: torch.fx.GraphModule, spec: BackendSpec | None) -> BackendSpec:
    if spec is not None:
        return spec
    from fxopt import registry  # noqa: PLC0415 - the backend the graph was prepared for

    found = getattr(registry.get(meta.backend_of(gm) or "x86"), "spec", None)
    if found is None:
        raise TypeError(f"backend {meta.backend_of(gm)!r} has no int8 spec to simulate")
    return found


def simulate(gm: torch.fx.GraphModule, spec: BackendSpec | None = None) -> torch.fx.GraphModule:
    """The float simulation of the prepared + calibrated graph ``gm`` (not changed) for ``spec``."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"the reference backend lowers a torch.fx.GraphModule, got {type(gm).__name__}")
    spec = _spec_for(gm, spec)
    _check_prepared(gm, spec)
    sim = copy.deepcopy(gm)
    _Simulation(sim, spec).run()
    sim.graph.lint()
    sim.recompile()
    meta.set_backend(sim, "reference")
    return sim


class _Simulation:
    def __init__(self, gm: torch.fx.GraphModule, spec: BackendSpec) -> None:
        self.gm, self.spec = gm, spec
        self.config = meta.quant_config(gm)
        self.act = spec.activation
        if self.config is not None and self.config.backend == spec.name:
            self.act = self.config.activation_spec
        lo, hi = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}[self.act.dtype]
        self.full = (lo, hi)  # int8 tensors clamp to their dtype's range, whatever range the observer used
        self.modules = dict(gm.named_modules())
        self.qparams: dict[torch.fx.Node, tuple[float, int]] = {}
        self.done: set[torch.fx.Node] = set()
        self.counter = 0

    # ---- graph edits ----------------------------------------------------------------------------
    def _add_module(self, base: str, module: nn.Module) -> str:
        name = f"{base.replace('.', '_')}_sim"
        while hasattr(self.gm, name):
            self.counter += 1
            name = f"{base.replace('.', '_')}_sim{self.counter}"
        self.gm.add_submodule(name, module)
        return name

    def _round_after(self, node: torch.fx.Node, qparams: tuple[float, int], lo_hi: tuple[int, int] | None = None,
                     ) -> torch.fx.Node:
        """Insert a QuantDequant after ``node`` (its readers read it) modelling ``node``'s int8 value."""
        lo, hi = lo_hi or self.full
        target = self._add_module(f"{node.name}_q", QuantDequant(*qparams, lo, hi))
        with self.gm.graph.inserting_after(node):
            fq = self.gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(fq, delete_user_cb=lambda user: user is not fq)
        meta.set_checkpoint(fq, node.name)
        self.qparams[fq] = qparams
        return fq

    # ---- the walk -------------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node in self.done or node.op not in ("call_module", "call_function", "call_method"):
                continue
            module = self.modules.get(node.target) if node.op == "call_module" else None
            if module is not None and getattr(module, "fxopt_lowered_as_identity", False):
                # QAT's grid rounding (avg-pool onto its input's grid, fixed-range ops): the int8 kernel rounds,
                # and so does this simulation where it handles that op, as lowering does
                bypass_node(self.gm, node, node.args[0])
                continue
            if module is not None and is_observer(module):
                self._observer(node, module)
                continue
            key = op_key(node, self.gm)
            rule = self.spec.rule(key)
            if rule is not None and rule.kind == "weight_only":
                self._embedding(node, module)
            if rule is None or meta.quant_region(node) is None:
                continue
            if rule.kind == "compute" and key in _WEIGHTED:
                self._weights(node, key, module)
            elif rule.kind == "fixed":
                scale, zero_point = rule.fixed_qparams
                self.qparams[self._round_after(node, (scale, zero_point), self._dtype_range())] = (scale, zero_point)
            elif rule.kind == "share":
                src = next(iter(node.all_input_nodes), None)
                if src is not None and src in self.qparams:
                    self._round_after(node, self.qparams[src])

    def _dtype_range(self) -> tuple[int, int]:
        return self.full

    def _observer(self, node: torch.fx.Node, observer: nn.Module) -> None:
        scale, zero_point = observer.calculate_qparams()
        qparams = float(torch.as_tensor(scale).reshape(-1)[0]), int(torch.as_tensor(zero_point).reshape(-1)[0])
        src = node.args[0]
        producer = self.modules.get(src.target) if src.op == "call_module" else None
        follower = None if isinstance(producer, QuantStub) else self._fusable_follower(node)
        inner = getattr(producer, "activation", None)
        fused = "relu6" if isinstance(inner, nn.ReLU6) else "relu" if isinstance(inner, nn.ReLU) else None
        if fused is not None:
            qparams = fused_activation_qparams(self.act, qparams, fused)
        if follower is not None:  # the int8 kernel applies it: round once, after it, on [0, hi]
            act_node, act = follower
            node.replace_all_uses_with(src)
            self.gm.graph.erase_node(node)
            self.done.add(act_node)
            self._round_after(act_node, fused_activation_qparams(self.act, qparams, act))
            return
        own = observer.spec.qrange if observer.spec.dtype != self.act.dtype else self.full  # matmul operands
        sim = QuantDequant(*qparams, *own)
        parent, _, leaf = node.target.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, leaf, sim)
        meta.set_checkpoint(node, node.name)
        self.qparams[node] = qparams

    def _fusable_follower(self, obs: torch.fx.Node) -> tuple[torch.fx.Node, str] | None:
        """Lowering's rule: the observed value's only reader is a ReLU/ReLU6 in the int8 region."""
        if len(obs.users) != 1:
            return None
        user = next(iter(obs.users))
        if meta.quant_region(user) is None or not user.args or user.args[0] is not obs:
            return None
        act = _FUSABLE.get(op_key(user, self.gm))
        if act is None:
            return None
        if op_key(user, self.gm) == "hardtanh" and _hardtanh_bounds(user, self.modules) != (0.0, 6.0):
            return None
        return user, act

    def _weight_qparams(self, weight: torch.Tensor, key: str, groups: int = 1):
        """``(scale, zero_point, weight spec, per_channel)`` of ``weight``: the qparams lowering packs it with
        (per tensor: 0-d scale and zero point)."""
        rule = self.spec.rule(key)
        per_channel = bool(rule and rule.per_channel) and (self.config is None or self.config.per_channel)
        depthwise = is_depthwise(weight, groups)
        scale, zero_point = weight_qparams(weight, per_channel, self.spec, self.config, depthwise)
        wspec, _ = weight_spec(self.spec, self.config, per_channel, depthwise)
        if not per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return scale, zero_point, wspec, per_channel

    def _weight_grid(self, weight: torch.Tensor, key: str, groups: int = 1) -> torch.Tensor:
        scale, zero_point, wspec, _ = self._weight_qparams(weight, key, groups)
        return fake_quantize(weight.detach().float(), scale, zero_point, wspec)

    def _weights(self, node: torch.fx.Node, key: str, module: nn.Module | None) -> None:
        if module is not None and callable(getattr(module, "fxopt_lowering", None)):
            return  # a QAT layer: in eval mode it already runs its folded weights on the grid lowering packs
        if module is not None:
            inner_name = "linear" if key == "linear" else "conv"
            sim = copy.deepcopy(module)
            inner = getattr(sim, inner_name, sim)
            inner.weight = nn.Parameter(self._weight_grid(inner.weight, key, getattr(inner, "groups", 1)),
                                        requires_grad=False)
            self._swap(node, sim)
            return
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            return  # lowering keeps it float too
        value = self.gm.get_parameter(weight.target) if _is_param(self.gm, weight.target) else \
            _fetch(self.gm, weight.target)
        name = self._add_module(weight.target, nn.Module())
        delattr(self.gm, name)
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        self.gm.register_buffer(name, self._weight_grid(value, key, groups if isinstance(groups, int) else 1))
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.get_attr(name)
        node.replace_input_with(weight, new)

    def _embedding(self, node: torch.fx.Node, module: nn.Module | None) -> None:
        """Weight-only int8 embeddings: rows on their 8-bit grid (scale and offset per row)."""
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module.max_norm is not None:
            return
        sim = copy.deepcopy(module)
        w = sim.weight.detach().float()
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        scale = ((hi - lo) / 255.0).clamp_min(1e-8)
        sim.weight = nn.Parameter(torch.round((w - lo) / scale) * scale + lo, requires_grad=False)
        self._swap(node, sim)

    def _swap(self, node: torch.fx.Node, sim: nn.Module) -> None:
        """Call ``sim`` at ``node``: in place of the module when this is its only call, else under a new name."""
        calls = [n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == node.target]
        if len(calls) == 1:
            parent, _, leaf = node.target.rpartition(".")
            setattr(self.gm.get_submodule(parent) if parent else self.gm, leaf, sim)
        else:
            node.target = self._add_module(node.target, sim)


def _hardtanh_bounds(node: torch.fx.Node, modules: dict) -> tuple[float, float] | None:
    if node.op == "call_module":
        mod = modules[node.target]
        return float(mod.min_val), float(mod.max_val)
    if node.target is F.hardtanh:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return float(lo), float(hi)
    return None


def _is_param(gm: torch.nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _fetch(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
