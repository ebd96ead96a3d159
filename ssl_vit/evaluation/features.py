"""Frozen features: one pass of a checkpoint's backbone over a data set's train and test splits.

Images go through timm's evaluation transform at the model's input size (from 224 px on: resize
to size / 0.875 and centre-crop, as DINO and timm; below: resize to the exact size;
``--crop-fraction`` sets it) and are normalised as the checkpoint was trained (``ckpt.pt`` data
mean/std, else ``ssl_vit.data.MEAN/STD``); the representation is
``backbone(images)`` (class token or mean of patch tokens, as the checkpoint says; the teacher
for DINO, since that is the backbone a DINO ``ckpt.pt`` holds). Batched, on the GPU when there
is one (bf16 autocast there), with a progress bar.

Features of a checkpoint are cached as safetensors (tensors only, no pickle) under ``--cache-dir``
(an in-memory backbone, as in training, is not cached), one file per split, keyed by a hash of
the checkpoint file's content (or the timm name), the data (for a local path: its files' names,
sizes and modification times), the split, the subset, the image size, the crop fraction and the
normalisation: a second call with the same inputs reads them back at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from torch import nn

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..backbone import Backbone
from ..checkpoint import atomic_write, load_backbone
from ..data import (DataSource, EpochSampler, ImageDataset, eval_crop_fraction, eval_transform, load_data,
                    make_loader, normalization)
from ..errors import EvalError

FEATURES_VERSION = 2  # part of the cache key: bump it when the extraction itself changes (2: split rows kept)
SUBSET_SEED = 0  # --max-train / --max-test draw the same images every time
HASH_CHUNK = 1 << 20


@dataclass
class Features:
    """train: [N, D] float32, train_labels: [N] int64, test: [M, D], test_labels: [M]; train_rows [N]
    and test_rows [M]: the row of the data set's split each feature comes from (a ``--max-train``
    subset and skipped images leave rows out), None where not known."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    train_rows: Optional[torch.Tensor] = None
    test_rows: Optional[torch.Tensor] = None


