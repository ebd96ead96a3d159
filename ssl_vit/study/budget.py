"""One budget shared by every run of a study, turned into each objective's number of steps.

``steps`` is the same for all; ``images`` (images seen) and ``epochs`` divide by the objective's
batch (and the training split's size); ``flops`` divides by the FLOPs of the objective's own step,
counted once per objective (``ssl_vit.train.flops``), so an MAE run gets more steps than a
supervised one, and a DINO run fewer, for the same compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..train.flops import step_flops
from .spec import Study


@dataclass(frozen=True)
class Allotment:
    """What one objective's runs get: steps, and what those steps amount to."""

    steps: int
    batch_size: int
    flops_per_step: float

    @property
    def images(self) -> int:
        return self.steps * self.batch_size

    @property
    def flops(self) -> float:
        return self.steps * self.flops_per_step


def steps_for(kind: str, budget: float, batch_size: int, flops_per_step: float, train_size: int) -> int:
    """The steps ``budget`` of ``kind`` buys (rounded down: no run spends more than the budget)."""
    per_step = {"steps": 1.0, "images": batch_size, "epochs": batch_size / train_size,
                "flops": flops_per_step}[kind]
    return math.floor(budget / per_step + 1e-9)


def allot(study: Study, train_size: int, num_classes: int) -> dict[str, Allotment]:
    """Each objective's ``Allotment``; a budget too small for one step of some objective is refused,
    naming the objective and what one step costs."""
    out = {}
    for objective in study.objectives:
        run = study.run_config(objective, study.seeds[0], 1, "unused")
        flops = step_flops(run, num_classes or 10)
        steps = steps_for(study.budget_kind, study.budget, run.train.batch_size, flops, train_size)
        if steps < 1:
            one = {"steps": "1", "images": str(run.train.batch_size), "flops": f"{flops:.3g}",
                   "epochs": f"{run.train.batch_size / train_size:.3g}"}[study.budget_kind]
            raise ConfigError(f"{study.source} budget: {study.budget_kind} = {study.budget:g} buys no step of "
                              f"{objective} (one step costs {one}); raise the budget or lower batch_size")
        out[objective] = Allotment(steps, run.train.batch_size, flops)
    return out
