"""Training metrics: summed on the device between records, one record every --log-every steps to
``metrics.jsonl`` and the trackers (``--report-to``). ``record`` runs on every process (it averages
across them); only the main process writes."""

from __future__ import annotations

import json
import os
import time

import torch
from accelerate import Accelerator

from ..checkpoint import atomic_write_text
from .run_folder import METRICS_FILE
from .step import StepResult


def _step_of(line: str):
    """The step of a record line, or None for a blank or half-written one (a kill mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class MetricLog:
    def __init__(self, acc: Accelerator, out: str):
        self.acc, self.path = acc, os.path.join(out, METRICS_FILE)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()  # steps: finite ones, on the device

    def add(self, result: StepResult) -> None:
        """Add a step, its metrics only if finite (a skipped step's are left out); no host sync."""
        for k, v in {**result.metrics, "loss": result.loss, "grad_norm": result.grad_norm}.items():
            self.sums[k] = self.sums.get(k, 0) + torch.where(result.finite, v, 0.0)
        self.steps = self.steps + result.finite.float()
        self.images += result.images

    def record(self, step: int, epoch: int, lr: float) -> dict:
        """The means since the last record, over the finite steps and all processes (NaN when every step
        was skipped); written and returned. The host reads them here, not in between."""
        dt = time.perf_counter() - self.t0
        record = {"step": step, "epoch": epoch, "lr": lr,
                  "images_per_s": self.images * self.acc.num_processes / max(dt, 1e-9)}
        record.update({k: self.acc.reduce(v / self.steps, reduction="mean").item() for k, v in self.sums.items()})
        self.write(record)
        self._reset()
        return record

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written before a kill, re-run on resume): each step
        is then logged once. Main process only."""
        if not self.acc.is_main_process or not os.path.exists(self.path):
            return
        with open(self.path) as fh:
            kept = [line for line in fh if _step_of(line) is not None and _step_of(line) <= step]
        atomic_write_text(self.path, "".join(kept))

    def last_record(self) -> dict:
        """The last training record (one with a loss) in ``metrics.jsonl``, written by this process or,
        for a resumed run, an earlier one; {} when there is none."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as fh:
            records = [json.loads(line) for line in fh if _step_of(line) is not None]
        return next((r for r in reversed(records) if "loss" in r), {})

    def write(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
