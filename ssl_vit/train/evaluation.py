"""The objective's test metric at the end of a run (and every ``--eval-every`` steps): sums over
each process's share of the test split, added up over all processes.

A sharded model (FSDP) gathers parameters with the other processes at every forward pass, and the
sums are added up by a collective too, so each process runs as many batches as the process with the
most (``sharding.lockstep``; unsharded runs too, for one code path): a one-image placeholder, whose
sums are dropped, stands in for the batches it lacks and for those without a readable image.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.device import DeviceBatch
from ..objectives import Objective
from .sharding import lockstep
from .step import to_device


def placeholder_batch(img_size: int) -> dict:
    """One black RGB image of class 0: a forward pass that every objective's ``evaluate_batch`` takes."""
    return {"image": torch.zeros(1, 3, img_size, img_size), "label": torch.zeros(1, dtype=torch.long)}


@torch.no_grad()
def evaluate(objective: Objective, loader: DataLoader, acc: Accelerator, img_size: int,
             on_device: Callable[[dict], dict] = DeviceBatch()) -> Optional[dict]:
    """``objective.test_metrics`` of the sums of ``evaluate_batch`` over the test split, all processes
    together (each reads its share from ``loader``; ``on_device`` makes its uint8 images float and
    normalised on the device); None when no test image was readable."""
    objective.eval()
    sums: dict[str, torch.Tensor] = {}
    readable = torch.zeros((), device=acc.device)
    for batch, counts in tqdm(lockstep(loader, placeholder_batch(img_size), acc.device), desc="test", leave=False,
                              disable=not acc.is_local_main_process):
        with acc.autocast():
            part = objective.evaluate_batch(on_device(to_device(batch, acc.device)))
        for k, v in part.items():
            sums[k] = sums.get(k, 0) + (v if counts else torch.zeros_like(v))
        readable += counts
    objective.train()
    if not sums or not acc.reduce(readable, reduction="sum").item():  # no readable test image
        return None
    return objective.test_metrics({k: acc.reduce(v, reduction="sum") for k, v in sums.items()})
