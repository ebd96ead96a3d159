"""``--data-on-device``: a map-style split decoded once into one uint8 tensor on the training device,
and augmented there a whole batch at a time (no loader workers, no per-image Python).

The augmentations are the per-image ones of ``transforms.train_transform`` (random resized crop and
flip) and ``multicrop.MultiCrop`` (DINO's and MSN's views), on batches:

- crop and flip: per image, as in the per-image path: torchvision's ``RandomResizedCrop`` parameters
  drawn for every image at once (``crop_boxes``), then one ``grid_sample`` (bicubic) per view for
  the whole batch, the flip folded into the sampling grid. Unlike the PIL path
  it does not antialias: a crop shrunk to the output size (stored images larger than the crop)
  aliases a little; enlarged crops (CIFAR at 32 px, nearly every crop) are unaffected.
- colour jitter, greyscale, blur, solarize: whether each is applied is drawn per image (with the
  recipe's probabilities); the jitter's factors and order and the blur's sigma are torchvision v2's
  own draws, shared by the images of one of ``COLOR_GROUPS`` groups of the batch (v2 draws one set
  per call; per-image parameters would need a call per image).

Batches follow the ``EpochSampler`` order; each batch is augmented under a seed of (seed, epoch,
batch, rank), so processes draw differently and a resumed run sees the same batches.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ..errors import ConfigError
from .loader import EpochSampler, ImageDataset, _seed_for
from .multicrop import SOLARIZE_THRESHOLD, MultiCrop
from .sources import DataError

MEMORY_FRACTION = 0.25  # the decoded split may take at most this share of the device's memory (per process)
COLOR_GROUPS = 16  # colour jitter and blur parameters: one draw per group of the batch
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratio range (torchvision's default, as the PIL path)


# ----- decoding once -----
def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device`` (a GPU's total, or the machine's RAM for a CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(n: int, shape: Sequence[int], device: torch.device, processes_here: int, name: str) -> None:
    """Refuse a split whose decoded uint8 tensor [n, *shape] would take more than MEMORY_FRACTION of
    the device's memory (of a CPU's RAM shared by ``processes_here`` processes, each holding a copy)."""
    size = n * math.prod(shape)
    share = processes_here if device.type == "cpu" else 1
    limit = MEMORY_FRACTION * device_memory(device) / share
    if size > limit:
        raise DataError(f"--data-on-device: the train split of {name} decoded is {size / 2**30:.1f} GiB "
                        f"({n} images x {' x '.join(map(str, shape))} uint8), more than {limit / 2**30:.1f} GiB "
                        f"({MEMORY_FRACTION:.0%} of the {device.type} memory per process); drop --data-on-device "
                        "(the loader's workers decode it as it trains)")


def _chunk(items: list) -> dict:
    """Decoded examples -> ``{"image": [n, C, H, W], "label": [n], "size": [(index, shape)]}``: one tensor per
    chunk (a worker sends each tensor through its own file descriptor), ``image`` None where sizes differ."""
    kept = [it for it in items if it is not None]
    sizes = [(it["index"], tuple(it["image"].shape)) for it in kept]
    one_size = len({shape for _, shape in sizes}) == 1
    return {"image": torch.stack([it["image"] for it in kept]) if one_size else None, "size": sizes,
            "label": [it.get("label", -1) for it in kept]}


def decode_split(split, image_column: str, label_column: Optional[str], name: str, device: torch.device,
                 processes_here: int = 1, workers: int = 0, skip_bad_images: bool = False
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The split as uint8 images [N, 3, H, W] and labels [N] (or None) on ``device``; unreadable images
    left out with ``skip_bad_images``. Every image must have one size (a batch is one tensor)."""
    ds = ImageDataset(split, image_column, label_column, v2.PILToTensor(), skip_bad_images=skip_bad_images)
    first = next((item for item in map(ds.__getitem__, range(len(ds))) if item is not None), None)
    if first is None:
        raise DataError(f"--data-on-device: no readable image in the train split of {name}")
    shape = tuple(first["image"].shape)
    check_fits(len(ds), shape, device, processes_here, name)
    images, labels = [], []
    for chunk in DataLoader(ds, batch_size=1024, num_workers=workers, collate_fn=_chunk):
        other = next(((i, s) for i, s in chunk["size"] if s != shape), None)
        if other is not None:
            raise DataError(f"--data-on-device needs images of one size: row {other[0]} of {name} is "
                            f"{other[1][1:]}, row {first['index']} {shape[1:]}; resize the data set, or drop "
                            "--data-on-device")
        if chunk["size"]:
            images.append(chunk["image"])
            labels += chunk["label"]
    return torch.cat(images).to(device), torch.tensor(labels, device=device) if label_column is not None else None


