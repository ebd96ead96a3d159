"""The collapse watch of the objectives that match prototype assignments (DINO, MSN).

Such an objective collapses in one of two ways: every image on the same prototype (the entropy of
the batch-mean assignment goes to 0) or a uniform assignment for every image (the per-image
entropy goes to ln K). Each step the objective adds its watched values per micro-batch; once per
optimizer step the watch averages them and extends, for each collapse sign, the run of steps in a
row it held. ``summary()`` then warns about a sign that held for a sustained stretch. All on the
device: no host sync per step.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .teacher import StepMean

COLLAPSE_MARGIN = 0.02  # an entropy within 2% of ln K from 0 or from ln K counts as collapsed
COLLAPSE_MIN_STEPS = 5  # a sustained stretch: at least this many steps in a row...
COLLAPSE_FRACTION = 0.1  # ...and at least this fraction of the steps run


def near_zero(entropy: torch.Tensor, ln_k: float) -> torch.Tensor:
    return entropy < COLLAPSE_MARGIN * ln_k


def near_ln_k(entropy: torch.Tensor, ln_k: float) -> torch.Tensor:
    return entropy > (1 - COLLAPSE_MARGIN) * ln_k


class CollapseWatch:
    """``signs``: a step's mean values [V] -> [S] bool, the collapse signs that hold."""

    def __init__(self, signs: Callable[[torch.Tensor], torch.Tensor]):
        self.signs = signs
        self._step = StepMean()
        self.last: Optional[torch.Tensor] = None  # [V]: the last step's values
        self._streak = self._longest = None  # [S]: steps in a row each sign held, and the longest such run
        self.steps = 0

    def start_step(self) -> None:
        """Drop the values of a step the loop skipped (non-finite loss)."""
        self._step.reset()

    def add(self, values: torch.Tensor) -> None:
        """values [V] of one micro-batch (each micro-batch weighs the same)."""
        self._step.add(values.detach(), torch.ones_like(values[:1]))

    def end_step(self) -> None:
        """Once per optimizer step: the step's mean values, and the runs of the signs."""
        if self._step.empty:
            return
        self.last = self._step.pop()
        held = self.signs(self.last)
        self._streak = held.float() if self._streak is None else (self._streak + 1) * held
        self._longest = self._streak.clone() if self._longest is None else torch.maximum(self._longest, self._streak)
        self.steps += 1

    def sustained(self) -> list[Optional[int]]:
        """Per sign: its longest run when that was sustained, else None."""
        if self._longest is None:
            return []
        enough = max(COLLAPSE_MIN_STEPS, math.ceil(COLLAPSE_FRACTION * self.steps))
        return [int(run) if run >= enough else None for run in self._longest.tolist()]
