"""Float simulation of a prepared + calibrated static-int8 graph, one quantized unit at a time.

The accuracy-aware PTQ passes need to ask "what does quantizing *this* op do to the output?" many times
without lowering. :class:`Simulation` copies a calibrated graph once and replaces every activation
observer by an :class:`ActivationSim` (identity, or quantize→dequantize with the observer's qparams) and
keeps, for every weighted int8 op (conv / linear), its weight and the same weight on its int8 grid.
``configure(int8_units)`` then switches on exactly what the real lowering would quantize when only
``int8_units`` run in int8 and every other compute op stays float:

* the weight of each int8 unit;
* each observed value that an int8 unit produces or reads (looking through ops that do not change values,
  e.g. pooling, reshape, ReLU): lowering quantizes a float value lazily where an int8 op reads it.

Units are the compute ops of the int8 regions (``OpRule.kind == "compute"``: conv, linear, add, mul,
cat…), identified by node name. The simulation runs the float kernels: it is fast, and what it leaves out
(the integer requantization inside a kernel, rounding of fixed-range ops) is small next to the errors it
models. Shared by :class:`fxopt.passes.CorrectBias` and :class:`fxopt.passes.FloatFallback`; it is meant to
share code with the dynamic ``min_cosine`` search once that moves to ``fxopt.quant.sensitivity``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn as nn

from fxopt import meta
from fxopt.graph_utils import unique_name

from .fake_quant import fake_quantize
from .observers import Observer
from .stubs import QuantConfig
from .weight_sim import fake_quantize_weight, is_depthwise

__all__ = ["ActivationSim", "Simulation", "noise_and_signal", "sqnr_db"]


class ActivationSim(nn.Module):
    """Identity, or fake quantization with fixed qparams when ``enabled``."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, spec: Any) -> None:
        super().__init__()
        self.scale, self.zero_point, self.spec = scale, zero_point, spec
        self.enabled = False

    def forward(self, x: Any) -> Any:
        if not self.enabled or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        return fake_quantize(x, self.scale, self.zero_point, self.spec)


def noise_and_signal(outputs: list[Any], reference: list[Any]) -> tuple[float, float]:
    """Summed squared error and squared reference over all floating outputs (float64 sums)."""
    signal = noise = 0.0
    for out, ref in zip(outputs, reference):
        for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                signal += float(b.double().pow(2).sum())
                noise += float((a.double() - b.double()).pow(2).sum())
    return noise, signal


def sqnr_db(outputs: list[Any], reference: list[Any]) -> float:
    """Signal-to-quantization-noise ratio of all floating outputs together, in dB."""
    noise, signal = noise_and_signal(outputs, reference)
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(torch.log10(torch.tensor(signal / noise)))


class Simulation:
    """See the module docstring. ``is_share(node)`` / ``is_compute(node)`` classify region nodes."""

    def __init__(self, gm: torch.fx.GraphModule, is_compute: Callable[[torch.fx.Node], bool],
                 per_channel: Callable[[torch.fx.Node], bool]) -> None:
        config = meta.quant_config(gm)
        if not isinstance(config, QuantConfig):
            raise ValueError("the graph has no quantization config: run InsertQuantStubs and PlaceObservers first")
        self.gm = copy.deepcopy(gm)
        self.gm.eval()
        nodes = {n.name: n for n in self.gm.graph.nodes}
        modules = dict(self.gm.named_modules())
        self.sims: dict[str, ActivationSim] = {}  # observer node name -> its sim
        for node in self.gm.graph.nodes:
            obs = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(obs, Observer) and obs.calibrated:
                scale, zero_point = obs.calculate_qparams()
                sim = ActivationSim(scale, zero_point, obs.spec)
                # one sim per node, even where several nodes call one observer (a cat sharing its inputs'
                # qparams): each is switched on by its own unit
                node.target = unique_name(f"fxopt_sim_{node.name}", lambda n: hasattr(self.gm, n))
                self.gm.add_submodule(node.target, sim)
                self.sims[node.name] = sim
        if self.sims:
            self.gm.delete_all_unused_submodules()
            self.gm.recompile()
        self.units = [n.name for n in self.gm.graph.nodes if meta.quant_region(n) is not None and is_compute(n)]
        self.weights: dict[str, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}
        for name in self.units:
            node = nodes[name]
            layer = _weighted(modules.get(node.target)) if node.op == "call_module" else None
            if layer is not None:
                w = layer.weight
                self.weights[name] = (w, w.detach().clone(), fake_quantize_weight(
                    w, config, per_channel(node), is_depthwise(w, getattr(layer, "groups", 1))))
        self._reads, self._writes = self._observer_links(nodes, is_compute)

    def _observer_links(self, nodes, is_compute) -> tuple[dict[str, set[str]], dict[str, str]]:
        """For every unit: the observers whose values it reads; for every observer: the unit that wrote it."""
        reads: dict[str, set[str]] = {u: set() for u in self.units}
        writes: dict[str, str] = {}
        units = set(self.units)
        for obs_name in self.sims:
            obs = nodes[obs_name]
            producer = obs.args[0] if obs.args else None
            if isinstance(producer, torch.fx.Node) and producer.name in units:
                writes[obs_name] = producer.name
            frontier, seen = list(obs.users), set()
            while frontier:  # through value-preserving region ops to the compute ops that read the value
                user = frontier.pop()
                if user in seen:
                    continue
                seen.add(user)
                if user.name in units:
                    reads[user.name].add(obs_name)
                elif meta.quant_region(user) is not None and not is_compute(user) and user.name not in self.sims:
                    frontier.extend(user.users)
        return reads, writes

    def configure(self, int8_units: Iterable[str]) -> None:
        """Quantize exactly what lowering would with ``int8_units`` in int8 and every other unit float."""
        chosen = set(int8_units)
        for name, (param, original, quantized) in self.weights.items():
            with torch.no_grad():
                param.copy_(quantized if name in chosen else original)
        active = {obs for unit in chosen for obs in self._reads.get(unit, ())}
        active |= {obs for obs, unit in self._writes.items() if unit in chosen}
        for name, sim in self.sims.items():
            sim.enabled = name in active

    def run(self, batches: list[tuple[tuple, dict]]) -> list[Any]:
        with torch.inference_mode():
            return [self.gm(*args, **kwargs) for args, kwargs in batches]


def _weighted(module: nn.Module | None) -> nn.Module | None:
    """The conv/linear holding the weight of a (possibly fused) module."""
    for candidate in (module, getattr(module, "conv", None), getattr(module, "linear", None)):
        if isinstance(candidate, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return candidate
    return None
