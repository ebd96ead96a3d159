"""Online monitors of a pretraining run: kNN, few-shot and RankMe on a small fixed subset of labelled
(or, for RankMe, any) data, every ``--monitor-every`` steps and at the last step.

    --monitor knn,fewshot,rankme --monitor-every 200 [--monitor-data NAME_OR_PATH]
        [--monitor-max-train 1000] [--monitor-max-test 250]

The monitored backbone is the one ``ckpt.pt`` holds (``export_backbone``: the teacher for DINO and
MSN), in eval mode under no_grad, its mode restored after. The monitor data's images are decoded,
resized and normalised once per run (the evaluation transform, as the ``eval`` commands apply it to
the checkpoint) and kept as tensors, so a monitor call costs one forward pass over them plus the
evaluators. Records go to ``metrics.jsonl`` and the trackers under:

* ``monitor_knn_top1``: weighted kNN accuracy at k = ``MONITOR_K`` = 20 (DINO's headline k, one of
  ``eval.knn``'s defaults 10 20 100 200), T = 0.07; train subset as memory, test subset as queries;
* ``monitor_fewshot_10shot``: ``eval.fewshot``'s ridge classifier, 10 shots, l2 = 1024, 3 seeds;
* ``monitor_rankme``: RankMe of the train subset's embeddings (label-free).

Under several processes the main process measures and the others wait: every process holds the
same weights, so one measurement is the measurement. A sharded (FSDP) objective's forward pass needs
every process: there every process decodes the subsets and runs the same forward passes
(``Objective.represent``, in lockstep), and the main process alone computes the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..config import TrainConfig, requested_monitors
from ..data import DataSource, eval_crop_fraction, eval_transform, load_data
from ..errors import ConfigError
from ..objectives import DataInfo, Objective
from .features import Features, check_labels, eval_mode, extract, frozen_autocast, image_split
from .fewshot import class_members, fewshot
from .knn import TEMPERATURE, knn
from .rankme import rankme

NEED_LABELS = ("knn", "fewshot")
MONITOR_K = 20  # DINO's headline k
MONITOR_SHOTS = 10
BATCH = 256  # images per forward pass


@dataclass
class MonitorImages:
    """The monitor data, decoded once: train [N, C, H, W] and labels [N] (-1: none); test [M, C, H, W]
    and labels [M], None when only label-free monitors run."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: Optional[torch.Tensor]
    test_labels: Optional[torch.Tensor]
    num_classes: Optional[int]


def monitor_source(tc: TrainConfig, source: DataSource, names: tuple[str, ...]) -> DataSource:
    """The data the monitors read (``--monitor-data``, else the run's), checked against what they need."""
    spec = tc.monitor_data or tc.data
    if tc.monitor_data is not None:
        source = load_data(tc.monitor_data)
    labelled = [n for n in names if n in NEED_LABELS]
    if labelled and not source.has_labels:
        raise ConfigError(f"--monitor {','.join(labelled)} needs labels and {spec} has none; pass --monitor-data "
                          "LABELLED_DATA (e.g. default), or monitor rankme only (label-free)")
    if labelled and source.test is None:
        raise ConfigError(f"--monitor {','.join(labelled)} needs a test split and {spec} has none; "
                          "pass --monitor-data with a test split")
    if not hasattr(source.train, "__len__"):
        raise ConfigError(f"--monitor reads a fixed subset and {spec} is streamed; pass --monitor-data with a "
                          "local or downloaded data set")
    return source


def decode_images(tc: TrainConfig, source: DataSource, info: DataInfo, labelled: bool, workers: int
                  ) -> MonitorImages:
    """The monitor subsets as tensors, through the evaluation transform (once per run), decoded by
    ``workers`` loader workers (the run's, resolved)."""
    transform = eval_transform(info.img_size, info.mean, info.std, eval_crop_fraction(info.img_size))
    spec, identity = tc.monitor_data or tc.data, nn.Identity()
    wanted = [("train", tc.monitor_max_train)] + ([("test", tc.monitor_max_test)] if labelled else [])
    splits = {}
    for split, limit in wanted:
        ds = image_split(source, spec, split, limit, transform, tc.skip_bad_images)
        images, labels, _ = extract(identity, ds, BATCH, workers, torch.device("cpu"), f"monitor images {split}")
        if labelled:
            check_labels(labels, source.num_classes, spec, split)
        splits[split] = images, labels
    test = splits.get("test", (None, None))
    return MonitorImages(*splits["train"], *test, source.num_classes if labelled else None)


