"""--on-nonfinite, applied where the host reads the steps' finite flags: at log steps and before
every evaluation and save, never in between (a step leaves a non-finite update undone on the
device: ``step.optimizer_step``), so nothing a non-finite step touched is saved."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .step import StepResult


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient; raised before anything bad reaches a checkpoint."""


class NonFiniteSteps:
    """The finite flags of the steps since the last ``check``, read there with one host sync.

    ``policy``: ``stop`` raises at the first non-finite step; ``skip`` counts them (their updates were
    dropped; their batches and learning rates used up, as GradScaler's skipped steps) and raises
    after more than ``max_in_a_row`` in a row."""

    def __init__(self, policy: str, max_in_a_row: int, skipped: int = 0):
        self.policy, self.max_in_a_row = policy, max_in_a_row
        self.skipped, self.in_a_row = skipped, 0
        self._pending: list[tuple[int, StepResult]] = []

    def add(self, step: int, result: StepResult) -> None:
        """Optimizer step ``step`` (0-based); no host sync."""
        self._pending.append((step, result))

    def check(self, last_good: Callable[[], Optional[str]]) -> list[int]:
        """The non-finite steps since the last check, counted (skip) or raised (``NonFiniteError``,
        naming the step and ``last_good()``, the state a new run may start from)."""
        if not self._pending:
            return []
        flags = torch.stack([r.finite for _, r in self._pending]).tolist()
        pending, self._pending, bad = self._pending, [], []
        for (step, result), finite in zip(pending, flags):
            self.in_a_row = 0 if finite else self.in_a_row + 1
            if finite:
                continue
            if self.policy == "stop" or self.in_a_row > self.max_in_a_row:
                raise self._error(step, result, last_good())
            bad.append(step)
        self.skipped += len(bad)
        return bad

    def _error(self, step: int, result: StepResult, last_good: Optional[str]) -> NonFiniteError:
        in_a_row = f" after skipping {self.max_in_a_row} in a row" if self.policy == "skip" else ""
        return NonFiniteError(
            f"non-finite loss or gradient at step {step}{in_a_row} (loss {result.loss.item()}, grad norm "
            f"{result.grad_norm.item()}); nothing was saved from it. Last good state: {last_good or 'none'}. "
            "Start a new run (--out) with a lower --lr, use --precision bf16 instead of fp16"
            + (", or pass --on-nonfinite skip" if self.policy == "stop" else ""))
