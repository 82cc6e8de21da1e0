"""``tune-headroom``: pick how far the histogram observers widen their chosen ranges, by cross-validation.

A range fitted on a few calibration batches clips the tails of unseen inputs, which reach further than
the calibration data did (measured on the 224-px natural-image bench: squeezenet1_1 gains 3 dB on held-out
images when every range is widened 1.25x, while resnet18 and densenet121 lose 1 dB, see README "Measured
here"). Which way a model goes is not visible on the calibration data itself, so this pass asks it the
same question on a split: on a copy of the observed graph it calibrates on half the batches, measures
the output SQNR (float simulation, :mod:`fxopt.quant.simulation`) of each candidate ``headroom`` on the
other half, then swaps the halves; the candidate with the best total SQNR (the smallest on a tie) is set
on every :class:`~fxopt.quant.observers.HistogramObserver` of the graph. Run it after ``PlaceObservers``
and before ``Calibrate`` (``fxopt.recipes.static_int8(data, headroom="auto")`` does).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx

from fxopt import meta
from fxopt.errors import CalibrationError, UnsupportedError
from fxopt.pass_base import Pass, PassResult
from fxopt.quant.observers import HistogramObserver
from fxopt.quant.simulation import noise_and_signal

from .calibrate import Calibrate, as_call
from .float_fallback import simulation_of

__all__ = ["TuneHeadroom"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneHeadroom(Pass):
    name: ClassVar[str] = "tune-headroom"

    data: Any = field(default=None, compare=False, repr=False)
    candidates: tuple[float, ...] = (1.0, 1.1, 1.25)
    num_batches: int | None = None

    def __post_init__(self) -> None:
        if not self.candidates or any(c < 1 for c in self.candidates):
            raise ValueError(f"TuneHeadroom candidates must be >= 1 (they widen ranges), got {self.candidates}")
        if self.data is None:
            raise CalibrationError("TuneHeadroom needs data= (the calibration batches) to cross-validate on")

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if meta.quant_config(gm) is None:
            raise UnsupportedError("TuneHeadroom runs on an observed static-int8 graph: run InsertQuantStubs and "
                                   "PlaceObservers first (fxopt.recipes.static_int8(data, headroom='auto') does)")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        observers = [m for m in gm.modules() if isinstance(m, HistogramObserver)]
        if not observers:
            return PassResult(gm, False, {"headroom": None}, ["no histogram observers: nothing to tune"])
        if any(m.calibrated for m in observers):
            raise UnsupportedError("TuneHeadroom runs before Calibrate (on observers that saw no data yet)")
        items = list(self.data)[: self.num_batches] if self.num_batches is not None else list(self.data)
        if len(items) < 2:
            return PassResult(gm, False, {"headroom": None},
                              ["fewer than 2 calibration batches: no split to cross-validate on, headroom unchanged"])
        halves = (items[0::2], items[1::2])
        totals = {h: [0.0, 0.0] for h in self.candidates}  # headroom -> [noise, signal] over both folds
        for fit, held_out in (halves, halves[::-1]):
            trial = copy.deepcopy(gm)
            Calibrate(fit)(trial)
            batches = [as_call(item, i) for i, item in enumerate(held_out)]
            sim = simulation_of(trial)
            sim.configure([])
            reference = sim.run(batches)
            sim.configure(sim.units)
            observer_of = {n.name: trial.get_submodule(n.target) for n in trial.graph.nodes if n.name in sim.sims}
            for headroom in self.candidates:
                for name, act in sim.sims.items():  # the same simulation, each rounding at this headroom's qparams
                    observer = observer_of[name]
                    if isinstance(observer, HistogramObserver):
                        observer.headroom = headroom
                        act.scale, act.zero_point = observer.calculate_qparams()
                noise, signal = noise_and_signal(sim.run(batches), reference)
                totals[headroom][0] += noise
                totals[headroom][1] += signal
        scores = {h: 10 * math.log10(s / n) if n > 0 else math.inf for h, (n, s) in totals.items()}
        best = max(self.candidates, key=lambda h: (round(scores[h], 6), -h))
        changed = any(m.headroom != best for m in observers)
        for m in observers:
            m.headroom = best
        table = ", ".join(f"{h:g}: {scores[h]:.2f} dB" for h in self.candidates)
        note = f"headroom {best:g} (held-out SQNR by headroom, 2-fold over {len(items)} batches: {table})"
        logger.info("tune-headroom: %s", note)
        return PassResult(gm, changed, {"headroom": best, "sqnr_db": {h: round(v, 3) for h, v in scores.items()}},
                          [note])
