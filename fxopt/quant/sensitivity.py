"""Sensitivity search: which modules to keep float so that a quantized model stays within a cosine target.

Used by ``quantize-dynamic``'s ``min_cosine`` and reusable by any pass that swaps float modules for quantized
ones (e.g. a static int8 fallback): describe each swappable module as a :class:`SwapUnit`, then
:func:`keep_float_for_cosine` measures each unit's damage quantized *alone* (every other unit float: free
of the others' error) and keeps float the most damaging ones, fewest first, until the target holds or
``max_float_fraction`` of the units is float.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import CalibrationError
from ..graph_utils import set_attr_path

__all__ = ["SwapUnit", "keep_float_for_cosine", "mean_cosine", "run_batches"]

logger = logging.getLogger(__name__)


@dataclass
class SwapUnit:
    """One module the search may keep float, under all its names: its float and its quantized form."""

    name: str
    paths: list[str]
    float_module: nn.Module
    quantized_module: nn.Module
    quantized: bool = True

    def install(self, root: nn.Module, quantized: bool) -> None:
        """Put the quantized (or the float) module at every path of ``root``."""
        for path in self.paths:
            set_attr_path(root, path, self.quantized_module if quantized else self.float_module)
        self.quantized = quantized


def keep_float_for_cosine(root: nn.Module, units: list[SwapUnit], batches: list[tuple[tuple, dict]],
                          reference: list[Any], *, min_cosine: float, max_float_fraction: float,
                          before: float) -> tuple[list[str], float]:
    """Keep float the units that hurt most alone until ``min_cosine`` holds or the cap is reached.

    ``reference`` holds the float outputs on ``batches`` and ``before`` the cosine with every unit quantized.
    Returns the names of the units left float and the cosine reached; ``root`` is left in that state.
    """
    cap = int(max_float_fraction * len(units))
    if cap == 0:
        return [], before
    for unit in units:
        unit.install(root, quantized=False)
    damage = {}
    for unit in units:  # each module quantized alone: its own damage, free of the others' noise
        unit.install(root, quantized=True)
        damage[unit.name] = 1.0 - mean_cosine(run_batches(root, batches), reference)
        unit.install(root, quantized=False)
    order = sorted(units, key=lambda u: -damage[u.name])
    logger.debug("sensitivity (1 - cosine, alone): %s", {u.name: round(damage[u.name], 5) for u in order})
    for unit in order[cap:]:
        unit.install(root, quantized=True)
    for unit in reversed(order[:cap]):  # least sensitive first: stop as soon as the target holds
        unit.install(root, quantized=True)
        if mean_cosine(run_batches(root, batches), reference) < min_cosine:
            unit.install(root, quantized=False)
            break
    kept = [u.name for u in order[:cap] if not u.quantized]
    return kept, mean_cosine(run_batches(root, batches), reference)


def run_batches(module: nn.Module, batches: list[tuple[tuple, dict]]) -> list[Any]:
    """``module``'s outputs on ``(args, kwargs)`` batches, in eval mode and inference mode."""
    was_training = module.training
    module.eval()
    outputs = []
    try:
        with torch.inference_mode():
            for index, (args, kwargs) in enumerate(batches):
                try:
                    outputs.append(module(*args, **kwargs))
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                    raise CalibrationError(
                        f"calibration batch {index} (input shapes {shapes}) does not fit the model: "
                        f"{type(exc).__name__}: {exc}. Give batches shaped like the model's inputs.") from exc
    finally:
        module.train(was_training)
    return outputs


def mean_cosine(outputs: list[Any], reference: list[Any]) -> float:
    """Mean cosine over samples (each floating output flattened per sample), all batches together."""
    cosines = []
    for out, ref in zip(outputs, reference):
        for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
            if not (isinstance(b, torch.Tensor) and b.is_floating_point()):
                continue
            if not torch.isfinite(b).all():
                raise CalibrationError("the float model gives NaN or inf on the calibration data; clean the data")
            rows = b.shape[0] if b.dim() > 1 else 1
            a, b = a.float().reshape(rows, -1), b.float().reshape(rows, -1)
            cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
            both_zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
            cosines.append(torch.where(both_zero, torch.ones_like(cos), cos))
    if not cosines:
        raise CalibrationError("a cosine target needs floating-point model outputs to compare")
    return torch.cat(cosines).mean().item()
