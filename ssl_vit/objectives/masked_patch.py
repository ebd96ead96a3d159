"""Masked patch prediction, the self-supervised objective of the ViT paper (section 4.6, B.1.2).

Half of each image's patches are corrupted (BERT's recipe): of those, 80% are replaced by a
learnable [mask] embedding, 10% by the embedding of a random patch of another image in the batch,
10% are left unchanged. From each corrupted patch's output token a head predicts the patch's
mean colour, each channel quantised to 3 bits: one 512-way class ``r * 64 + g * 8 + b``. The
paper's alternatives are selectable: the patch downsized to 4x4 with a 3-bit colour per cell
(16 parallel 512-way predictions), and L2 regression of the full patch.

Corruption happens on patch embeddings, before position embeddings. A hybrid's convolution stem
sees neighbouring pixels, so for hybrids the three cases first happen in pixel space before the
stem: the patch is blanked (0, the data mean after normalisation), replaced by another patch's
pixels, or kept; then the stem's tokens of the blanked patches are replaced by the [mask]
embedding, as for a ViT (``--hybrid-mask blank`` stops there, as ssl_vit did before). Targets
always come from the un-normalised pixels (0..1) of the augmented image.

The order of a step: ``corrupt`` -> the Transformer -> ``head`` on corrupted tokens -> ``loss``
against ``targets``, computed on corrupted patches only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..data import denormalize
from ..errors import ConfigError
from ..masking import random_masking
from .base import DataInfo, Objective

TARGETS = ("color3bit", "color3bit_4x4", "pixels_l2")
HYBRID_MASKS = ("embedding", "blank")
COLOR_BITS = 3
LEVELS = 2 ** COLOR_BITS  # 8 levels per channel
NUM_COLORS = LEVELS ** 3  # 512 classes
CELLS = 4  # the 4x4 target: each patch downsized to CELLS x CELLS
MIN_TOKENS = 4  # fewer patches per image leave nothing sensible to corrupt

# What happened to each patch (the values of ``Corruption.case``).
UNTOUCHED, MASK, RANDOM, KEEP = 0, 1, 2, 3


@dataclass
class MaskedPatchConfig:
    corruption_rate: float = 0.5  # fraction of each image's patches that are corrupted
    mask_fraction: float = 0.8  # of the corrupted: replaced by the [mask] embedding (hybrid: blanked first)
    random_fraction: float = 0.1  # of the corrupted: replaced by a random patch of another image
    unchanged_fraction: float = 0.1  # of the corrupted: left as they are (but still predicted)
    target: str = "color3bit"  # color3bit | color3bit_4x4 | pixels_l2
    # Hybrids' [mask] patches, blanked before the stem: "embedding" then replaces their tokens by the
    # [mask] embedding (the paper's recipe); "blank" keeps the stem's tokens of the blank pixels (checkpoints
    # written before this setting existed: see checkpoint.ADDED_OBJECTIVE_SETTINGS).
    hybrid_mask: str = "embedding"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ConfigError(f"--target {self.target!r}: use one of {', '.join(TARGETS)}")
        if self.hybrid_mask not in HYBRID_MASKS:
            raise ConfigError(f"--hybrid-mask {self.hybrid_mask!r}: use one of {', '.join(HYBRID_MASKS)}")
        if not 0.0 < self.corruption_rate < 1.0:
            raise ConfigError(f"--corruption-rate {self.corruption_rate} must lie strictly between 0 and 1")
        split = (self.mask_fraction, self.random_fraction, self.unchanged_fraction)
        if min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
            raise ConfigError(
                f"--mask-fraction {split[0]}, --random-fraction {split[1]} and --unchanged-fraction {split[2]} "
                "must be non-negative and add up to 1 (the paper: 0.8, 0.1, 0.1)"
            )


class Corruption(NamedTuple):
    """Which patches of each image are corrupted, and how.

    masked: [B, M] indices of the corrupted patches (the same M = round(rate * N) for every image)
    case:   [B, N] long, one of UNTOUCHED, MASK, RANDOM, KEEP
    source: [B, N] flat index into the batch's B * N patches, used where case == RANDOM
    """

    masked: torch.Tensor
    case: torch.Tensor
    source: torch.Tensor


def quantize(rgb: torch.Tensor) -> torch.Tensor:
    """Colours in 0..1 [..., 3] -> 3-bit colour classes [...]: r * 64 + g * 8 + b, each in 0..7."""
    q = (rgb.clamp(0, 1) * LEVELS).long().clamp(max=LEVELS - 1)
    return (q[..., 0] * LEVELS + q[..., 1]) * LEVELS + q[..., 2]


def class_colors(classes: torch.Tensor) -> torch.Tensor:
    """3-bit colour classes [...] -> the centres of their colour bins in 0..1 [..., 3]."""
    q = torch.stack([classes // (LEVELS * LEVELS), classes // LEVELS % LEVELS, classes % LEVELS], dim=-1)
    return (q.float() + 0.5) / LEVELS


def mean_color_class(patches: torch.Tensor) -> torch.Tensor:
    """Patches in 0..1 [..., p*p*3] (pixels (p, p, C) inside, as ``patchify``) -> [...] classes."""
    return quantize(patches.unflatten(-1, (-1, 3)).mean(-2))


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of each image: x [B, N, ...], index [B, M] -> [B, M, ...]."""
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), index]


