"""What every experiment reads: the dataset, the step budget, the seeds."""

from __future__ import annotations

from dataclasses import dataclass

from .data import Dataset

__all__ = ["StudyContext", "PUBLISHED_STEPS"]

#: The published MNIST-1D recipe trains for 6000 steps.
PUBLISHED_STEPS = 6000


@dataclass
class StudyContext:
    """Settings shared by the experiments of one study run.

    Attributes:
        data: the dataset.
        quick: use the quick step budgets and fewer seeds.
        seed: the base seed; replicate ``i`` of a run uses ``seed + i``.
        steps_override: when set, the baselines train for this many steps and every other
            budget scales with it (``full * steps_override / 6000``), for smoke runs.
    """

    data: Dataset
    quick: bool = False
    seed: int = 0
    steps_override: int | None = None

    def steps(self, full: int, quick: int) -> int:
        """The number of steps for a run whose full budget is ``full`` and quick budget ``quick``."""
        if self.steps_override is not None:
            return max(1, round(full * self.steps_override / PUBLISHED_STEPS))
        return quick if self.quick else full

    def seeds(self, full: int, quick: int) -> list[int]:
        """The seeds of a run replicated ``full`` (or, quick, ``quick``) times."""
        n = quick if (self.quick or self.steps_override is not None) else full
        return [self.seed + i for i in range(n)]

    @property
    def reduced(self) -> bool:
        """Whether runs use fewer steps than the published recipe."""
        return self.quick or (self.steps_override is not None and self.steps_override < PUBLISHED_STEPS)

    def published(self, key: str) -> float | None:
        return self.data.published.get(key)
