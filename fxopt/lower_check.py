"""``fxopt.lower(..., check=True)``: put a lowered int8 graph beside its float simulation, layer by layer.

The simulation (the ``"reference"`` backend) rounds at *checkpoints*: every place the int8 graph holds an
integer value (``fxopt.meta.checkpoint``). Lowering records which of its nodes holds each prepared value
(``fxopt.meta.lowered_from``). :func:`check_lowering` runs the lowered graph once, recording those values,
then runs the simulation *teacher-forced*: at each checkpoint it compares the simulated value with the
lowered one, in quantization steps of that checkpoint's scale, and continues from the lowered value. So
each layer is judged on its own inputs, errors do not pile up along the network, and the first layer whose
error exceeds the tolerance is the layer whose lowering is wrong.

Rounding alone gives at most about one step (an int8 kernel and the float simulation may round a tie or
an accumulation differently); a lowering bug gives tens or hundreds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from . import meta
from .errors import NumericsError
from .quant.stubs import QuantStub

__all__ = ["LayerCheck", "LoweringCheck", "check_lowering", "check_outputs", "raise_on_divergence", "DEFAULT_STEPS",
           "DEFAULT_OUTPUT_SQNR_DB"]

DEFAULT_STEPS = 3.0  # rounding alone: <= 1 step almost everywhere, 2 seen on a 1.6M-value detector conv (x86)
# Runtime backends (ONNX Runtime, OpenVINO, LiteRT) hide their layers: their whole output is compared with the
# simulation. Kernel rounding differences compound along the network; measured 33-42 dB on classifiers, while a
# broken op lowering gives < 10 dB.
DEFAULT_OUTPUT_SQNR_DB = 25.0


@dataclass(frozen=True)
class LayerCheck:
    """One checkpoint: the prepared node, what produced it, its qparams and the error in steps."""

    name: str
    op: str
    scale: float
    zero_point: int
    max_steps: float
    mean_steps: float
    values: int

    def __str__(self) -> str:
        return (f"{self.name} ({self.op}, scale={self.scale:.4g}, zero_point={self.zero_point}): "
                f"{self.max_steps:.1f} steps max, {self.mean_steps:.2f} mean over {self.values} values")


@dataclass
class LoweringCheck:
    """What :func:`check_lowering` found: every compared checkpoint (in graph order), the ones with no lowered
    value, and those of ops the lowering kept float on purpose (``fxopt.meta.float_islands``)."""

    layers: list[LayerCheck]
    unmatched: list[str]
    tolerance: float
    kept_float: list[str] = field(default_factory=list)  # checkpoints the lowered graph never rounds (not compared)

    @property
    def worst(self) -> LayerCheck | None:
        return max(self.layers, key=lambda r: r.max_steps, default=None)

    @property
    def first_failure(self) -> LayerCheck | None:
        return next((r for r in self.layers if not r.max_steps <= self.tolerance), None)


def _graph_module(lowered: torch.nn.Module) -> torch.fx.GraphModule:
    gm = getattr(lowered, "graph_module", lowered)
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"lowering check needs a graph (GraphModule or QuantizedModel), got {type(lowered).__name__}")
    return gm


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}
        self.quantized: dict[str, bool] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.quantized[n.name] = any(t.is_quantized for t in leaves)
            self.values[n.name] = pytree.tree_map(
                lambda t: t.dequantize() if isinstance(t, torch.Tensor) and t.is_quantized else t, out)
        return out


def _describe(node: torch.fx.Node, sim: torch.fx.GraphModule) -> str:
    """The op a checkpoint models: the observed producer for an observer, the node itself otherwise."""
    target = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else node
    if target.op == "call_module" and isinstance(sim.get_submodule(target.target), QuantStub):
        return f"quantization of the float value {target.args[0].name}"
    if target.op == "call_module":
        return f"{target.target}: {type(sim.get_submodule(target.target)).__name__}"
    name = getattr(target.target, "__name__", str(target.target))
    return f"{target.name}: {name}"


class _Forced(torch.fx.Interpreter):
    """Runs the simulation; at each checkpoint compares with the lowered value and continues from it."""

    def __init__(self, sim: torch.fx.GraphModule, lowered: dict[str, Any], was_quantized: dict[str, bool],
                 mapping: dict[str, str], islands: set[str]) -> None:
        super().__init__(sim)
        self.lowered, self.was_quantized, self.mapping, self.islands = lowered, was_quantized, mapping, islands
        self.rows: list[LayerCheck] = []
        self.unmatched: list[str] = []
        self.kept_float: list[str] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        name = meta.checkpoint(n)
        if name is None:
            return out
        low = self.lowered.get(self.mapping.get(name, ""))
        if low is None:
            # no lowered node holds this value (e.g. a conv's output inside a conv+SiLU kernel): the int8 graph
            # never rounds it, so the simulation goes on from the unrounded value
            self.unmatched.append(name)
            src = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
            return self.env[src] if src is not None and src in self.env else out
        module = self.module.get_submodule(n.target)
        op = n.args[0].name if n.args and isinstance(n.args[0], torch.fx.Node) else name
        if name in self.islands or op in self.islands or not self.was_quantized.get(self.mapping[name], True):
            # the lowered graph never rounds this value: the op stays float on purpose (e.g. a cat of very
            # different ranges) or only float ops read it; nothing to compare, continue from the lowered value
            self.kept_float.append(name)
            return module(low)
        ref_leaves, low_leaves = pytree.tree_leaves(out), pytree.tree_leaves(low)
        pairs = [(r, l) for r, l in zip(ref_leaves, low_leaves)
                 if isinstance(r, torch.Tensor) and r.is_floating_point()]
        if len(ref_leaves) != len(low_leaves) or any(
                not isinstance(l, torch.Tensor) or l.shape != r.shape for r, l in pairs):
            self.rows.append(LayerCheck(name, _describe(n, self.module) + " [shape or structure differs]",
                                        module.scale, module.zero_point, math.inf, math.inf, 0))
            return out
        worst, total, count = 0.0, 0.0, 0
        for r, l in pairs:
            steps = (r.double() - l.double()).abs() / module.scale
            if steps.numel():
                worst = max(worst, float(steps.max()))
                total += float(steps.sum())
                count += steps.numel()
        self.rows.append(LayerCheck(name, _describe(n, self.module), module.scale, module.zero_point, worst,
                                    total / max(count, 1), count))
        return module(low)  # teacher forcing: the next layers start from what the int8 graph computed


def check_lowering(sim: torch.fx.GraphModule, lowered: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                   *, tolerance: float = DEFAULT_STEPS) -> LoweringCheck:
    """Compare ``lowered`` with its float simulation ``sim`` on one input (see the module docstring)."""
    kwargs = kwargs or {}
    gm = _graph_module(lowered)
    mapping = meta.lowered_from(gm)
    if not mapping:
        raise NumericsError(
            f"{type(lowered).__name__} carries no record of which prepared value each of its nodes holds, so it "
            "cannot be checked layer by layer; check=True works for fxopt's int8 lowerings (x86, qnnpack)",
            pass_name="lower")
    engine = getattr(lowered, "engine", None)
    previous = torch.backends.quantized.engine
    with torch.no_grad():
        try:
            if engine is not None:
                torch.backends.quantized.engine = engine
            recorder = _Recorder(gm, set(mapping.values()))
            _run(recorder, gm, args, kwargs)
        finally:
            torch.backends.quantized.engine = previous
        islands = {island.node for island in meta.float_islands(gm)}
        forced = _Forced(sim, recorder.values, recorder.quantized, mapping, islands)
        _run(forced, sim, args, kwargs)
    return LoweringCheck(forced.rows, forced.unmatched, float(tolerance), forced.kept_float)


def has_layer_records(lowered: torch.nn.Module) -> bool:
    """Whether ``lowered`` is a graph whose nodes say which prepared value they hold (x86, qnnpack lowerings)."""
    gm = getattr(lowered, "graph_module", lowered)
    return isinstance(gm, torch.fx.GraphModule) and bool(meta.lowered_from(gm))


def check_outputs(sim: torch.fx.GraphModule, lowered: torch.nn.Module, args: tuple, backend: str,
                  *, min_sqnr_db: float = DEFAULT_OUTPUT_SQNR_DB) -> float:
    """End-to-end check for lowerings that run in another runtime: the SQNR (dB) of the lowered module's
    outputs against the simulation's, worst tensor output; ``NumericsError`` below ``min_sqnr_db``."""
    from .compare import sqnr_db

    with torch.no_grad():
        want = [t for t in pytree.tree_leaves(sim(*args)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        got = [t for t in pytree.tree_leaves(lowered(*args)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(want) != len(got):
        raise NumericsError(f"lowering to {backend!r} returns {len(got)} tensors where the reference simulation "
                            f"returns {len(want)}", pass_name=f"lower:{backend}")
    worst = min((sqnr_db(w, g.to(w.dtype)) for w, g in zip(want, got)), default=math.inf)
    if not worst >= min_sqnr_db:
        raise NumericsError(
            f"lowering to {backend!r} gives outputs {worst:.1f} dB from the reference simulation of the same "
            f"quantization (needs >= {min_sqnr_db:g} dB). {backend!r} runs the model in its own runtime, so only the "
            "whole output can be compared: lower the same prepared module to 'x86' or 'qnnpack' with check=True to "
            "find the diverging layer, or keep suspect ops float (leaf_modules=...).", pass_name=f"lower:{backend}")
    return worst


def _run(interp: torch.fx.Interpreter, gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    """``interp.run`` with keyword inputs bound to the placeholders by name (in placeholder order)."""
    bound = list(args)
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"][len(args):]:
        if node.target not in kwargs:
            break
        bound.append(kwargs[node.target])
    return interp.run(*bound)


def raise_on_divergence(result: LoweringCheck, backend: str) -> None:
    """``NumericsError`` naming the first checkpoint beyond the tolerance (nothing when all agree)."""
    bad = result.first_failure
    if bad is None:
        return
    raise NumericsError(
        f"lowering to {backend!r} diverges from the reference simulation of the same quantization at "
        f"{bad.name} ({bad.op}; output scale={bad.scale:.4g}, zero_point={bad.zero_point}): "
        f"{bad.max_steps:.1f} quantization steps off (tolerance {result.tolerance:g}; mean "
        f"{bad.mean_steps:.2f} steps over {bad.values} values). Layers before it agree. This is a bug in the "
        f"{backend} lowering or kernel for that op: keep the op float (leaf_modules=...) and report it.",
        pass_name=f"lower:{backend}")
