"""Supervised pretraining (the ViT paper's main recipe): cross-entropy through a class head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from ..data import DataError
from ..errors import ConfigError
from .base import DataInfo, Objective


@dataclass
class SupervisedConfig:
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Mixup alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    head_hidden: int = 0  # >0: the paper's pre-logits layer (Linear + tanh) of this width
    zero_head: bool = False  # zero-initialised last layer (the paper's fine-tuning head)
    head_init_std: float = 0.0  # > 0: last layer's weights from a truncated normal of this std, bias 0 (MAE: 2e-5)

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing {self.label_smoothing}: use a value in [0, 1)")
        for name in ("mixup", "cutmix", "head_hidden", "head_init_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0 (0: off)")
        if self.zero_head and self.head_init_std > 0:
            raise ConfigError(f"--zero-head and --head-init-std {self.head_init_std}: choose one head initialisation")


def class_head(width: int, cfg: SupervisedConfig, num_classes: int) -> nn.Sequential:
    """[B, width] -> [B, num_classes]: a linear layer (after the paper's pre-logits layer with ``head_hidden``),
    initialised as ``cfg`` says (timm's default, zero, or MAE's tiny truncated normal)."""
    layers: list[nn.Module] = []
    if cfg.head_hidden:
        layers += [nn.Linear(width, cfg.head_hidden), nn.Tanh()]
        width = cfg.head_hidden
    layers.append(nn.Linear(width, num_classes))
    last = layers[-1]
    if cfg.head_init_std > 0:  # MAE's fine-tuning head: tiny random weights
        nn.init.trunc_normal_(last.weight, std=cfg.head_init_std)
        nn.init.zeros_(last.bias)
    elif cfg.zero_head:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


class Supervised(Objective):
    Config = SupervisedConfig
    needs_labels = True
    has_test_metric = True
    # Adam(0.9, 0.999), weight decay 0.1, warmup then cosine, clipping at norm 1 (the paper's), at laptop size.
    recipe_defaults = dict(
        model="vit_tiny", patch_size=4, img_size=32,
        steps=200, batch_size=64,
        optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1, clip_grad=1.0,
        crop_scale=(0.35, 1.0),  # a 32 px image has little to spare: milder than ImageNet's 0.08
    )

    def __init__(self, backbone, cfg: SupervisedConfig, data: DataInfo):
        super().__init__(backbone, cfg, data)
        if not data.num_classes:
            raise DataError(f"supervised pretraining needs class labels, and {data.name} has none")
        if data.num_classes < 2:
            raise DataError(f"{data.name} has a single class: supervised training would reach loss 0 and learn "
                             "nothing; use data with at least 2 classes, or a self-supervised recipe")
        self.head = class_head(backbone.embed_dim, cfg, data.num_classes)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                               label_smoothing=cfg.label_smoothing, num_classes=data.num_classes)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    @torch.compiler.disable  # batch-level randomness stays eager under --compile (traced, each draw recompiles)
    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup/CutMix: mixed images [B, C, H, W] and soft targets [B, classes]."""
        return self.mixup(images, labels)

    def mixed(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images and their targets: with Mixup/CutMix the mixed images and soft targets
        [B, classes] (smoothed inside), else the images and the labels [B]."""
        if self.mixup is not None and len(images) % 2 == 0:  # timm's Mixup pairs the batch
            return self.mix(images, labels)
        return images, labels

    def class_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of [B, classes] logits against ``mixed``'s targets (soft, or labels with smoothing)."""
        if targets.ndim == 2:
            return SoftTargetCrossEntropy()(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)

    def forward(self, batch):
        images, targets = self.mixed(batch["image"], batch["label"])
        logits = self.logits(images)
        loss = self.class_loss(logits, targets)
        accuracy = (logits.argmax(-1) == batch["label"]).float().mean()
        return loss, {"accuracy": accuracy.detach()}

    @torch.no_grad()
    def evaluate_batch(self, batch):
        logits = self.logits(batch["image"])
        correct = (logits.argmax(-1) == batch["label"]).sum()
        return {"correct": correct, "count": torch.tensor(len(logits), device=logits.device)}

    def test_metrics(self, sums):
        return {"test_accuracy": (sums["correct"].float() / sums["count"].clamp(min=1)).item()}

    def headline(self, record, results):
        if "test_accuracy" not in results:
            return None
        k = self.data.num_classes
        return f"supervised: test accuracy {results['test_accuracy']:.3f} against {1 / k:.3f} for guessing among {k} classes"
