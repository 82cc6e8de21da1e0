"""Unstructured magnitude masks kept as parametrizations (``torch.nn.utils.parametrize``).

``layer.weight`` becomes ``original * mask``: the gradient of a masked weight is zero, so fine-tuning
cannot revive it, and when a schedule recomputes the masks the pruned originals are zeroed first (TF-MOT
semantics), so a mask only ever grows. ``fp.ApplyMasks()`` bakes the product into a plain weight.

The step hook: ``pruning_step(model)`` advances every mask's step counter by one and recomputes the masks
its schedule asks for; ``pruning_hook(model)`` returns the same as an optimizer step post-hook:
``optimizer.register_step_post_hook(pruning_hook(model))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .schedules import PruningSchedule

__all__ = ["MagnitudeMask", "MaskedWeight", "magnitude_masks", "masked_weights", "pruning_step", "pruning_hook",
           "update_masks"]


class MagnitudeMask(nn.Module):
    """Parametrization ``w -> w * mask``. ``group`` names the masks pruned together (``"global"`` or a layer)."""

    def __init__(self, mask: torch.Tensor, *, sparsity: float, group: str,
                 schedule: PruningSchedule | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.sparsity = float(sparsity)  # the final sparsity
        self.group = group
        self.schedule = schedule

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"sparsity={1 - kept / max(self.mask.numel(), 1):.3f}, group={self.group!r}"


@dataclass
class MaskedWeight:
    """One masked tensor found in a model."""

    qualname: str  # the module's qualified name
    module: nn.Module
    tensor_name: str  # "weight"
    index: int  # position of the mask in the parametrization list
    mask: MagnitudeMask

    def value_before_mask(self) -> torch.Tensor:
        plist = self.module.parametrizations[self.tensor_name]
        value = plist.original
        for p in list(plist)[: self.index]:
            value = p(value)
        return value


def masked_weights(model: nn.Module) -> Iterator[MaskedWeight]:
    """Every :class:`MagnitudeMask` in ``model``, in module order."""
    for qualname, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            for index, p in enumerate(plist):
                if isinstance(p, MagnitudeMask):
                    yield MaskedWeight(qualname, module, tensor_name, index, p)


def magnitude_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Boolean keep-masks pruning exactly ``round(sparsity * total)`` of the smallest ``|w|`` jointly over ``weights``."""
    flat = torch.cat([w.detach().abs().float().reshape(-1) for w in weights]) if weights else torch.zeros(0)
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k > 0:
        threshold = flat.kthvalue(k).values
        below = flat < threshold
        ties = flat == threshold
        extra = k - int(below.sum())
        ties_taken = ties & (torch.cumsum(ties.to(torch.long), 0) <= extra)
        keep = ~(below | ties_taken)
    return list(keep.split([w.numel() for w in weights]))


def update_masks(entries: list[MaskedWeight], sparsity: float) -> None:
    """Recompute the masks of ``entries`` jointly at ``sparsity``; pruned originals are zeroed first."""
    with torch.no_grad():
        values = []
        for e in entries:
            if e.index == 0:  # zero the pruned originals so that they never come back
                original = e.module.parametrizations[e.tensor_name].original
                original.mul_(e.mask.mask.to(original.dtype))
            value = e.value_before_mask()
            values.append(value * e.mask.mask.to(value.dtype))
        for e, keep in zip(entries, magnitude_masks(values, sparsity)):
            e.mask.mask.copy_(keep.view_as(e.mask.mask))


def pruning_step(model: nn.Module) -> dict[str, float]:
    """Advance every mask of ``model`` by one step; recompute those whose schedule says so.

    Returns ``{group: sparsity}`` for the groups updated at this step.
    """
    groups: dict[str, list[MaskedWeight]] = {}
    for entry in masked_weights(model):
        entry.mask.step += 1
        groups.setdefault(entry.mask.group, []).append(entry)
    updated: dict[str, float] = {}
    for group, entries in groups.items():
        first = entries[0].mask
        if first.schedule is None:
            continue
        target = first.schedule.sparsity_at(int(first.step), first.sparsity)
        if target is not None:
            update_masks(entries, target)
            updated[group] = target
    return updated


def pruning_hook(model: nn.Module) -> Callable[..., None]:
    """An optimizer step post-hook that calls :func:`pruning_step` on ``model`` after every step."""

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        pruning_step(model)

    return hook