def checkpoint_digest(spec: str) -> str:
    """sha256 of the checkpoint file's bytes, or of the name for ``timm:NAME`` (random init)."""
    h = hashlib.sha256()
    if spec.startswith("timm:"):
        h.update(spec.encode())
        return h.hexdigest()
    with open(spec, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def data_identity(spec: str):
    """What names a data set's content: its files (path, size, mtime) when local, else its name."""
    path = os.path.expanduser(spec)
    if spec == "default" or not os.path.exists(path):
        return spec
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    return [os.path.realpath(path)] + [
        [os.path.relpath(f, path), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files
    ]


def subset_rows(size: int, n: Optional[int]) -> Optional[list[int]]:
    """The rows of a fixed random subset of ``n`` of ``size`` rows, in their original order; None for all."""
    if n is None or n >= size:
        return None
    g = torch.Generator().manual_seed(SUBSET_SEED)
    return sorted(torch.randperm(size, generator=g)[:n].tolist())


def subset(ds, n: Optional[int]):
    """A fixed random subset of ``n`` rows (in their original order), or ``ds`` itself."""
    rows = subset_rows(len(ds), n)
    return ds if rows is None else ds.select(rows)


def image_split(source: DataSource, data: str, split: str, limit: Optional[int], transform,
                skip_bad_images: bool) -> ImageDataset:
    """The labelled images of one split (a fixed subset of ``limit`` when given) under ``transform``."""
    ds = subset(getattr(source, split), limit)
    if len(ds) == 0:
        raise EvalError(f"the {split} split of {data} is empty")
    return ImageDataset(ds, source.image_column, source.label_column, transform, split=split,
                        skip_bad_images=skip_bad_images)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode within the block, its own mode (train, during training) restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def frozen_autocast(device: torch.device):
    """bf16 autocast for a frozen backbone's forward pass on a GPU, nothing on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.inference_mode()
def extract(represent: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset, batch_size: int,
            num_workers: int, device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Representations [N, D] (float32, CPU; ``represent``: images [B, C, H, W] -> [B, D], such as a
    backbone), labels [N] (-1 for a split without labels) and positions in ``dataset`` [N] of every
    readable image, in data set order."""
    sampler = EpochSampler(len(dataset), batch_size, shuffle=False, drop_last=False)
    loader = make_loader(dataset, sampler, num_workers, pin_memory=device.type == "cuda")
    autocast = frozen_autocast(device)
    feats, labels, positions, skipped = [], [], [], 0
    with tqdm(total=len(dataset), desc=desc, unit="img", file=sys.stderr) as bar:
        for batch in loader:
            skipped += batch["skipped"]
            bar.update(batch["skipped"])
            if "image" not in batch:  # every image of this batch was unreadable
                continue
            with autocast:
                out = represent(batch["image"].to(device, non_blocking=True))
            feats.append(out.float().cpu())
            labels.append(batch.get("label", torch.full((len(out),), -1)))  # -1: a split without labels
            positions.append(batch["index"])
            bar.update(len(out))
    if skipped:
        print(f"{desc}: left out {skipped} unreadable images (--skip-bad-images)", file=sys.stderr)
    if not feats:
        raise EvalError(f"{desc}: no readable image")
    return torch.cat(feats), torch.cat(labels).long(), torch.cat(positions).long()


class FeatureExtractor:
    """A backbone, ready to produce features for any data set (cached when it came from a checkpoint).

    ``name``: what records and progress bars call it; ``data_stats``: the ``data`` entry of its
    checkpoint (mean/std); ``digest``: the checkpoint's content hash, which keys the cache in
    ``cache_dir`` (no cache without both)."""

    def __init__(self, backbone: Backbone, device: torch.device, name: str = "backbone",
                 data_stats: Optional[dict] = None, cache_dir: Optional[str] = None, digest: Optional[str] = None,
                 batch_size: int = 256, num_workers: int = 2, skip_bad_images: bool = False,
                 crop_fraction: Optional[float] = None):
        self.spec, self.device, self.backbone = name, device, backbone
        self.mean, self.std = normalization(data_stats or {})
        self.img_size = backbone.cfg.img_size
        self.crop_fraction = eval_crop_fraction(self.img_size, crop_fraction)
        self.transform = eval_transform(self.img_size, self.mean, self.std, self.crop_fraction)
        self.digest = digest
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir and digest else None
        self.batch_size, self.num_workers, self.skip_bad_images = batch_size, num_workers, skip_bad_images

    @classmethod
    def from_checkpoint(cls, spec: str, device: torch.device, cache_dir: Optional[str], **kwargs) -> "FeatureExtractor":
        """The backbone of ``spec`` (ckpt.pt, timm:NAME, .safetensors) on ``device``, its features cached."""
        backbone, info = load_backbone(spec)  # CheckpointError for missing or foreign files
        return cls(backbone.to(device), device, spec, info.get("data"), cache_dir, checkpoint_digest(spec), **kwargs)

    def cache_path(self, data: str, split: str, limit: Optional[int], columns: tuple) -> Optional[str]:
        if self.cache_dir is None:
            return None
        key = json.dumps({
            "version": FEATURES_VERSION, "checkpoint": self.digest, "data": data_identity(data),
            "columns": columns, "split": split, "limit": limit, "img_size": self.img_size,
            "crop_fraction": self.crop_fraction, "mean": self.mean, "std": self.std,
            "skip_bad_images": self.skip_bad_images,
        }, sort_keys=True)
        return os.path.join(self.cache_dir, hashlib.sha256(key.encode()).hexdigest()[:40] + ".safetensors")

    def features(self, data: str, image_column: Optional[str] = None, label_column: Optional[str] = None,
                 max_train: Optional[int] = None, max_test: Optional[int] = None) -> Features:
        """Train and test features of ``data``, from the cache when they are there."""
        source: Optional[DataSource] = None
        out = {}
        for split, limit in (("train", max_train), ("test", max_test)):
            path = self.cache_path(data, split, limit, (image_column, label_column))
            cached = read_cache(path) if path else None
            if cached is not None:
                out[split], num_classes = cached
                continue
            source = source or labelled_source(data, image_column, label_column)
            num_classes = source.num_classes
            dataset = image_split(source, data, split, limit, self.transform, self.skip_bad_images)
            feats, labels, positions = extract(self.backbone, dataset, self.batch_size, self.num_workers,
                                               self.device, f"features {split} {os.path.basename(self.spec)}")
            check_labels(labels, num_classes, data, split)
            chosen = subset_rows(len(getattr(source, split)), limit)
            rows = positions if chosen is None else torch.tensor(chosen)[positions]  # subset position -> split row
            meta = {"checkpoint": self.spec, "data": data, "split": split, "num_classes": str(num_classes)}
            tensors = {"features": feats.contiguous(), "labels": labels, "rows": rows}
            if path:
                atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
            out[split] = tensors
        return Features(out["train"]["features"], out["train"]["labels"], out["test"]["features"],
                        out["test"]["labels"], num_classes, out["train"]["rows"], out["test"]["rows"])


def read_cache(path: str) -> Optional[tuple[dict[str, torch.Tensor], int]]:
    """(tensors ``features``, ``labels``, ``rows``; number of classes) of a cache entry, or None when there
    is none. A corrupt entry (a write cut short elsewhere, a disk fault) is removed and rebuilt, never an error."""
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, "pt") as fh:
            num_classes = int(fh.metadata()["num_classes"])
        tensors = load_file(path)
        return {key: tensors[key] for key in ("features", "labels", "rows")}, num_classes
    except Exception as err:  # safetensors raises its own error types, plus OSError, KeyError, TypeError
        print(f"feature cache {path} is unreadable ({type(err).__name__}); extracting again", file=sys.stderr)
        os.remove(path)
        return None


def labelled_source(data: str, image_column: Optional[str], label_column: Optional[str],
                    why: str = "it reports class accuracy") -> DataSource:
    """``load_data`` with the checks evaluation needs: labels (``why``: for the message), and a test split."""
    source = load_data(data, image_column, label_column)
    if not source.has_labels or not source.num_classes:
        raise EvalError(
            f"{data} has no label column: evaluation needs labels ({why}); "
            "name the column with --label-column, or evaluate on a labelled data set"
        )
    if source.test is None:
        raise EvalError(f"{data} has no test split and none could be held out")
    return source


def check_labels(labels: torch.Tensor, num_classes: int, data: str, split: str) -> None:
    if (labels < 0).any():
        raise EvalError(f"the {split} split of {data} has {int((labels < 0).sum())} negative labels (-1 usually "
                        "marks an unlabelled split): evaluation needs labels")
    unseen = sorted(set(labels[labels >= num_classes].tolist()))
    if unseen:
        raise EvalError(f"the {split} split of {data} has classes {unseen[:5]} that the training split does not "
                        f"(its classes are 0..{num_classes - 1}): evaluate on splits with the same classes")


def backbone_features(backbone: Backbone, data: str, device: Optional[torch.device] = None,
                      data_stats: Optional[dict] = None, image_column: Optional[str] = None,
                      label_column: Optional[str] = None, max_train: Optional[int] = None,
                      max_test: Optional[int] = None, **kwargs) -> Features:
    """Train and test features of ``data`` from an in-memory backbone (not cached), computed in eval
    mode; the backbone's mode is restored after. ``kwargs``: ``FeatureExtractor``'s batch settings."""
    device = device or next(backbone.parameters()).device
    with eval_mode(backbone):
        extractor = FeatureExtractor(backbone, device, data_stats=data_stats, **kwargs)
        return extractor.features(data, image_column, label_column, max_train, max_test)