class Monitors:
    """Called after every optimizer step; measures when due and returns the ``monitor_*`` metrics on
    the main process (None elsewhere and when not due)."""

    def __init__(self, names: tuple[str, ...], every: int, acc: Accelerator, images: Optional[MonitorImages]):
        self.names, self.every, self.acc, self.images = names, every, acc, images

    @classmethod
    def build(cls, tc: TrainConfig, source: DataSource, info: DataInfo, acc: Accelerator, workers: int = 0
              ) -> "Monitors":
        names = requested_monitors(tc.monitor)
        if not names:
            return cls(names, tc.monitor_every, acc, None)
        source = monitor_source(tc, source, names)
        labelled = any(n in NEED_LABELS for n in names)
        everyone = acc.distributed_type == DistributedType.FSDP  # each process takes part in the forward passes
        images = decode_images(tc, source, info, labelled, workers) if acc.is_main_process or everyone else None
        if images is not None and labelled:
            check_subset(images, names)
        return cls(names, tc.monitor_every, acc, images)

    def due(self, step: int, end: int) -> bool:
        """Whether monitors run after optimizer step ``step`` of ``end``."""
        return bool(self.names) and (step % self.every == 0 or step == end)

    def __call__(self, step: int, end: int, objective: Objective) -> Optional[dict]:
        if not self.due(step, end):
            return None
        sharded = isinstance(objective, FSDPModule)
        results = None
        if self.acc.is_main_process or sharded:
            results = self.measure(objective.export_backbone(), objective.represent if sharded else None)
        self.acc.wait_for_everyone()
        return results if self.acc.is_main_process else None

    def measure(self, backbone: nn.Module, forward: Optional[Callable] = None) -> dict:
        """The ``monitor_*`` metrics of ``backbone`` on the decoded subsets (on the main process; {}
        elsewhere). ``forward``: images -> representations, default ``backbone``."""
        im, results = self.images, {}
        with eval_mode(backbone), torch.no_grad():
            train = embed(backbone, im.train, forward)
            test = embed(backbone, im.test, forward) if im.test is not None else None
        if not self.acc.is_main_process:
            return results
        if im.test is not None:
            feats = Features(train, im.train_labels, test, im.test_labels, im.num_classes)
            if "knn" in self.names:
                results["monitor_knn_top1"] = knn(feats, ks=(MONITOR_K,), temperature=TEMPERATURE)[0]["accuracy"]
            if "fewshot" in self.names:
                results[f"monitor_fewshot_{MONITOR_SHOTS}shot"] = fewshot(feats, shots=(MONITOR_SHOTS,))[0]["accuracy"]
        if "rankme" in self.names:
            results["monitor_rankme"] = rankme(train)
        return results


def check_subset(images: MonitorImages, names: tuple[str, ...]) -> None:
    """Refuse, before training, a train subset too small for kNN's k or few-shot's shots per class."""
    if "knn" in names and len(images.train) < MONITOR_K:
        raise ConfigError(f"--monitor knn: k = {MONITOR_K} needs {MONITOR_K} training images and the monitor data "
                          f"gives {len(images.train)}; raise --monitor-max-train or use larger --monitor-data")
    if "fewshot" in names:
        smallest = min(len(m) for m in class_members(images.train_labels, images.num_classes))
        if smallest < MONITOR_SHOTS:
            raise ConfigError(f"--monitor fewshot: {MONITOR_SHOTS} shots need {MONITOR_SHOTS} training images per "
                              f"class and the smallest class of the monitor subset has {smallest}; raise "
                              "--monitor-max-train or use larger --monitor-data")


def embed(backbone: nn.Module, images: torch.Tensor, forward: Optional[Callable] = None) -> torch.Tensor:
    """[N, C, H, W] (CPU) -> [N, D] float32 CPU representations of ``backbone`` (through ``forward``, by
    default the backbone itself), ``BATCH`` images per forward pass."""
    device, forward = next(backbone.parameters()).device, forward or backbone
    with frozen_autocast(device):
        return torch.cat([forward(images[i:i + BATCH].to(device)).float().cpu()
                          for i in range(0, len(images), BATCH)])
