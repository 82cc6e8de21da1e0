"""Running passes: verification between passes, instruments, and the per-pass record.

``PassManager`` is the engine behind :func:`fxopt.compile`; it is public for users who drive passes
on a ``GraphModule`` themselves.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import torch
import torch.fx

from .errors import NumericsError, PassError, in_pass
from .pass_base import Pass, PassContext, PassResult, check_result, pass_label
from .verify import verify

__all__ = [
    "PassLike",
    "PassRecord",
    "Instrument",
    "TimingInstrument",
    "DumpGraphs",
    "NumericsCheck",
    "PassManager",
]

logger = logging.getLogger(__name__)

PassLike = Union[Pass, Callable[[torch.fx.GraphModule], PassResult]]


@dataclass
class PassRecord:
    """What one pass did inside a pipeline."""

    name: str
    modified: bool
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0


class Instrument:
    """Hooks run around every pass (TVM-style). Override what you need."""

    def before_pass(self, label: str, gm: torch.fx.GraphModule) -> None:
        pass

    def after_pass(self, label: str, gm: torch.fx.GraphModule, result: PassResult, seconds: float) -> None:
        pass


class TimingInstrument(Instrument):
    """Collects ``(pass label, seconds)`` for every pass."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    def after_pass(self, label, gm, result, seconds):
        self.timings.append((label, seconds))


