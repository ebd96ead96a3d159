"""The data pipeline of a run: train and test loaders for map-style and streamed splits alike, and
the micro-batches of every optimizer step from any step on (exact resume)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import torch
from datasets import IterableDataset
from torch.utils.data import DataLoader

from ..config import RunConfig
from ..data import DataSource, EpochSampler, ImageDataset, StreamingImageDataset, eval_transform, make_loader
from ..data.device import DeviceBatch
from ..data.in_memory import InMemoryLoader, batch_augmentation, decode_split
from ..errors import ConfigError

STREAM_EPOCH_STEPS = 1_000  # "epoch" length of a stream whose size is unknown (epoch-based schedules)


@dataclass
class Shard:
    """Where this process sits: its rank among ``world`` processes (``local`` of them on this machine),
    its micro-batch, pinned memory, its loader workers and its device."""

    rank: int = 0
    world: int = 1
    micro_batch: int = 1
    pin_memory: bool = False
    workers: int = 0
    device: str = "cpu"
    local: int = 1


def device_loader(loader: DataLoader, device: torch.device) -> Iterable:
    """The loader as the device expects it: on a TPU, torch_xla's ``MpDeviceLoader`` (batches moved to
    the device in background threads), what ``accelerator.prepare`` would wrap a loader in; ours are
    not prepared (they resume at any step) and the wrapper keeps their order. Elsewhere the loader."""
    if device.type != "xla":
        return loader
    from torch_xla.distributed.parallel_loader import MpDeviceLoader

    return MpDeviceLoader(loader, device)


def split_loader(split, source: DataSource, label_column: Optional[str], transform, run: RunConfig, shard: Shard,
                 train: bool) -> tuple[Iterable, Union[EpochSampler, StreamingImageDataset]]:
    """A loader over one split, map-style or streamed, and what positions it (the sampler, or the
    stream itself). Train: shuffled, whole optimizer steps, endless stream; test: in order, all of it."""
    tc = run.train
    args = (source.image_column, label_column, transform, tc.seed, tc.skip_bad_images, "train" if train else "test")
    if isinstance(split, IterableDataset):  # streamed: read in this process (datasets shards by file in workers)
        ds = StreamingImageDataset(split, *args, rank=shard.rank, world_size=shard.world, repeat=train)
        return device_loader(make_loader(ds, None, 0, shard.pin_memory, shard.micro_batch, drop_last=train),
                             torch.device(shard.device)), ds
    ds = ImageDataset(split, *args)
    sampler = EpochSampler(len(ds), shard.micro_batch, tc.seed, train, shard.rank, shard.world, train,
                           tc.grad_accum if train else 1)
    return device_loader(make_loader(ds, sampler, shard.workers, shard.pin_memory, persistent=train),
                         torch.device(shard.device)), sampler


def in_memory_loader(source: DataSource, label_column: Optional[str], transform, run: RunConfig, shard: Shard
                     ) -> tuple[InMemoryLoader, EpochSampler]:
    """``--data-on-device``: the train split decoded once onto the device, augmented there a batch at a time."""
    tc = run.train
    if isinstance(source.train, IterableDataset):
        raise ConfigError("--data-on-device with --streaming: a streamed data set is read as it arrives and cannot "
                          "be held on the device; drop one of them")
    augment = batch_augmentation(transform, run.backbone.img_size, tc)
    device = torch.device(shard.device)
    images, labels = decode_split(source.train, source.image_column, label_column, tc.data, device, shard.local,
                                  shard.workers, tc.skip_bad_images)
    sampler = EpochSampler(len(images), shard.micro_batch, tc.seed, True, shard.rank, shard.world, True,
                           tc.grad_accum)
    return InMemoryLoader(images, labels, augment, sampler, tc.seed), sampler


def _num_examples(ds) -> Optional[int]:
    """Size of a streamed split when its metadata says it, else None."""
    try:
        return ds.info.splits["train"].num_examples
    except (AttributeError, KeyError, TypeError):
        return None


class DataPipeline:
    """The run's training loader (``micro_batches``) and, where the objective has a test metric and the
    data a labelled test split, its test loader. Both send uint8 images; ``on_device`` (training batches)
    and ``test_on_device`` make them float and normalise them on the device (``ssl_vit.data.device``).
    ``transform``: the objective's per-image augmentation to uint8 (``train_transform(..., uint8=True)``)."""

    def __init__(self, run: RunConfig, source: DataSource, objective_cls, transform, shard: Shard):
        self.accum = run.train.grad_accum
        self.micro_batch = shard.micro_batch
        self.on_device, self.test_on_device = DeviceBatch(random_erasing=run.train.random_erasing), DeviceBatch()
        label = source.label_column if objective_cls.needs_labels else None
        if run.train.data_on_device:
            self.loader, self.position = in_memory_loader(source, label, transform, run, shard)
        else:
            self.loader, self.position = split_loader(source.train, source, label, transform, run, shard, train=True)
        if isinstance(self.position, EpochSampler):
            self.steps_per_epoch = self.position.batches_per_epoch // self.accum
        else:
            n = _num_examples(source.train)
            self.steps_per_epoch = max(1, n // run.train.batch_size) if n else STREAM_EPOCH_STEPS
        self.test_loader = None
        if source.test is not None and source.has_labels and objective_cls.has_test_metric:
            self.test_loader, _ = split_loader(source.test, source, source.label_column,
                                               eval_transform(run.backbone.img_size, uint8=True), run, shard,
                                               train=False)

    def micro_batches(self, start_step: int) -> Iterator[tuple[int, list[dict]]]:
        """(epoch, the ``grad_accum`` micro-batches) of each optimizer step from ``start_step`` on."""
        if isinstance(self.position, EpochSampler):
            return self._epochs(start_step)
        return self._stream(start_step)

    def _epochs(self, start_step: int) -> Iterator[tuple[int, list[dict]]]:
        """Map-style: each epoch a new permutation; a resumed epoch starts at its next batch."""
        epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
        while True:
            self.position.set_epoch(epoch, start_batch=step_in_epoch * self.accum)
            yield from ((epoch, group) for group in self._groups())
            epoch, step_in_epoch = epoch + 1, 0

    def _stream(self, start_step: int) -> Iterator[tuple[int, list[dict]]]:
        """Streamed: one endless pass that skips what this process already used; epochs count steps."""
        self.position.set_start(start_step * self.accum * self.micro_batch)
        for step, group in enumerate(self._groups(), start_step):
            yield step // self.steps_per_epoch, group

    def _groups(self) -> Iterator[list[dict]]:
        """The loader's batches, ``grad_accum`` at a time (a partial group at the end is dropped)."""
        group = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.accum:
                yield group
                group = []
