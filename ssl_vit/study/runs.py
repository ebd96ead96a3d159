"""The pretraining runs of a study, one folder each under ``DIR/runs/``, through the one training loop.

A finished run (its ``ckpt.pt`` at its step count) is skipped; a killed one resumes from its saved
state, as any run folder does. The baseline of each seed is the first objective's ``--steps 0``
checkpoint (the backbone as that objective initialises it, with the study's flags).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

from ..checkpoint import atomic_write_text, load_checkpoint
from ..train import train
from .budget import Allotment
from .spec import Study

BASELINE = "baseline"


@dataclass(frozen=True)
class PlannedRun:
    """One pretraining run of the grid: what it trains, and the budget it uses."""

    name: str  # its folder under DIR/runs
    objective: str  # a registered objective, or BASELINE
    seed: int
    steps: int
    images: int
    flops: float
    flops_per_step: float


def plan(study: Study, allotments: dict[str, Allotment]) -> list[PlannedRun]:
    """Baseline, then each objective, for every seed."""
    runs = []
    for seed in study.seeds:
        runs.append(PlannedRun(f"{BASELINE}-seed{seed}", BASELINE, seed, 0, 0, 0.0, 0.0))
        for objective in study.objectives:
            a = allotments[objective]
            runs.append(PlannedRun(f"{objective}-seed{seed}", objective, seed, a.steps, a.images, a.flops,
                                   a.flops_per_step))
    return runs


def checkpoint_path(out: str, run: PlannedRun) -> str:
    return os.path.join(out, "runs", run.name, "ckpt.pt")


def finished(out: str, run: PlannedRun) -> bool:
    """Its ckpt.pt exists at its step count (read from the file's metadata: the weights are mapped, not read)."""
    path = checkpoint_path(out, run)
    return os.path.exists(path) and load_checkpoint(path, mmap=True)["step"] == run.steps


def pretrain(study: Study, out: str, run: PlannedRun) -> None:
    """Train one run (or resume it), adding its wall time to ``DIR/times.json``."""
    recipe = study.objectives[0] if run.objective == BASELINE else run.objective
    config = study.run_config(recipe, run.seed, run.steps, os.path.join(out, "runs", run.name))
    started = time.perf_counter()
    train(config)
    add_seconds(out, run.name, time.perf_counter() - started)


def add_seconds(out: str, name: str, seconds: float) -> None:
    """Wall time accumulates over the sessions a run took (a killed session's part is not counted)."""
    times = read_times(out)
    times[name] = times.get(name, 0.0) + seconds
    atomic_write_text(os.path.join(out, "times.json"), json.dumps(times, indent=1))


def read_times(out: str) -> dict[str, float]:
    path = os.path.join(out, "times.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def describe(run: PlannedRun, seconds: Optional[float]) -> dict:
    """The budget fields every result record carries."""
    return {**{k: v for k, v in asdict(run).items() if k in ("objective", "seed", "steps", "images", "flops")},
            "wall_s": None if seconds is None else round(seconds, 1)}