class DumpGraphs(Instrument):
    """Writes the graph before the first pass and after every modifying pass to ``folder``.

    Files are ``000-input.txt``, ``001-<pass>.txt``…: the tabular graph followed by the generated code.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._count = 0

    def _write(self, tag: str, gm: torch.fx.GraphModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)[:80]
        path = self.folder / f"{self._count:03d}-{safe}.txt"
        path.write_text(_graph_text(gm))
        self._count += 1

    def before_pass(self, label, gm):
        if self._count == 0:
            self._write("input", gm)

    def after_pass(self, label, gm, result, seconds):
        if result.modified:
            self._write(label, gm)


def _graph_text(gm: torch.fx.GraphModule) -> str:
    lines = [f"{n.op:14s} {n.name:30s} {n.target!s:40s} args={n.args} kwargs={n.kwargs}" for n in gm.graph.nodes]
    return "\n".join(lines) + "\n\n# generated code\n" + gm.code


class NumericsCheck(Instrument):
    """After each modifying pass, run the graph and compare with reference outputs.

    Raises :class:`NumericsError` naming the first pass whose outputs leave the tolerance
    (``|a - b| <= tol * (1 + |ref|)`` elementwise). A pass whose result says ``intended_change`` (it quantized
    on purpose) becomes the new reference for the passes after it; ``rebased`` lists such passes.
    """

    def __init__(self, reference_outputs: Any, example_inputs: tuple, tolerance: float = 1e-4) -> None:
        self.reference = reference_outputs
        self.inputs = example_inputs
        self.tolerance = float(tolerance)
        self.history: list[str] = []
        self.rebased: list[str] = []

    def after_pass(self, label, gm, result, seconds):
        self.history.append(label)
        if not result.modified:
            return
        # on a copy: a calibrated graph's observers would otherwise record the check's own run (the example
        # input counted once more in every histogram), and the lowered model's scales would depend on check=
        with torch.no_grad():
            out = copy.deepcopy(gm)(*self.inputs)
        if result.intended_change:
            self.reference = out
            self.rebased.append(label)
            return
        worst = max_error(self.reference, out)
        if worst is None:
            raise NumericsError(
                f"pass {label!r} changed the structure of the model's outputs", pass_name=label,
                previous=tuple(self.history[:-1]),
            )
        if worst > self.tolerance:
            raise NumericsError(
                f"pass {label!r} breaks numerics: outputs differ from the original model by "
                f"{worst:.3g} (relative), above the tolerance {self.tolerance:g}. Passes before it: "
                f"{self.history[:-1] or 'none'}. Loosen it with compile(check=<tolerance>) if this is expected "
                "(e.g. quantization).",
                pass_name=label,
                previous=tuple(self.history[:-1]),
            )


def max_error(reference: Any, candidate: Any) -> float | None:
    """Largest ``|a-b| / (1+|a|)`` over matching tensors of two output structures; None if they differ."""
    ref_leaves, ref_spec = torch.utils._pytree.tree_flatten(reference)
    cand_leaves, cand_spec = torch.utils._pytree.tree_flatten(candidate)
    if len(ref_leaves) != len(cand_leaves):
        return None
    worst = 0.0
    for a, b in zip(ref_leaves, cand_leaves):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return None
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape:
                return None
            if a.numel() == 0:
                continue
            a_f, b_f = a.detach().float(), b.detach().float()
            err = ((a_f - b_f).abs() / (1 + a_f.abs())).max().item()
            if err != err:  # NaN
                return float("inf")
            worst = max(worst, err)
        elif a != b:
            return float("inf")
    return worst


class PassManager:
    """Runs passes in order on a GraphModule, in place.

    Each pass gets the pipeline's :class:`fxopt.pass_base.PassContext` (the target backend). After each
    pass that reports ``modified=True`` the graph is linted, recompiled and checked by
    :func:`fxopt.verify.verify` (``verify=False`` turns that off; with ``Pass.debug_verify``, which the test
    suite turns on, after every pass, modified or not). Instruments see every pass. Any error
    raised inside a pass comes out as a :class:`fxopt.PassError` naming the pass and the passes before it
    (an fxopt error keeps its own class too, e.g. still a ``CalibrationError``), the cause chained.
    """

    def __init__(self, passes: Sequence[PassLike], *, instruments: Iterable[Instrument] = (), verify: bool = True,
                 context: PassContext | None = None):
        self.passes = list(passes)
        for p in self.passes:
            if not callable(p):
                raise TypeError(
                    f"{p!r} is not a pass: give fxopt.Pass objects or callables GraphModule -> fxopt.PassResult"
                )
        self.instruments = list(instruments)
        self.verify = verify
        self.context = context if context is not None else PassContext()

    def __call__(self, gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[PassRecord]]:
        records: list[PassRecord] = []
        done: list[str] = []
        for p in self.passes:
            label = pass_label(p)
            for ins in self.instruments:
                ins.before_pass(label, gm)
            n_before = len(gm.graph.nodes)
            start = time.perf_counter()
            try:
                result = p(gm, self.context) if isinstance(p, Pass) else p(gm)
                result = check_result(label, result, gm)
            except Exception as exc:
                raise _in_pass(exc, label, done) from exc
            seconds = time.perf_counter() - start
            gm = result.graph_module
            checked = Pass.debug_verify and isinstance(p, Pass)  # Pass.__call__ verified it already
            if self.verify and not checked and (result.modified or Pass.debug_verify):
                verify(gm, pass_name=label)
            for ins in self.instruments:
                ins.after_pass(label, gm, result, seconds)
            records.append(
                PassRecord(label, result.modified, seconds, dict(result.stats), list(result.notes),
                           n_before, len(gm.graph.nodes))
            )
            logger.debug("pass %s: modified=%s in %.3fs %s", label, result.modified, seconds, result.stats)
            done.append(label)
        return gm, records

    def bind(self) -> list[PassLike]:
        """The passes with the context filled in (raises ``ValueError`` where a pass contradicts it)."""
        return [p.with_context(self.context) if isinstance(p, Pass) else p for p in self.passes]


def _in_pass(exc: BaseException, label: str, done: list[str]) -> PassError:
    before = ", ".join(done) if done else "none"
    if isinstance(exc, PassError) and exc.pass_name == label:  # already names the pass: add the history
        message = f"{exc.args[0] if exc.args else exc} (passes run before it: {before})"
        return in_pass(exc, message, pass_name=label, previous=tuple(done), kind=type(exc))
    return in_pass(exc, f"pass {label!r} failed: {type(exc).__name__}: {exc} (passes run before it: {before})",
                   pass_name=label, previous=tuple(done))
