"""Calibrate: run representative data through an observed graph so observers learn activation ranges."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx

from fxopt import meta
from fxopt.backends.lowering import int8_spec
from fxopt.errors import CalibrationError
from fxopt.pass_base import Pass, PassResult
from fxopt.progress import bar

from .place_observers import tie_cat_observers

__all__ = ["Calibrate", "as_call"]

logger = logging.getLogger(__name__)


def as_call(item: Any, index: int) -> tuple[tuple, dict]:
    """A calibration item as ``(args, kwargs)``: a Tensor, a tuple/list of inputs, or a dict of keywords."""
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise CalibrationError(
        f"calibration item {index} is a {type(item).__name__}; give a Tensor, a tuple of positional inputs "
        "or a dict of keyword inputs"
    )


def _check_finite(args: tuple, kwargs: dict, index: int) -> None:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
            raise CalibrationError(
                f"calibration batch {index} contains NaN or inf values; clean the calibration data "
                "(observers would learn a meaningless range)"
            )


@dataclass(frozen=True)
class Calibrate(Pass):
    """Run ``data`` (an iterable of batches) through the graph in eval mode, without gradients.

    Items are a ``Tensor``, a tuple of positional inputs or a dict of keyword inputs. ``num_batches``
    caps how many items are used.
    """

    name: ClassVar[str] = "calibrate"

    data: Any = field(default=None, compare=False, repr=False)
    num_batches: int | None = None

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from fxopt.quant.observers import Observer  # noqa: PLC0415

        observers = {name: m for name, m in gm.named_modules() if isinstance(m, Observer)}
        if not observers:
            raise CalibrationError(
                "the graph has no observers to calibrate: run fxopt.passes.InsertQuantStubs and "
                "fxopt.passes.PlaceObservers first (or use fxopt.recipes.static_int8)"
            )
        if self.data is None:
            raise CalibrationError("Calibrate got no data: pass an iterable of input batches, e.g. Calibrate(loader)")
        if self.num_batches is not None and self.num_batches < 1:
            raise CalibrationError(f"num_batches must be >= 1, got {self.num_batches}")
        total = self.num_batches
        if total is None and hasattr(self.data, "__len__"):
            total = len(self.data)

        was_training = gm.training
        gm.eval()
        seen = 0
        try:
            with torch.no_grad():
                for index, item in enumerate(bar(self.data, "fxopt calibrate", total=total, unit="batch")):
                    if self.num_batches is not None and seen >= self.num_batches:
                        break
                    args, kwargs = as_call(item, index)
                    _check_finite(args, kwargs, index)
                    try:
                        gm(*args, **kwargs)
                    except CalibrationError:
                        raise
                    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                        raise CalibrationError(
                            f"calibration batch {index} (input shapes {shapes}) does not fit the model: "
                            f"{type(exc).__name__}: {exc}. Give batches shaped like the model's inputs."
                        ) from exc
                    seen += 1
        finally:
            gm.train(was_training)
        if seen == 0:
            raise CalibrationError("the calibration data is empty: give at least one batch (32 or more is typical)")
        blind = [name for name, obs in observers.items() if not obs.calibrated]
        notes = [f"{name} saw no data (branch not reached by the calibration data)" for name in blind]
        stats = {"batches": seen, "observers": len(observers), "unreached": len(blind)}
        config = meta.quant_config(gm)
        if getattr(config, "share_cat", False):
            stats["cats_sharing_qparams"], tie_notes = tie_cat_observers(gm, int8_spec(config.backend).max_range_ratio)
            notes += tie_notes
        logger.info("calibrated %d observers on %d batches", len(observers), seen)
        return PassResult(gm, True, stats, notes)
