"""DINO's multi-crop augmentation (Caron et al. 2021; ``DataAugmentationDINO`` in facebookresearch/dino).

Each image gives 2 global crops and N local crops, every one flipped, colour-jittered, maybe
greyscaled and blurred; only the second global crop may be solarized:

=============  ==========  ========  ==========
crop           scale       blur p    solarize p
=============  ==========  ========  ==========
global 1       0.4 - 1     1.0       0
global 2       0.4 - 1     0.1       0.2
local 1..N     0.05 - 0.4  0.5       0
=============  ==========  ========  ==========

Sizes default to the paper's 224 / 96 px. For 32 px data (CIFAR) use ``SMALL_IMAGE_SIZES``: the
global crop keeps the full 32 px and the local crop is 16 px, the paper's ratio 96/224 (13.7 px)
rounded up to the next multiple of the usual 4 px patch, so a local crop is a 4x4 token grid.

MSN's views (``make_transforms`` in facebookresearch/msn) are the same pipeline with other values:
the target and the random anchor view are the two global crops (scale 0.3 - 1), the focal views
the local ones (0.05 - 0.3); colour jitter of strength 0.5 (saturation 0.4), blur p = 0.5 on every
view, no solarization.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from .transforms import MEAN, STD, CropAndFlip, to_tensor

PAPER_SIZES = (224, 96)  # (global, local) crop sizes in pixels
SMALL_IMAGE_SIZES = (32, 16)  # for 32 px images, see the module docstring
GLOBAL_SCALE = (0.4, 1.0)
LOCAL_SCALE = (0.05, 0.4)
BLUR_SIGMA_AT_224 = (0.1, 2.0)  # the paper's blur radius in pixels of a 224 px global crop
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (applied with p = 0.8)
BLUR_P = (1.0, 0.1, 0.5)  # global 1, global 2, local
SOLARIZE_P = 0.2  # second global crop only
SOLARIZE_THRESHOLD = 128  # PIL's ImageOps.solarize default, as in the official code


class MultiCrop:
    """PIL image -> list of 2 + ``local_crops_number`` normalised tensors (``uint8``: uint8 tensors,
    normalised on the device): ``[global_1, global_2, local_1, ...]``, globals ``[3, G, G]``, locals ``[3, L, L]``.

    The loader's collate turns the list per example into a list of batches ``[B, 3, size, size]``.

    The blur's sigma is the paper's (0.1-2 px at a 224 px global crop) scaled by
    ``global_size / 224``: the same blur relative to the image as in the paper, so a 32 px image
    is blurred as a 224 px photo would be before being shrunk to 32 px (barely at all, in line
    with SimCLR's finding that blur does not help on CIFAR).
    """

    def __init__(
        self,
        global_size: int = PAPER_SIZES[0],
        local_size: int = PAPER_SIZES[1],
        local_crops_number: int = 8,
        global_scale: Sequence[float] = GLOBAL_SCALE,
        local_scale: Sequence[float] = LOCAL_SCALE,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        color_jitter: Sequence[float] = COLOR_JITTER,
        blur_p: Sequence[float] = BLUR_P,
        solarize_p: float = SOLARIZE_P,
        uint8: bool = False,
    ):
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number={local_crops_number}: use 0 or more local crops")
        for name, scale in (("global", global_scale), ("local", local_scale)):
            if not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise ValueError(f"{name} crop scale {tuple(scale)} must satisfy 0 < min <= max <= 1")
        self.local_crops_number = local_crops_number
        sigma = tuple(s * global_size / PAPER_SIZES[0] for s in BLUR_SIGMA_AT_224)
        kernel = 2 * math.ceil(3 * sigma[1]) + 1  # covers +-3 sigma of the widest blur
        # the settings, for the same augmentation on whole batches (ssl_vit.data.in_memory.BatchMultiCrop)
        self.sizes, self.scales = (global_size, local_size), (tuple(global_scale), tuple(local_scale))
        self.color_jitter, self.blur_p, self.solarize_p = tuple(color_jitter), tuple(blur_p), solarize_p
        self.blur_kernel, self.blur_sigma = kernel, sigma

        def blur(p: float) -> v2.RandomApply:
            return v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=p)

        colour = v2.Compose([
            v2.RandomApply([v2.ColorJitter(*color_jitter)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.ToImage(),  # PIL above (faster there), uint8 tensor below (blur is faster there)
        ])
        normalize = to_tensor(mean, std, uint8)
        # each view: crop and flip (DINO's flip_and_color_jitter begins with the flip), colour, blur, ...
        self.global_1 = v2.Compose([CropAndFlip(global_size, global_scale), colour, blur(blur_p[0]), normalize])
        self.global_2 = v2.Compose([CropAndFlip(global_size, global_scale), colour, blur(blur_p[1]),
                                    v2.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize_p), normalize])
        self.local = v2.Compose([CropAndFlip(local_size, local_scale), colour, blur(blur_p[2]), normalize])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        local = [self.local(image) for _ in range(self.local_crops_number)]
        return [self.global_1(image), self.global_2(image)] + local
