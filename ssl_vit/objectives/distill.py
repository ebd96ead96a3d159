"""DeiT's distillation through attention (Touvron et al. 2021, facebookresearch/deit).

The student is the shared backbone with a distillation token after its class token
(``--distillation-token``). Two heads read the two tokens' outputs: the class head learns the true
labels, with the supervised objective's cross-entropy, label smoothing and Mixup/CutMix; the
distillation head learns the teacher's predictions on the same (mixed) images (DeiT's
``losses.py`` ``DistillationLoss``):

- ``hard`` (the paper's best): cross-entropy to the teacher's argmax;
- ``soft``: KL(softmax(teacher / tau) || softmax(student / tau)) x tau^2, summed over the batch and
  classes and divided by the number of logits;
- ``none``: the class head alone, as DeiT's ``--distillation-type none`` (the distillation head keeps
  its initialisation and no teacher is loaded).

loss = (1 - alpha) x class loss + alpha x distillation loss (alpha 0.5: hard distillation's 1/2 + 1/2).
At test time the prediction is the mean of the two heads' logits (``DistilledVisionTransformer`` in
eval mode), and the backbone's representation the mean of the two tokens. The teacher
(``ssl_vit.objectives.frozen_teacher``) is not saved in ``ckpt.pt``; its spec is in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import DataInfo
from .supervised import Supervised, SupervisedConfig, class_head
from .frozen_teacher import FrozenTeacher, load_teacher

DISTILLATION_TYPES = ("hard", "soft", "none")


@dataclass
class DistillConfig(SupervisedConfig):
    teacher: Optional[str] = None  # a ckpt.pt with a class head, or a timm classifier name (timm:NAME: download)
    teacher_weights: Optional[str] = None  # the timm teacher's weights file (.safetensors or .pth, timm key names)
    teacher_img_size: Optional[int] = None  # the teacher's input size (None: its own)
    distillation_type: str = "hard"  # hard | soft | none
    distillation_alpha: float = 0.5  # weight of the distillation loss; the class loss gets 1 - alpha
    distillation_tau: float = 1.0  # temperature of soft distillation

    def __post_init__(self):
        super().__post_init__()
        if self.distillation_type not in DISTILLATION_TYPES:
            raise ConfigError(f"--distillation-type {self.distillation_type!r}: use one of {', '.join(DISTILLATION_TYPES)}")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ConfigError(f"--distillation-alpha {self.distillation_alpha}: use a value in [0, 1]")
        if self.distillation_tau <= 0:
            raise ConfigError(f"--distillation-tau {self.distillation_tau}: must be > 0")
        if self.teacher_img_size is not None and self.teacher_img_size < 1:
            raise ConfigError(f"--teacher-img-size {self.teacher_img_size}: must be >= 1 (or unset: the teacher's own)")
        if self.distillation_type != "none" and not self.teacher:
            raise ConfigError(f"--distillation-type {self.distillation_type} needs --teacher: a ckpt.pt of "
                              "recipes/supervised.py, a timm classifier name with --teacher-weights FILE, or timm:NAME")


class Distill(Supervised):
    Config = DistillConfig
    # DeiT's main.py at laptop size: AdamW, weight decay 0.05, no clipping, label smoothing 0.1, Mixup 0.8 /
    # CutMix 1.0, RandAugment m9, random erasing 0.25, drop-path 0.1, min lr 1e-5 (docs/deviations.md).
    recipe_defaults = dict(
        model="vit_tiny", patch_size=4, img_size=32, distillation_token=True,
        steps=200, batch_size=64,
        optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, clip_grad=0.0, min_lr=1e-5,
        crop_scale=(0.35, 1.0), randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25, drop_path_rate=0.1,
        label_smoothing=0.1, mixup=0.8, cutmix=1.0,
    )

    def __init__(self, backbone, cfg: DistillConfig, data: DataInfo):
        super().__init__(backbone, cfg, data)  # the class head and Mixup
        if not backbone.has_distillation_token:
            raise ConfigError("the distill objective trains a distillation token and the backbone has none: pass "
                              "--distillation-token (presets vit_tiny, vit_small, vit_base) or a distilled timm ViT")
        self.head_dist = class_head(backbone.embed_dim, cfg, data.num_classes)
        # Held outside the module tree, so the teacher is in no state_dict (ckpt.pt, state/), no optimizer, no
        # DDP and no train(): _apply still moves it with the student (.to(device) and friends).
        self._teacher: list[FrozenTeacher] = []

    def prepare_training(self) -> None:
        if self.cfg.distillation_type != "none":
            self._teacher = [load_teacher(self.cfg.teacher, self.cfg.teacher_weights, self.data,
                                          self.cfg.teacher_img_size)]

    @property
    def teacher(self) -> Optional[FrozenTeacher]:
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, recurse=True):
        # Hand-written: nn.Module has no public way to own a module outside state_dict() and parameters();
        # every device and dtype move (.to, .cuda, .float) goes through _apply.
        for teacher in self._teacher:
            teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    # ----- the two heads -----
    def head_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, H, W] -> (class head logits [B, K], distillation head logits [B, K])."""
        features = self.backbone.forward_features(images)  # [B, 2 + N, D]
        return (self.head(self.backbone.class_token(features)),
                self.head_dist(self.backbone.distillation_token(features)))

    @staticmethod
    def combined(cls: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """The prediction [B, K] from both heads' logits: their mean (DeiT at test time)."""
        return (cls + dist) / 2

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.combined(*self.head_logits(images))

    # ----- the loss -----
    def distillation_loss(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The distillation head's loss against the teacher's logits, both [B, K] (DeiT's losses.py)."""
        if self.cfg.distillation_type == "hard":
            return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        tau = self.cfg.distillation_tau
        kl = F.kl_div(F.log_softmax(dist_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                      reduction="sum", log_target=True)
        return kl * (tau * tau) / dist_logits.numel()

    def forward(self, batch):
        labels = batch["label"]
        images, targets = self.mixed(batch["image"], labels)
        cls_logits, dist_logits = self.head_logits(images)
        class_loss = self.class_loss(cls_logits, targets)
        metrics = {"accuracy": (self.combined(cls_logits, dist_logits).argmax(-1) == labels).float().mean(),
                   "class_loss": class_loss}
        if self.cfg.distillation_type == "none":
            return class_loss, {k: v.detach() for k, v in metrics.items()}
        assert self.teacher is not None, "prepare_training() loads the teacher before training"
        teacher_logits = self.teacher(images)  # the mixed images, as DeiT's teacher sees them
        distill = self.distillation_loss(dist_logits.float(), teacher_logits)
        alpha = self.cfg.distillation_alpha
        metrics.update(distillation_loss=distill,
                       teacher_agreement=(dist_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())
        return (1 - alpha) * class_loss + alpha * distill, {k: v.detach() for k, v in metrics.items()}

    # ----- test metrics -----
    @torch.no_grad()
    def evaluate_batch(self, batch):
        labels = batch["label"]
        cls, dist = self.head_logits(batch["image"])
        sums = {"test_accuracy": self.combined(cls, dist).argmax(-1) == labels,
                "test_accuracy_class_head": cls.argmax(-1) == labels,
                "test_accuracy_distillation_head": dist.argmax(-1) == labels}
        if self.teacher is not None:
            sums["teacher_test_accuracy"] = self.teacher(batch["image"]).argmax(-1) == labels
        return {**{k: v.sum() for k, v in sums.items()}, "count": torch.tensor(len(labels), device=labels.device)}

    def test_metrics(self, sums):
        count = sums["count"].clamp(min=1).float()
        return {k: (v.float() / count).item() for k, v in sums.items() if k != "count"}

    def summary(self):
        return [self.teacher.describe()] if self.teacher is not None else []

    def headline(self, record, results):
        if "test_accuracy" not in results:
            return None
        k = self.data.num_classes
        teacher = (f", teacher {results['teacher_test_accuracy']:.3f}" if "teacher_test_accuracy" in results else "")
        return (f"distill: test accuracy {results['test_accuracy']:.3f} (mean of both heads; class head "
                f"{results['test_accuracy_class_head']:.3f}, distillation head "
                f"{results['test_accuracy_distillation_head']:.3f}{teacher}) against {1 / k:.3f} for guessing "
                f"among {k} classes")
