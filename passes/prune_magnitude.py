"""``prune-magnitude``: unstructured magnitude pruning kept as masks (parametrizations).

Each selected layer's ``weight`` becomes ``original * mask`` (``fxopt.compress.MagnitudeMask``), so its
gradient is zero where the mask is and fine-tuning cannot revive a pruned weight. ``scope="global"``
ranks all selected weights together (exactly ``round(sparsity * total)`` are pruned); ``"layer"`` prunes
each layer to ``sparsity``. With a ``schedule`` (``fxopt.compress.ConstantSparsity`` /
``PolynomialDecay``, TF-MOT semantics) the masks start at the schedule's step-0 sparsity and
``fxopt.compress.pruning_step(model)`` (or ``optimizer.register_step_post_hook(pruning_hook(model))``)
advances them during fine-tuning. ``fp.ApplyMasks()`` bakes the masks into plain weights.

Module-level pass: it walks the module tree, so it reaches layers inside untraced leaves too.
Layers: Conv1d/2d/3d and Linear by default, plus any module named (or typed) in ``include``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn.utils import parametrize

from fxopt import Pass, PassResult
from fxopt.compress import MagnitudeMask, PruningSchedule, magnitude_masks

from ._compress import check_fraction, describe_selection, freeze_selection, own_copy, parametrizations_of, \
    select_layers

__all__ = ["PruneMagnitude", "SCOPES"]

logger = logging.getLogger(__name__)

SCOPES = ("global", "layer")


@dataclass(frozen=True)
class PruneMagnitude(Pass):
    """Zero the smallest-magnitude weights (masks kept as parametrizations)."""

    name = "prune-magnitude"
    swaps_modules: ClassVar[bool] = True  # only replaces layers: compile may return the eager model (fxopt.compress.eager)
    module_level: ClassVar[bool] = True  # works on the module tree, also when the root cannot be traced

    sparsity: float = 0.5
    scope: str = "global"
    schedule: PruningSchedule | None = None
    include: tuple = ()
    exclude: tuple = ()

    def __post_init__(self) -> None:
        check_fraction(self.sparsity, "sparsity", "the fraction of weights set to zero")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.schedule is not None and not isinstance(self.schedule, PruningSchedule):
            raise TypeError("schedule must be None or a fxopt.compress schedule (ConstantSparsity, PolynomialDecay), "
                            f"got {type(self.schedule).__name__}")
        freeze_selection(self)

    def call(self, gm: torch.nn.Module) -> PassResult:
        return PassResult(gm, *self.apply(gm))

    def apply(self, root: torch.nn.Module) -> tuple[bool, dict, list[str]]:
        """Prune ``root`` in place (any ``nn.Module``): ``(modified, stats, notes)``."""
        layers, notes = select_layers(root, self.include, self.exclude)
        todo = []
        for name, module in layers:
            if any(isinstance(p, MagnitudeMask) for p in parametrizations_of(module)):
                notes.append(f"{name}: skipped, already masked (run fp.ApplyMasks() first to prune it again)")
            else:
                todo.append((name, module))
        if not todo:
            notes.append(f"nothing to prune: {describe_selection(self.include)}" if not layers else
                         "nothing to prune: every selected layer is already masked")
            return False, {"layers": 0}, notes
        target = self.sparsity if self.schedule is None else (self.schedule.sparsity_at(0, self.sparsity) or 0.0)
        if target == 0.0 and self.schedule is None:
            notes.append("sparsity=0: nothing pruned")
            return False, {"layers": 0}, notes
        weights = [module.weight.detach() for _, module in todo]
        if self.scope == "global":
            keeps = magnitude_masks(weights, target)
        else:
            keeps = [magnitude_masks([w], target)[0] for w in weights]
        pruned = total = 0
        for (name, module), weight, keep in zip(todo, weights, keeps):
            module = own_copy(root, module)
            group = "global" if self.scope == "global" else f"layer:{name}"
            mask = MagnitudeMask(keep.view_as(weight).to(weight.device), sparsity=self.sparsity, group=group,
                                 schedule=self.schedule)
            mask.train(module.training)
            parametrize.register_parametrization(module, "weight", mask)
            pruned += int(weight.numel() - keep.sum())
            total += weight.numel()
        stats = {"layers": len(todo), "pruned": pruned, "sparsity": round(pruned / total, 6) if total else 0.0}
        logger.debug("prune-magnitude: %s", stats)
        return True, stats, notes
