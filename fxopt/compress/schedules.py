"""Pruning schedules with TF-MOT semantics (``tfmot.sparsity.keras.ConstantSparsity`` / ``PolynomialDecay``).

A schedule answers one question per training step: *should the masks be recomputed now, and to which
sparsity?* ``sparsity_at(step, final)`` returns the target sparsity, or ``None`` when the masks stay as
they are at that step. The final sparsity is the pass's ``sparsity`` (one source of truth).

- :class:`ConstantSparsity`: prune to ``final`` at ``begin_step`` and again every ``frequency`` steps
  until ``end_step`` (``-1``: no end).
- :class:`PolynomialDecay`: between ``begin_step`` and ``end_step`` the sparsity rises from
  ``initial_sparsity`` to ``final`` as ``final + (initial - final) * (1 - (step - begin) / (end - begin)) ** power``,
  updated every ``frequency`` steps and once more at ``end_step``; nothing changes outside that window.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

__all__ = ["PruningSchedule", "ConstantSparsity", "PolynomialDecay"]


@dataclass(frozen=True)
class PruningSchedule(abc.ABC):
    """Base class: ``sparsity_at(step, final) -> float | None``."""

    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100

    def __post_init__(self) -> None:
        if self.begin_step < 0:
            raise ValueError(f"begin_step must be >= 0, got {self.begin_step}")
        if self.end_step != -1 and self.end_step < self.begin_step:
            raise ValueError(f"end_step ({self.end_step}) must be >= begin_step ({self.begin_step}) or -1")
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {self.frequency}")

    def _update_step(self, step: int) -> bool:
        if step < self.begin_step or (self.end_step != -1 and step > self.end_step):
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    @abc.abstractmethod
    def sparsity_at(self, step: int, final: float) -> float | None:
        """The sparsity to prune to at ``step`` (``None``: leave the masks as they are at this step)."""


@dataclass(frozen=True)
class ConstantSparsity(PruningSchedule):
    """Prune to the final sparsity at ``begin_step``, re-pruning every ``frequency`` steps."""

    def sparsity_at(self, step: int, final: float) -> float | None:
        return final if self._update_step(step) else None


@dataclass(frozen=True)
class PolynomialDecay(PruningSchedule):
    """Gradual pruning from ``initial_sparsity`` to the final one between ``begin_step`` and ``end_step``."""

    end_step: int = 1000
    initial_sparsity: float = 0.0
    power: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.end_step == -1:
            raise ValueError("PolynomialDecay needs an end_step (the step where the final sparsity is reached)")
        if not 0.0 <= self.initial_sparsity < 1.0:
            raise ValueError(f"initial_sparsity must be in [0, 1), got {self.initial_sparsity}")

    def sparsity_at(self, step: int, final: float) -> float | None:
        if not self._update_step(step):
            return None
        span = max(self.end_step - self.begin_step, 1)
        progress = min(max((step - self.begin_step) / span, 0.0), 1.0)
        return final + (self.initial_sparsity - final) * (1.0 - progress) ** self.power