class MaskedPatchPrediction(Objective):
    Config = MaskedPatchConfig
    needs_labels = False
    # Learning rate: Adam's square-root rule anchored at the measured 1e-3 for batch 64 (the paper's
    # 2e-4 at batch 4096 belongs to a 1M-step run; see recipes/masked_patch.py and docs/results/).
    recipe_defaults = dict(
        model="vit_tiny", patch_size=4, img_size=32,
        global_pool="avg",  # the class token's output is never trained by this objective
        steps=200, batch_size=64,
        optimizer="adamw", lr=1e-3, lr_ref_batch=64, lr_scaling="sqrt", betas=(0.9, 0.999), weight_decay=0.1,
        clip_grad=1.0,
        crop_scale=(0.35, 1.0),  # a 32 px image has little to spare: milder than ImageNet's 0.08
    )

    def __init__(self, backbone, cfg: MaskedPatchConfig, data: DataInfo):
        super().__init__(backbone, cfg, data)
        p = backbone.pixel_patch_size
        side = data.img_size // p
        if side * side < MIN_TOKENS:
            raise ValueError(
                f"masked patch prediction needs at least {MIN_TOKENS} patches per image, but {backbone.cfg.model} "
                f"at image size {data.img_size} with a total stride of {p} gives a {side}x{side} grid; "
                f"use --img-size {2 * p} or larger (a multiple of {p})"
            )
        # The [mask] embedding replaces patch embeddings (a hybrid's after the stem, unless --hybrid-mask blank).
        self.mask_token = None
        if not (backbone.is_hybrid and cfg.hybrid_mask == "blank"):
            self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))  # 1-D: no weight decay (timm)
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        out = {"color3bit": NUM_COLORS, "color3bit_4x4": CELLS * CELLS * NUM_COLORS, "pixels_l2": p * p * 3}
        self.head = nn.Linear(backbone.embed_dim, out[cfg.target])

    # ----- corruption -----
    def draw(self, batch: int, num_tokens: int, device: torch.device) -> Corruption:
        """Choose the corrupted patches of each image (``random_masking``) and what each becomes."""
        cfg = self.cfg
        masking = random_masking(batch, num_tokens, cfg.corruption_rate, device)
        u = torch.rand(batch, num_tokens, device=device)
        case = torch.full_like(masking.restore, KEEP)
        case[u < cfg.mask_fraction + cfg.random_fraction] = RANDOM
        case[u < cfg.mask_fraction] = MASK
        case[~masking.mask] = UNTOUCHED
        # The random patch comes from another image, so no image sees its own hidden content elsewhere.
        # (A batch of one image has no other: its own is used.)
        offset = torch.randint(1, max(batch, 2), (batch, 1), device=device)
        image = (torch.arange(batch, device=device).unsqueeze(1) + offset) % batch
        source = image * num_tokens + torch.randint(num_tokens, (batch, num_tokens), device=device)
        return Corruption(masking.masked, case, source)

    @staticmethod
    def fill_masked(x: torch.Tensor, corruption: Corruption, fill: torch.Tensor) -> torch.Tensor:
        """x [B, N, X] (embeddings or pixels) -> [B, N, X]: MASK rows become ``fill`` [X], the rest stay."""
        return torch.where(corruption.case.unsqueeze(-1) == MASK, fill.to(x.dtype), x)

    @classmethod
    def apply(cls, x: torch.Tensor, corruption: Corruption, fill: torch.Tensor) -> torch.Tensor:
        """x [B, N, X] (embeddings or pixels) -> [B, N, X]: MASK rows become ``fill`` [X], RANDOM
        rows a copy of the source row, KEEP and UNTOUCHED rows stay."""
        out = cls.fill_masked(x, corruption, fill)
        return torch.where(corruption.case.unsqueeze(-1) == RANDOM, x.flatten(0, 1)[corruption.source], out)

    def corrupt(self, images: torch.Tensor) -> tuple[torch.Tensor, Corruption]:
        """images [B, C, H, W] (normalised) -> (patch embeddings [B, N, D] after corruption, what was done).

        ViT: on embeddings, [mask] = the learnable embedding. Hybrid: in pixel space before the
        stem, [mask] = blank (0), so a hidden patch never reaches the convolutions; then the stem's
        tokens of the blanked patches become the learnable embedding (unless --hybrid-mask blank).
        """
        bb = self.backbone
        grid = bb.grid_size(images)
        corruption = self.draw(images.shape[0], grid[0] * grid[1], images.device)
        if not bb.is_hybrid:
            return self.apply(bb.embed(images), corruption, self.mask_token), corruption
        patches = bb.patchify(images)
        blank = patches.new_zeros(patches.shape[-1])
        tokens = bb.embed(bb.unpatchify(self.apply(patches, corruption, blank), grid))
        if self.mask_token is not None:
            tokens = self.fill_masked(tokens, corruption, self.mask_token)
        return tokens, corruption

    # ----- targets and loss -----
    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] (normalised) -> the target of every patch, from pixels in 0..1:
        color3bit [B, N] classes; color3bit_4x4 [B, N, 16] classes (cells in raster order);
        pixels_l2 [B, N, p*p*3] pixels (p, p, C) as ``patchify``."""
        pixels = denormalize(images.float(), self.data.mean, self.data.std).clamp(0, 1)
        if self.cfg.target == "color3bit_4x4":
            h, w = self.backbone.grid_size(images)
            cells = F.adaptive_avg_pool2d(pixels, (h * CELLS, w * CELLS))  # area average per cell
            return quantize(rearrange(cells, "b c (h i) (w j) -> b (h w) (i j) c", i=CELLS, j=CELLS))
        patches = self.backbone.patchify(pixels)
        return patches if self.cfg.target == "pixels_l2" else mean_color_class(patches)

    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """Output tokens [B, M, D] -> logits [B, M, 512] or [B, M, 16, 512], or pixels [B, M, p*p*3]."""
        out = self.head(tokens)
        return out.unflatten(-1, (CELLS * CELLS, NUM_COLORS)) if self.cfg.target == "color3bit_4x4" else out

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """predictions for the corrupted patches [B, M, ...], targets of all patches [B, N, ...],
        masked [B, M] -> scalar: cross-entropy (colour targets) or mean squared error (pixels_l2)."""
        targets = take(targets, masked)
        if self.cfg.target == "pixels_l2":
            return F.mse_loss(predictions.float(), targets)
        return F.cross_entropy(predictions.flatten(0, -2).float(), targets.flatten())

    def color_classes(self, predictions: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(predicted, true) colour classes of the corrupted patches (pixels_l2: of their mean colours)."""
        if self.cfg.target == "pixels_l2":
            return mean_color_class(predictions), mean_color_class(targets)
        return predictions.argmax(-1), targets

    def forward(self, batch):
        images = batch["image"]
        tokens, corruption = self.corrupt(images)
        features = self.backbone.patch_tokens(self.backbone.encode(tokens, self.backbone.grid_size(images)))
        predictions = self.predict(take(features, corruption.masked))
        targets = self.targets(images)
        loss = self.loss(predictions, targets, corruption.masked)
        with torch.no_grad():
            predicted, true = self.color_classes(predictions.float(), take(targets, corruption.masked))
            accuracy = (predicted == true).float().mean()
            # The trivial answer: always the batch's most frequent colour class.
            # Class counts by index_add_: bincount reads the largest class back to the host on CUDA.
            ones = torch.ones(true.numel(), device=true.device)
            baseline = torch.zeros(NUM_COLORS, device=true.device).index_add_(0, true.flatten(), ones).max() / true.numel()
        return loss, {"color_accuracy": accuracy, "baseline_accuracy": baseline.float()}

    def headline(self, record, results):
        if "color_accuracy" not in record:
            return None
        return (f"masked patch: colour accuracy {record['color_accuracy']:.3f} on the corrupted patches against "
                f"{record['baseline_accuracy']:.3f} for guessing each batch's most frequent colour "
                f"(training batches at step {record['step']})")
