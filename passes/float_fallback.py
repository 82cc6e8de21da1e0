"""``float-fallback``: keep the int8 ops that hurt the output most in float, until a target SQNR holds.

Runs on a calibrated static-int8 graph (after ``Calibrate``). With the float simulation of
:mod:`fxopt.quant.simulation` on the first ``num_batches`` (default 2) calibration batches it

1. measures the output SQNR with everything int8; at or above ``min_sqnr`` dB nothing changes;
2. measures each compute op (conv, linear, add, mul, cat…) quantized **alone**, every other op float:
   its own damage, free of the others' noise (its weight, the values it reads and the value it writes);
3. keeps the most damaging ops float, worst first, until the simulated output reaches ``min_sqnr`` or
   ``max_float_fraction`` of the ops are float.

A kept op leaves the int8 region (its node loses ``fxopt.meta.quant_region``): lowering runs it in float
between a dequantize and a lazy quantize with its calibrated qparams. ``metric(outputs, reference) ->
float`` (higher is better, e.g. top-1 agreement or accuracy on a held-out batch) replaces the SQNR; the
target is then ``min_metric``. Notes name each kept op, its damage alone and the output before/after;
stats give the float fraction, the weight bytes the kept ops add (float32 instead of int8) and the share
of the model's conv/linear multiply-adds that run in float (the latency cost).

The search is the static counterpart of ``QuantizeDynamic(min_cosine=...)`` and shares its shape
(alone-damage ranking, cap on the float fraction); it is written on :class:`~fxopt.quant.simulation.Simulation`
so both can move to ``fxopt.quant.sensitivity`` together.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx

from fxopt import Pass, PassResult, meta
from fxopt.errors import CalibrationError, UnsupportedError
from fxopt.quant.simulation import Simulation, sqnr_db

from .calibrate import as_call

__all__ = ["FloatFallback"]

logger = logging.getLogger(__name__)


def simulation_of(gm: torch.fx.GraphModule) -> Simulation:
    """The switchable float simulation of a calibrated static-int8 graph, its units classified by the spec of
    the backend the graph was prepared for."""
    from fxopt import backends  # noqa: PLC0415 - passes may read a backend's spec
    from fxopt.backends.spec import op_key  # noqa: PLC0415

    spec = backends.get(meta.backend_of(gm)).spec
    config = meta.quant_config(gm)

    def is_compute(node: torch.fx.Node) -> bool:
        rule = spec.rule(op_key(node, node.graph.owning_module))
        return rule is not None and rule.kind == "compute"

    def per_channel(node: torch.fx.Node) -> bool:
        rule = spec.rule(op_key(node, node.graph.owning_module))
        return bool(rule and rule.per_channel and config.per_channel)

    return Simulation(gm, is_compute, per_channel)


def rank_sensitivity(gm: torch.fx.GraphModule, data: Iterable[Any]) -> list[dict[str, Any]]:
    """Every int8 compute op of a calibrated graph, quantized alone (all others float) on ``data``: its node,
    op and the output SQNR vs the float simulation, most damaging first. What ``FloatFallback`` keeps float
    first, and what ``fxopt inspect --sensitivity`` shows."""
    from fxopt.backends.spec import op_key  # noqa: PLC0415

    batches = [as_call(item, i) for i, item in enumerate(data)]
    if not batches:
        raise CalibrationError("a sensitivity ranking needs at least one batch of data")
    sim = simulation_of(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    sim.configure([])
    reference = sim.run(batches)
    rows = []
    for unit in sim.units:
        sim.configure([unit])
        node = nodes[unit]
        target = node.target if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))
        rows.append({"node": unit, "op": op_key(node, gm) or "op", "target": str(target),
                     "sqnr_db": float(sqnr_db(sim.run(batches), reference))})
    sim.configure(sim.units)
    return sorted(rows, key=lambda r: r["sqnr_db"])


@dataclass(frozen=True)
class FloatFallback(Pass):
    name: ClassVar[str] = "float-fallback"

    data: Any = field(default=None, compare=False, repr=False)
    min_sqnr: float | None = None
    max_float_fraction: float = 0.1
    metric: Callable[[list, list], float] | None = field(default=None, compare=False)
    min_metric: float | None = None
    num_batches: int | None = 2

    def __post_init__(self) -> None:
        if (self.min_sqnr is None) == (self.min_metric is None):
            raise ValueError("FloatFallback needs exactly one target: min_sqnr=dB, or metric= with min_metric=")
        if self.min_metric is not None and self.metric is None:
            raise ValueError("FloatFallback(min_metric=...) needs metric=callable(outputs, reference) -> float")
        if not 0.0 <= self.max_float_fraction <= 1.0:
            raise ValueError(f"FloatFallback(max_float_fraction={self.max_float_fraction}) must be in [0, 1]")
        if self.data is None:
            raise CalibrationError("FloatFallback needs data= (calibration batches) to measure the damage")

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if meta.quant_config(gm) is None:
            raise UnsupportedError("FloatFallback runs on a calibrated static-int8 graph: run InsertQuantStubs, "
                                   "PlaceObservers and Calibrate first (fxopt.recipes.static_int8 does)")

    def _score(self, outputs: list, reference: list) -> float:
        return self.metric(outputs, reference) if self.metric is not None else sqnr_db(outputs, reference)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from fxopt.backends.spec import op_key  # noqa: PLC0415

        batches = [as_call(item, i) for i, item in enumerate(self.data)]
        if self.num_batches is not None:
            batches = batches[: self.num_batches]
        if not batches:
            raise CalibrationError("FloatFallback got empty data: give at least one batch")
        sim = simulation_of(gm)
        units = sim.units
        target = self.min_sqnr if self.min_sqnr is not None else self.min_metric
        what = "SQNR dB" if self.metric is None else "metric"
        sim.configure([])
        reference = sim.run(batches)
        sim.configure(units)
        before = self._score(sim.run(batches), reference)
        stats: dict[str, Any] = {"units": len(units), "score_int8": round(before, 3)}
        if before >= target or not units:
            stats.update(kept_float=[], score=round(before, 3))
            return PassResult(gm, False, stats, [f"{what} {before:.2f} already meets the target {target}"])
        cap = int(self.max_float_fraction * len(units))
        damage: dict[str, float] = {}
        for unit in units:
            sim.configure([unit])
            score = self._score(sim.run(batches), reference)
            damage[unit] = -score  # lower alone-score = more damage
        order = sorted(units, key=lambda u: -damage[u])
        kept: list[str] = []
        after = before
        for unit in order[:cap]:
            kept.append(unit)
            sim.configure([u for u in units if u not in kept])
            after = self._score(sim.run(batches), reference)
            if after >= target:
                break
        nodes = {n.name: n for n in gm.graph.nodes}
        notes = []
        for unit in kept:
            node = nodes[unit]
            meta.set_quant_region(node, None)
            reason = f"kept float by float-fallback: quantized alone, output {what} {-damage[unit]:.2f}"
            island = meta.FloatIsland(node.name, op_key(node, gm) or "op", reason)
            meta.set_float_islands(gm, [i for i in meta.float_islands(gm) if i.node != node.name] + [island])
            notes.append(f"{node.name}: {reason}")
        extra_bytes, float_macs, total_macs = _costs(gm, nodes, units, set(kept))
        stats.update(kept_float=kept, score=round(after, 3), float_fraction=round(len(kept) / len(units), 4),
                     extra_weight_bytes=extra_bytes,
                     float_mac_fraction=round(float_macs / total_macs, 4) if total_macs else 0.0)
        notes.append(f"{what} {before:.2f} -> {after:.2f} with {len(kept)}/{len(units)} ops float "
                     f"(+{extra_bytes / 1024:.1f} KiB weights, {stats['float_mac_fraction']:.1%} of conv/linear MACs "
                     "in float)")
        if after < target:
            below = [u for u in units if -damage[u] < target]
            if len(below) > cap:
                why = (f"{len(below)} ops each bring the output below {target} on their own (the worst alone: "
                       f"{-damage[order[0]]:.2f}, the {cap + 1}th: {-damage[order[cap]]:.2f}), and "
                       f"max_float_fraction={self.max_float_fraction} lets only {cap} of {len(units)} stay float")
            else:
                why = (f"every op alone keeps {what} >= {target} once the {len(kept)} worst are float, but the "
                       f"remaining {len(units) - len(kept)} int8 ops add up to {after:.2f}: the error is spread "
                       f"over many ops")
            stats["ops_below_target_alone"] = len(below)
            stats["reason"] = why
            notes.append(f"target {target} not reached: {why} (try more calibration data, adaround=True, "
                         "equalize=True, or a higher max_float_fraction)")
        logger.info("float-fallback: %s", notes[-1])
        gm.recompile()
        return PassResult(gm, bool(kept), stats, notes)


def _costs(gm: torch.fx.GraphModule, nodes: dict, units: list[str], kept: set[str]) -> tuple[int, int, int]:
    """Extra weight bytes of the kept ops (4 instead of 1 per weight) and float / total conv+linear MACs."""
    extra = float_macs = total = 0
    for unit in units:
        node = nodes[unit]
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        layer = next((m for m in (module, getattr(module, "conv", None), getattr(module, "linear", None))
                      if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))), None)
        if layer is None:
            continue
        shape = meta.shape_of(node)
        positions = math.prod(shape[2:]) if shape is not None and len(shape) > 2 else 1
        macs = layer.weight.numel() * positions
        total += macs
        if unit in kept:
            extra += layer.weight.numel() * 3
            float_macs += macs
    return extra, float_macs, total