# ----- augmenting a batch -----
def crop_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float] = RATIO,
               tries: int = 10) -> torch.Tensor:
    """[n, 4] (top, left, h, w): torchvision's ``RandomResizedCrop.get_params`` for n images at once (by
    hand: torchvision draws one box per call). Up to 10 tries of an area in ``scale`` x H x W and a
    log-uniform aspect ratio; the first that fits, else the whole image cut to the ratio range, centred."""
    target = height * width * torch.empty(n, tries).uniform_(*scale)
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64)).tolist()
    aspect = torch.exp(torch.empty(n, tries).uniform_(*log_ratio))
    w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = (torch.rand(n) * (height - h + 1)).floor()
    left = (torch.rand(n) * (width - w + 1)).floor()
    found = fits.any(1)
    if not found.all():  # the fallback of torchvision: the whole image, cut to the ratio range
        in_ratio = width / height
        fw = width if in_ratio <= ratio[1] else round(height * ratio[1])
        fh = height if in_ratio >= ratio[0] else round(width / ratio[0])
        fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float32)
        top, left, h, w = (torch.where(found, v, f) for v, f in zip((top, left, h, w), fallback))
    return torch.stack([top, left, h, w], 1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """images [B, C, H, W] float in 0..1, boxes [B, 4] (top, left, h, w), flips [B] bool -> [B, C, size, size]:
    each box resized (bicubic) to size x size, mirrored where ``flips``; one ``grid_sample`` for the batch.

    The sampling grid [B, size, size, 2] is built by broadcasting (what ``affine_grid`` gives for these
    axis-aligned maps, without its batched matmul: a third of the CPU time of the whole crop)."""
    height, width = images.shape[-2:]
    top, left, h, w = host_to(boxes.to(torch.float32), images.device).unbind(1)
    sign = 1.0 - 2.0 * host_to(flips.to(torch.float32), images.device)
    base = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size  # output pixel centres in 0..1
    x = ((left[:, None] + w[:, None] * (0.5 + sign[:, None] * (base - 0.5))) * (2 / width) - 1)  # [B, size]
    y = (top[:, None] + h[:, None] * base) * (2 / height) - 1  # [B, size], grid_sample's -1..1 (align_corners=False)
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), -1)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (crop boxes, flips, chosen rows, indices) on ``device`` without making the
    host wait: a copy from pageable memory to a GPU first waits for the stream, one from pinned
    memory (torch's caching host allocator) does not."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32).mul_(1.0 / 255)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float 0..1 -> uint8, rounded, as the per-image path's PIL images and uint8 tensors are."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _sometimes(p: float, images: torch.Tensor, changed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``changed`` applied to each image with probability p, drawn per image; the others stay. The draw
    is on the CPU and only the chosen images are changed (no device sync, no work thrown away)."""
    chosen = host_to(torch.nonzero(torch.rand(len(images)) < p)[:, 0], images.device)
    if len(chosen) == 0:
        return images
    return images.index_copy(0, chosen, changed(images.index_select(0, chosen)))


def _per_group(transform: Callable, images: torch.Tensor) -> torch.Tensor:
    """A v2 transform on each of COLOR_GROUPS groups of the batch: its own draw of parameters per group."""
    return torch.cat([transform(group) for group in images.chunk(COLOR_GROUPS)])


class BatchCrop:
    """uint8 [B, C, H, W] -> uint8 [B, C, size, size]: ``train_transform``'s random resized crop and
    horizontal flip, per image, on the device."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), hflip: bool = True):
        self.size, self.scale, self.hflip = size, tuple(scale), hflip

    def crops(self, images: torch.Tensor, size: int, scale: Sequence[float]) -> torch.Tensor:
        """float [B, C, H, W] -> float [B, C, size, size]."""
        n, height, width = len(images), *images.shape[-2:]
        flips = torch.rand(n) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        return resized_crops(images, crop_boxes(n, height, width, scale), flips, size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return _to_uint8(self.crops(_to_unit(images), self.size, self.scale))


class BatchMultiCrop(BatchCrop):
    """uint8 [B, C, H, W] -> ``MultiCrop``'s views as uint8 batches ``[global_1 [B, C, G, G], global_2,
    local_1 [B, C, L, L], ...]``: its crops, flips, colour jitter, greyscale, blur and solarization."""

    def __init__(self, multicrop: MultiCrop):
        super().__init__(multicrop.sizes[0], multicrop.scales[0], hflip=True)
        self.mc = multicrop
        self.jitter = v2.ColorJitter(*multicrop.color_jitter)
        self.blur = v2.GaussianBlur(multicrop.blur_kernel, sigma=multicrop.blur_sigma)

    def colour(self, views: torch.Tensor, blur_p: float, solarize_p: float) -> torch.Tensor:
        """float [B, C, S, S] views -> the same, in DINO's order: jitter (p 0.8), greyscale (p 0.2), blur, solarize."""
        views = _sometimes(0.8, views, lambda x: _per_group(self.jitter, x))
        views = _sometimes(0.2, views, lambda x: v2.functional.rgb_to_grayscale(x, num_output_channels=3))
        views = _sometimes(blur_p, views, lambda x: _per_group(self.blur, x))
        return _sometimes(solarize_p, views, lambda x: v2.functional.solarize(x, SOLARIZE_THRESHOLD / 255))

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        unit, (global_size, local_size), (global_scale, local_scale) = _to_unit(images), self.mc.sizes, self.mc.scales
        blur_p, n = self.mc.blur_p, self.mc.local_crops_number
        views = [self.colour(self.crops(unit, global_size, global_scale), blur_p[0], 0.0),
                 self.colour(self.crops(unit, global_size, global_scale), blur_p[1], self.mc.solarize_p)]
        if n:  # the local crops together: [n * B, C, L, L]
            local = torch.cat([self.crops(unit, local_size, local_scale) for _ in range(n)])
            views += list(self.colour(local, blur_p[2], 0.0).chunk(n))
        return [_to_uint8(v) for v in views]


def batch_augmentation(transform: Callable, img_size: int, train_cfg) -> BatchCrop:
    """The device form of an objective's per-image ``transform``: multi-crop views for a ``MultiCrop``,
    else the random resized crop and flip of ``train_cfg``."""
    if isinstance(transform, MultiCrop):
        return BatchMultiCrop(transform)
    if train_cfg.randaugment:
        raise ConfigError(f"--randaugment {train_cfg.randaugment} with --data-on-device: timm's RandAugment "
                          "runs on PIL images only; drop one of them")
    return BatchCrop(img_size, train_cfg.crop_scale, train_cfg.hflip)


class InMemoryLoader:
    """The training batches of ``--data-on-device``: ``sampler``'s order (its epoch and start batch), the
    images gathered on the device and augmented a batch at a time under the seed of (seed, epoch,
    batch, rank). Batches: ``{"image": uint8 [B, C, S, S] or a list of views, "label", "index", "skipped"}``."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor], augment: Callable,
                 sampler: EpochSampler, seed: int):
        self.images, self.labels, self.augment, self.sampler, self.seed = images, labels, augment, sampler, seed

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size

    def __iter__(self) -> Iterator[dict]:
        s, pairs = self.sampler, list(self.sampler)
        for b in range(len(self)):
            epoch, _ = pairs[b * s.batch_size]
            index = torch.tensor([i for _, i in pairs[b * s.batch_size:(b + 1) * s.batch_size]])
            on_device = host_to(index, self.images.device)
            with torch.random.fork_rng(devices=[]):  # the draws are on the CPU generator; global state untouched
                torch.default_generator.manual_seed(_seed_for(self.seed, epoch, (s.start_batch + b) * s.world_size + s.rank))
                images = self.augment(self.images[on_device])
            batch = {"image": images, "index": on_device, "skipped": 0}
            if self.labels is not None:
                batch["label"] = self.labels[on_device]
            yield batch
