"""What a person reads when a run ends: the objective's metric against its baseline, the checkpoint,
and the commands that evaluate it next."""

from __future__ import annotations

import os
import shlex
from typing import Optional

from ..objectives import Objective


def next_commands(ckpt: str, data: str, has_labels: bool) -> list[str]:
    """The evaluation commands for a new checkpoint, on its own data when that has labels."""
    c, d = shlex.quote(ckpt), shlex.quote(data)
    also = "also eval.fewshot, eval.linear, eval.finetune"
    knn = (f"python -m eval.knn {c} --data {d}   ({also})" if has_labels
           else f"python -m eval.knn {c} --data LABELLED_DATA   ({data} has no labels; {also})")
    inspect = shlex.quote(os.path.join(os.path.dirname(ckpt), "inspect"))
    return [f"next: {knn}",
            f"      python -m eval.inspection {c} --data {d} --out {inspect}"]


def run_summary(objective: Objective, record: dict, results: Optional[dict], ckpt: str, data: str,
                has_labels: bool) -> list[str]:
    """The closing lines of a run: ``objective.headline`` when it has one, the checkpoint, what next."""
    headline = objective.headline(record, results or {})
    return [*([headline] if headline else []), f"checkpoint: {ckpt}", *next_commands(ckpt, data, has_labels)]
