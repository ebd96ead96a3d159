"""Fixed, seeded, class-balanced label subsets (the 1% / 10% protocols of SimCLR, MSN and others)."""

from __future__ import annotations

import dataclasses

import torch
from datasets import Dataset

from ..errors import ConfigError
from .sources import DataSource


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--label-fraction {fraction}: use a fraction in (0, 1], e.g. 0.01 or 0.1")
    return fraction


def class_balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices [M] (ascending) of ``fraction`` of each class's examples, at least one per class, drawn
    by a seeded permutation: the same labels, fraction and seed give the same subset everywhere.
    labels: [N] integer class of each example."""
    if check_fraction(fraction) == 1.0:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    chosen = []
    for c in torch.unique(labels):
        members = order[labels[order] == c]  # this class's examples, in the seeded order
        chosen.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(chosen).sort().values


def labelled_fraction(source: DataSource, fraction: float, seed: int = 0) -> DataSource:
    """``source`` with its train split cut to ``class_balanced_subset(fraction, seed)``; the test split whole."""
    if fraction == 1.0:
        return source
    if not isinstance(source.train, Dataset):
        raise ConfigError(f"--label-fraction {fraction} draws from the whole train split: drop --streaming")
    keep = class_balanced_subset(torch.tensor(list(source.train[source.label_column])), fraction, seed)
    return dataclasses.replace(source, train=source.train.select(keep.tolist()))
