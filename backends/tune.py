"""``lower(..., tune=True)``: time int8 against float per int8 region and keep float where int8 loses.

An int8 region is a connected set of nodes that ``InsertQuantStubs`` tagged (``fxopt.meta.quant_region``),
with its stubs and observers. For each region, largest first, the lowering is timed on the example inputs
with the region in int8 and with it float (its nodes untagged: lowering then runs them on float kernels),
interleaved, median of ``rounds``; the region stays float when that is faster by more than ``margin``.
The result says what it chose (``fxopt.meta.float_islands`` and the returned notes).

This is a safety net for kernels that are slow on the machine at hand (e.g. a depthwise shape a library has
no fast path for); it costs one lowering and ``2 * rounds`` runs per region.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
import torch.fx

from fxopt import meta

__all__ = ["int8_regions", "tune_lowering"]


def int8_regions(gm: torch.fx.GraphModule) -> list[list[torch.fx.Node]]:
    """Connected components of the tagged nodes (edges between two tagged nodes), largest first."""
    tagged = [n for n in gm.graph.nodes if meta.quant_region(n) is not None]
    parent = {n: n for n in tagged}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in tagged:
        for src in node.all_input_nodes:
            if src in parent:
                parent[find(src)] = find(node)
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in tagged:
        groups.setdefault(find(node), []).append(node)
    return sorted(groups.values(), key=len, reverse=True)


def _median_ms(modules: dict[str, torch.nn.Module], args: tuple, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in modules}
    with torch.inference_mode():
        for module in modules.values():
            for _ in range(2):
                module(*args)
        for _ in range(rounds):
            for key, module in modules.items():
                start = time.perf_counter()
                module(*args)
                samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def tune_lowering(backend: Any, gm: torch.fx.GraphModule, args: tuple, rounds: int = 7,
                  margin: float = 0.03) -> tuple[torch.nn.Module, list[str]]:
    """Lower ``gm`` with ``backend``, keeping float each int8 region that runs faster in float."""
    work = copy.deepcopy(gm)
    current = backend.lower(copy.deepcopy(work))
    notes: list[str] = []
    for index, region in enumerate(int8_regions(work)):
        names = {n.name for n in region}
        label = f"region {index} ({len(region)} nodes, from {region[0].name})"
        trial = copy.deepcopy(work)
        for node in trial.graph.nodes:
            if node.name in names:
                meta.set_quant_region(node, None)
        island = meta.FloatIsland(region[0].name, "int8 region", f"{label} kept float by lower(tune=True)")
        meta.set_float_islands(trial, [i for i in meta.float_islands(trial) if i.node != island.node] + [island])  # carried into every later lowering of this plan
        candidate = backend.lower(copy.deepcopy(trial))
        ms = _median_ms({"int8": current, "float": candidate}, args, rounds)
        if ms["float"] < ms["int8"] * (1.0 - margin):
            work, current = trial, candidate
            notes.append(f"{label}: float {ms['float']:.2f} ms < int8 {ms['int8']:.2f} ms, kept float")
        else:
            notes.append(f"{label}: int8 {ms['int8']:.2f} ms vs float {ms['float']:.2f} ms, int8 kept")
    return current, notes
