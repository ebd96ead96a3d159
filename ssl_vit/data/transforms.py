"""Image augmentations (torchvision v2): the training crop, the evaluation resize.

Each takes ``uint8``: False (the default) ends in a normalised float tensor; True ends in the uint8
tensor before it, for loaders whose batches are converted and normalised on the training device
(``ssl_vit.data.device``, which gives the same values)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2

from ..errors import ConfigError

MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)


def normalization(data: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a checkpoint's images were normalised with: its recorded data mean/std (``ckpt.pt``'s
    ``data``), else MEAN/STD."""
    return tuple(data.get("mean") or MEAN), tuple(data.get("std") or STD)


def to_normalized_tensor(mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> v2.Compose:
    """PIL image -> float tensor [C, H, W], normalised with (mean, std)."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's RandAugment posterize, keeping 0 bits as Pillow before 11 did (a black image, as in DeiT's
    runs): newer Pillow refuses 0 bits, which ``PosterizeIncreasing`` asks for at magnitude 10, and
    ``rand-m9-mstd0.5-inc1`` stopped about one image in 500 with "bits must be between ... 1 and 8"."""
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)


def to_uint8(img) -> torch.Tensor:
    """PIL image (or a tensor, unchanged) -> uint8 tensor [C, H, W]: ``v2.ToImage``'s values, without
    v2's dispatch (a third of the cost of decoding a 32 px image)."""
    return img if isinstance(img, torch.Tensor) else v2.functional.pil_to_tensor(img)


def to_tensor(mean: Sequence[float] = MEAN, std: Sequence[float] = STD, uint8: bool = False) -> Callable:
    """PIL image -> uint8 tensor [C, H, W] (``uint8``), else the normalised float tensor."""
    return to_uint8 if uint8 else to_normalized_tensor(mean, std)


class CropAndFlip:
    """torchvision v2's ``RandomResizedCrop`` (bicubic, antialiased) then ``RandomHorizontalFlip``, with
    their very random draws (``make_params``, then ``torch.rand(1) < 0.5``) and kernels, called
    directly: v2's per-transform dispatch (flattening, input checks) costs about 0.1 ms per image per
    transform, as much as decoding a small image."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), hflip: bool = True):
        self.crop = v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC,
                                         antialias=True)
        self.hflip = hflip

    def __call__(self, img):
        box = self.crop.make_params([img])
        img = v2.functional.resized_crop(img, **box, size=self.crop.size, interpolation=self.crop.interpolation,
                                         antialias=True)
        if self.hflip and torch.rand(1) < 0.5:
            img = v2.functional.horizontal_flip(img)
        return img

    def __repr__(self) -> str:
        return f"CropAndFlip({self.crop!r}, hflip={self.hflip})"


def train_transform(
    img_size: int,
    scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    randaugment: Optional[str] = None,
    random_erasing: float = 0.0,
    uint8: bool = False,
) -> v2.Compose:
    """Inception crop (random resized crop) and horizontal flip, the ViT paper's augmentation;
    optionally timm's RandAugment (``randaugment`` spec such as "rand-m9-mstd0.5-inc1") and, on the
    normalised tensor, timm's RandomErasing of one box with per-pixel normal noise, with probability
    ``random_erasing`` (MAE's and DeiT's fine-tuning: 0.25). ``uint8``: stop at the uint8 tensor; the
    device then normalises and erases (``ssl_vit.data.device.DeviceBatch``), as timm's PrefetchLoader."""
    steps = [CropAndFlip(img_size, scale, hflip)]
    if randaugment:
        augment = rand_augment_transform(randaugment, {"translate_const": int(img_size * 0.45),
                                                       "img_mean": tuple(round(255 * m) for m in mean)})
        for op in augment.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
        steps.append(augment)
    steps.append(to_tensor(mean, std, uint8))
    if random_erasing and not uint8:
        steps.append(RandomErasing(random_erasing, mode="pixel", max_count=1, device="cpu"))
    return v2.Compose(steps)


CROP_FRACTION = 0.875  # timm's and DINO's evaluation crop: resize to size / 0.875, centre-crop size
CROP_FROM_SIZE = 224  # below this input size the image is resized to the exact size (nothing cropped away)


def eval_crop_fraction(img_size: int, crop_fraction: Optional[float] = None) -> float:
    """The crop fraction an evaluation at ``img_size`` uses: the one given, else 0.875 from 224 px
    on (DINO, timm) and 1 (an exact-size resize) for smaller images."""
    if crop_fraction is not None:
        if not 0.0 < crop_fraction <= 1.0:
            raise ConfigError(f"--crop-fraction {crop_fraction}: use a value in (0, 1]")
        return crop_fraction
    return CROP_FRACTION if img_size >= CROP_FROM_SIZE else 1.0


def eval_transform(img_size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                   crop_fraction: Optional[float] = None, uint8: bool = False) -> Callable:
    """timm's evaluation transform: resize the short side to img_size / crop fraction (bicubic),
    centre-crop img_size, normalise (``uint8``: stop at the uint8 tensor, timm's prefetcher form);
    the crop fraction as ``eval_crop_fraction`` resolves it."""
    return create_transform(img_size, is_training=False, interpolation="bicubic",
                            crop_pct=eval_crop_fraction(img_size, crop_fraction), mean=mean, std=std,
                            use_prefetcher=uint8)


def denormalize(images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """Invert the normalisation: [B, C, H, W] normalised -> pixels in 0..1."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * s + m
