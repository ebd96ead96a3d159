"""A batch on the training device, before the forward: uint8 images become float32 and are
normalised there, and training batches get timm's RandomErasing, as timm's ``PrefetchLoader`` does.

Loaders send uint8 images (a quarter of the bytes of float32 through workers, pinned memory and
the host-to-device copy); the values equal the ``ToDtype(scale=True)`` + ``Normalize`` of the
per-image transforms to float rounding.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from timm.data.random_erasing import RandomErasing

from .transforms import MEAN, STD

Images = Union[torch.Tensor, list]  # [B, C, H, W], or a list of them (multi-crop views)


def normalize(images: Images, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Images:
    """uint8 images [B, C, H, W] (0..255), or a list of them -> float32 ``(x / 255 - mean) / std``,
    computed as timm's prefetcher does, ``(x - 255 mean) / (255 std)``: one pass over the batch fewer
    than torchvision's ToDtype then Normalize, whose values it gives to float rounding. Float images
    pass unchanged: they are normalised already (the benchmarks' synthetic batches)."""
    if isinstance(images, list):
        return [normalize(x, mean, std) for x in images]
    if images.dtype != torch.uint8:
        return images
    m = torch.as_tensor([255 * v for v in mean], dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor([255 * v for v in std], dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.to(torch.float32).sub_(m).div_(s)


class DeviceBatch:
    """batch -> the batch with its images normalised (and erased, with ``random_erasing`` > 0: timm's
    pixel-mode RandomErasing of one box per image with probability p, drawn from the process's own
    random numbers, which every process seeds with seed + rank and a resume restores)."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD, random_erasing: float = 0.0):
        self.mean, self.std, self.random_erasing = tuple(mean), tuple(std), random_erasing

    def __call__(self, batch: dict) -> dict:
        if "image" not in batch:  # every image of the batch was unreadable (--skip-bad-images)
            return batch
        images = normalize(batch["image"], self.mean, self.std)
        if self.random_erasing and isinstance(images, torch.Tensor):
            images = RandomErasing(self.random_erasing, mode="pixel", max_count=1, device=images.device)(images)
        return {**batch, "image": images}
