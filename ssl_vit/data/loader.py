"""From a ``datasets`` split to batches: decoding, seeded augmentation, sharding, resumable order.

Why not accelerate's prepared DataLoader: exact resume needs the order of every epoch and every
random crop to be a function of (seed, epoch, index) alone, whatever the number of workers or
processes and wherever a run was stopped. The sampler below yields (epoch, index) pairs, and
each example is augmented under its own seed, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import io
import os
import random
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from datasets import Dataset, Image as ImageFeature, IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, Sampler, get_worker_info
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset as TorchIterableDataset
from torch.utils.data import default_collate

from .sources import DataError


class BadImageError(DataError):
    """An image that cannot be decoded; names the file (or row) and the way to skip it."""


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image. 16- and 32-bit greyscale images are scaled to 8 bits first (Pillow's own
    conversion clips them, so every ordinary 16-bit PNG would become solid white): ``I;16*`` and ``I``
    by the 16-bit range (``I`` by its maximum when that is larger), ``F`` as it is when in [0, 1],
    else from its minimum to its maximum."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            low, high = (0.0, 1.0) if values.min() >= 0 and values.max() <= 1 else (values.min(), values.max())
        else:
            low, high = 0.0, max(65535.0, float(values.max()))
        scaled = (values - low) / max(high - low, 1e-12)
        img = Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8), mode="L")
    if img.mode == "RGB":  # convert would copy it
        img.load()
        return img
    return img.convert("RGB")


def _seed_for(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) & 0x7FFF_FFFF_FFFF_FFFF


class ExampleMaker:
    """Turns one row into a training example: decode, convert to RGB, augment under the seed of
    (seed, epoch, index). Shared by the map-style and the streaming data sets.

    Examples are ``{"image": tensor or list of crops, "label": int, "index": int}``, or ``None``
    for an unreadable image when ``skip_bad_images`` is set (the collate function counts those).
    """

    def __init__(self, image_column: str, label_column: Optional[str], transform: Callable,
                 seed: int = 0, skip_bad_images: bool = False, split: str = "train"):
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.seed, self.skip_bad_images, self.split = transform, seed, skip_bad_images, split

    def decode(self, value, index: int) -> Image.Image:
        where = f"row {index} of the {self.split} split"
        try:
            if isinstance(value, Image.Image):
                img = value
            elif isinstance(value, dict):
                where = value.get("path") or where
                img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
            else:
                raise TypeError(f"expected image bytes, a path or a PIL image, got {type(value).__name__}")
            return to_rgb(img)  # forces the full decode, so a truncated file fails here
        except Exception as err:
            raise BadImageError(
                f"cannot read image {where}: {err}. Pass --skip-bad-images to skip unreadable "
                "images (they are counted and reported)"
            ) from err

    def augment(self, img: Image.Image, seed: int):
        """The transform under this example's own seed (torch's CPU, python's and numpy's RNGs: timm's
        RandAugment picks its ops with numpy). In the training process the global state is saved and
        restored around it; a loader worker's generators serve
        its examples alone, so there they are only seeded. Only the CPU generator: torch.manual_seed
        would also queue a lazy CUDA seeding, with a captured stack trace, for every example (about
        1.7 ms each, and a queue that only grows)."""
        if get_worker_info() is not None:
            return self.seeded(img, seed)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            image = self.seeded(img, seed)
        random.setstate(py_state)
        np.random.set_state(np_state)
        return image

    def seeded(self, img: Image.Image, seed: int):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.transform(img)

    def __call__(self, row: dict, epoch: int, index: int) -> Optional[dict]:
        try:
            img = self.decode(row[self.image_column], index)
        except BadImageError:
            if self.skip_bad_images:
                return None
            raise
        out = {"image": self.augment(img, _seed_for(self.seed, epoch, index)), "index": index}
        if self.label_column is not None:
            out["label"] = int(row[self.label_column])
        return out


def _undecoded(ds, image_column: str):
    """Ask ``datasets`` for raw bytes so that we decode, and can name a broken file."""
    feat = (ds.features or {}).get(image_column)
    return ds.cast_column(image_column, ImageFeature(decode=False)) if isinstance(feat, ImageFeature) else ds


class ImageDataset(TorchDataset):
    """A map-style split; items are addressed by ``(epoch, index)`` pairs from ``EpochSampler``."""

    def __init__(self, ds: Dataset, image_column: str, label_column: Optional[str], transform: Callable,
                 seed: int = 0, skip_bad_images: bool = False, split: str = "train"):
        self.ds = _undecoded(ds, image_column)
        self.make = ExampleMaker(image_column, label_column, transform, seed, skip_bad_images, split)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item) -> Optional[dict]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        return self.make(self.ds[int(index)], epoch, int(index))


class StreamingImageDataset(TorchIterableDataset):
    """A streamed split (``datasets.IterableDataset``), for data sets too large for the disk.

    The stream is shuffled with a buffer (seeded, reshuffled each pass) and dealt out to processes
    by ``datasets``' ``split_dataset_by_node``. ``start`` skips the examples this process already
    used, so a resumed run continues at the same example. Read it with ``num_workers=0``: inside
    DataLoader workers ``datasets`` shards a stream by its files and would drop examples.
    """

    def __init__(self, ds: IterableDataset, image_column: str, label_column: Optional[str], transform: Callable,
                 seed: int = 0, skip_bad_images: bool = False, split: str = "train", rank: int = 0,
                 world_size: int = 1, repeat: bool = True, shuffle_buffer: int = 10_000):
        ds = _undecoded(ds, image_column)
        if repeat:
            ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.make = ExampleMaker(image_column, label_column, transform, seed, skip_bad_images, split)
        self.repeat, self.start = repeat, 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[Optional[dict]]:
        position, epoch = 0, 0
        while True:
            self.ds.set_epoch(epoch)
            for row in self.ds:
                if position >= self.start:
                    yield self.make(row, epoch, position)
                position += 1
            if not self.repeat:
                return
            epoch += 1


def collate(items: list[Optional[dict]]) -> dict:
    """Stack examples (multi-crop lists become lists of batches) and count skipped ones."""
    kept = [it for it in items if it is not None]
    batch = default_collate(kept) if kept else {}
    batch["skipped"] = len(items) - len(kept)
    return batch


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for this process: a seeded permutation of each epoch, cut to
    whole optimizer steps, dealt out to the processes, and resumable at any batch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, batches_per_step: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        per_step = batch_size * world_size * batches_per_step
        if drop_last and n < per_step:
            raise DataError(
                f"the data set has {n} examples, fewer than one optimizer step needs ({per_step}); "
                "lower --batch-size"
            )
        self.usable = (n // per_step) * per_step if drop_last else n
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        per_rank = len(range(self.rank, self.usable, self.world_size))
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)[: self.usable]
        else:
            order = torch.arange(self.usable)
        mine = order[self.rank :: self.world_size][self.start_batch * self.batch_size :]
        return iter([(self.epoch, int(i)) for i in mine])

    def __len__(self) -> int:
        per_rank = len(range(self.rank, self.usable, self.world_size))
        return max(0, per_rank - self.start_batch * self.batch_size)


MAX_AUTO_WORKERS = 16  # beyond this, more worker processes mostly cost memory


def resolve_workers(num_workers, processes_here: int = 1) -> int:
    """``--num-workers``: a count as given, or for "auto" the CPUs this process may use (its affinity
    mask, which a container or ``taskset`` narrows), shared by the ``processes_here`` training
    processes of this machine, less one for the process itself; at most MAX_AUTO_WORKERS."""
    if num_workers != "auto":
        return int(num_workers)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, cpus // max(processes_here, 1) - 1))


def make_loader(dataset, sampler: Optional[EpochSampler], num_workers: int, pin_memory: bool,
                batch_size: Optional[int] = None, drop_last: bool = True, persistent: bool = False) -> DataLoader:
    """A DataLoader over ``ImageDataset`` + ``EpochSampler``, or over a ``StreamingImageDataset``
    (no sampler: pass ``batch_size`` and ``drop_last``). ``persistent``: keep the workers between
    epochs (the sampler runs in this process, so ``set_epoch`` and resume still reach them)."""
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size if sampler else batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=sampler.drop_last if sampler else drop_last,
        persistent_workers=persistent and num_workers > 0,
        generator=torch.Generator().manual_seed(0),  # draws base seeds without touching the global RNG
    )
