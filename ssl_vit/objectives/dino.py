"""DINO: self-distillation with no labels (Caron et al. 2021; facebookresearch/dino).

A student (the shared backbone + a projection head) learns to predict, on every crop of an
image, what an EMA teacher outputs on the *other* global crops. In the order a step runs:

1. multi-crop: 2 global + N local crops per image (``ssl_vit.data.MultiCrop``);
2. teacher: the 2 global crops only, through the teacher backbone and head, no gradient;
3. student: all crops (local crops at their own size: the backbone resamples position embeddings);
4. loss: cross-entropy between the teacher's centred, sharpened softmax and the student's softmax,
   averaged over all pairs of different views (``view_pairs``);
5. once per optimizer step, whatever the gradient accumulation (``end_step``): the centre takes an
   EMA of the teacher outputs of the whole step, summed over micro-batches and processes, and the
   teacher an EMA of the student with a momentum on a cosine from 0.996 to 1.

Collapse watch: every step logs the teacher's output entropy (the paper's: per image; ln K =
uniform output, collapse), the entropy of its batch-mean output (0 = every image on the same
prototype, the other collapse; a per-image entropy near 0 alone is a sharp but healthy teacher),
KL(teacher || student), the centre's norm and the loss over ln K; ``summary()`` warns when one of
them sat near 0 or ln K for a sustained stretch (``collapse.CollapseWatch``). The EMA teacher, its
momentum and the weight-decay cosine are ``teacher.TeacherObjective``'s, the head ``heads.DINOHead``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..data import MultiCrop
from ..data.multicrop import SMALL_IMAGE_SIZES
from ..errors import ConfigError
from .base import DataInfo, StepInfo
from .collapse import COLLAPSE_MARGIN, CollapseWatch, near_ln_k, near_zero
from .heads import DINOHead
from .teacher import StepMean, TeacherObjective, batch_views, teacher_backbone, teacher_copy

NUM_GLOBAL_CROPS = 2  # the teacher's views


@dataclass
class DINOConfig:
    out_dim: int = 65536  # K: outputs of the head's last layer (prototypes)
    hidden_dim: int = 2048  # the head's MLP width
    bottleneck_dim: int = 256  # the head's output before L2 normalisation and the last layer
    norm_last_layer: bool = True  # fix the last layer's weight-norm scale at 1 (more stable)
    freeze_last_layer_epochs: float = 1.0  # the last layer is not updated during these first epochs
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04  # linear warm-up from this to --teacher-temp...
    warmup_teacher_temp_epochs: float = 0.0  # ...over these whole epochs, per epoch (the paper: 0.04 -> 0.07 over 30)
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # teacher EMA momentum at step 0, cosine to 1 at the last step
    weight_decay_end: float = 0.4  # weight decay follows a cosine from --weight-decay to this
    local_crops_number: int = 8
    global_crop_size: Optional[int] = None  # None: --img-size
    local_crop_size: int = 96
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    # Position embeddings of crops on another grid (the local crops): "dino" as interpolate_pos_encoding
    # (bicubic, no antialiasing), "timm" as resample_abs_pos_embed (antialiased; runs written before
    # this setting existed: see checkpoint.ADDED_OBJECTIVE_SETTINGS).
    pos_interpolation: str = "dino"

    def __post_init__(self):
        if self.pos_interpolation not in ("dino", "timm"):
            raise ConfigError(f"--pos-interpolation {self.pos_interpolation!r}: use 'dino' or 'timm'")
        if self.out_dim < 2:
            raise ConfigError(f"--out-dim {self.out_dim}: the head needs at least 2 outputs (the paper: 65536)")
        for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be positive")
        if not float(self.warmup_teacher_temp_epochs).is_integer() or self.warmup_teacher_temp_epochs < 0:
            raise ConfigError(f"--warmup-teacher-temp-epochs {self.warmup_teacher_temp_epochs}: DINO warms the "
                              "teacher temperature up per epoch; give a whole number of epochs (0: no warm-up)")
        for name in ("center_momentum", "momentum_teacher"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must lie in [0, 1]")


def view_pairs(num_teacher_views: int, num_student_views: int) -> list[tuple[int, int]]:
    """(teacher view, student view) index pairs of *different* views. Views are numbered the same
    way for both (the global crops first), so a global crop is never compared with itself."""
    return [(t, s) for t in range(num_teacher_views) for s in range(num_student_views) if s != t]


def multi_crop_forward(backbone: Backbone, head: DINOHead, crops: list[torch.Tensor]) -> torch.Tensor:
    """V crops [B, 3, h_v, w_v] -> logits [V, B, K]; one backbone pass per run of equal-sized
    crops (DINO's ``MultiCropWrapper``), then one head pass over all of them."""
    features = [backbone(torch.cat(list(group))) for _, group in groupby(crops, key=lambda c: c.shape[-2:])]
    return head(torch.cat(features)).unflatten(0, (len(crops), -1))


class DINO(TeacherObjective):
    """Student = ``self.backbone`` + ``self.head``; teacher = ``self.teacher`` + ``self.teacher_head``."""

    Config = DINOConfig
    teacher_of = (("backbone", "teacher"), ("head", "teacher_head"))
    # The paper's optimisation (AdamW, lr 5e-4 x batch / 256, cosine to 1e-6, weight decay 0.04 -> 0.4,
    # clipping 3.0, drop-path 0.1) on a CPU-sized model; see recipes/dino.py for the choices.
    recipe_defaults = dict(
        model="vit_tiny", patch_size=4, img_size=SMALL_IMAGE_SIZES[0], local_crop_size=SMALL_IMAGE_SIZES[1],
        depth=6,  # the student sees 4x the tokens of a supervised step, plus the teacher: --depth 12 for full ViT-Ti
        drop_path_rate=0.1,  # the student's; the teacher has none
        steps=50, batch_size=64,  # ~2 epochs of digits
        optimizer="adamw", lr=5e-4, lr_ref_batch=256, min_lr=1e-6, betas=(0.9, 0.999),
        weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, clip_grad_mode="per_param",
        out_dim=4096, momentum_teacher=0.9995,
    )

    def __init__(self, backbone: Backbone, cfg: DINOConfig, data: DataInfo):
        super().__init__(backbone, cfg, data)
        for size in (cfg.global_crop_size or data.img_size, cfg.local_crop_size):
            backbone.check_img_size(size)
        head_kw = dict(in_dim=backbone.embed_dim, out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim,
                       bottleneck_dim=cfg.bottleneck_dim, norm_last_layer=cfg.norm_last_layer)
        self.head = DINOHead(**head_kw)
        # The teacher: the same architecture without drop-path, starting from the student's weights.
        self.teacher = teacher_backbone(backbone)
        self.teacher_head = teacher_copy(self.head, lambda: DINOHead(**head_kw))
        backbone.pos_interpolation = self.teacher.pos_interpolation = cfg.pos_interpolation
        self.register_buffer("center", torch.zeros(cfg.out_dim))
        self.ln_k = math.log(cfg.out_dim)
        self.teacher_temp = self.teacher_temperature(0, 1)
        self._teacher_mean = StepMean()  # [K]: the step's mean teacher logits, for the centre
        self.watch = CollapseWatch(self.collapse_signs)  # of [entropy, batch entropy, KL, loss]

    @classmethod
    def train_transform(cls, train_cfg, cfg: DINOConfig, data: DataInfo, uint8: bool = False) -> MultiCrop:
        """The multi-crop augmentation (it replaces --crop-scale and --hflip); ``uint8`` as ``Objective``'s."""
        return MultiCrop(cfg.global_crop_size or data.img_size, cfg.local_crop_size, cfg.local_crops_number,
                         cfg.global_crop_scale, cfg.local_crop_scale, data.mean, data.std, uint8=uint8)

    def no_weight_decay(self) -> set[str]:
        """DINO's rule (``utils.get_params_groups``): every parameter with more than one dimension
        decays, the position embedding and class token included."""
        return set()

    # ----- schedules (the teacher's momentum: TeacherObjective.teacher_momentum) -----
    def teacher_temperature(self, step: int, steps_per_epoch: int) -> float:
        """DINO's warm-up (``main_dino.py``), per epoch: the first W epochs take
        ``linspace(warmup_teacher_temp, teacher_temp, W)[epoch]``, later ones ``teacher_temp``."""
        epoch, warmup = step // max(steps_per_epoch, 1), int(self.cfg.warmup_teacher_temp_epochs)
        if epoch >= warmup:
            return self.cfg.teacher_temp
        return float(np.linspace(self.cfg.warmup_teacher_temp, self.cfg.teacher_temp, warmup)[epoch])

    # ----- the method, in the order it runs -----
    def dino_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """student_logits [V, B, K], teacher_logits [2, B, K] (views 0 and 1 are the global crops)
        -> (mean over pairs of different views of H(teacher, student), teacher output entropy per
        image, entropy of the teacher's mean output over the batch). In float32 whatever the autocast
        (bf16 would round the loss to 1/16 and the sharpened softmaxes with it)."""
        with torch.autocast(student_logits.device.type, enabled=False):
            teacher_probs = F.softmax((teacher_logits.float() - self.center) / self.teacher_temp, dim=-1)
            student_log_probs = F.log_softmax(student_logits.float() / self.cfg.student_temp, dim=-1)
            # H(teacher view t, student view s) for every pair in one matmul: [T, V], averaged over the batch.
            # (Indexing one pair at a time costs a zero-filled [V, B, K] gradient per pair.)
            cross = -torch.einsum("tbk,sbk->ts", teacher_probs, student_log_probs) / teacher_probs.shape[1]
        teacher_view, student_view = zip(*view_pairs(len(teacher_probs), len(student_log_probs)))
        loss = cross[list(teacher_view), list(student_view)].mean()  # pairs of different views only
        entropy = torch.special.entr(teacher_probs).sum(-1).mean()
        batch_entropy = torch.special.entr(teacher_probs.mean((0, 1))).sum()
        return loss, entropy, batch_entropy

    def forward(self, batch):
        crops = batch_views(batch, NUM_GLOBAL_CROPS + self.cfg.local_crops_number,
                            f"DINO needs {NUM_GLOBAL_CROPS} global + {self.cfg.local_crops_number} local crops per "
                            "image (DINO.train_transform)")
        with torch.no_grad():
            teacher_logits = multi_crop_forward(self.teacher, self.teacher_head, list(crops[:NUM_GLOBAL_CROPS]))
        student_logits = multi_crop_forward(self.backbone, self.head, list(crops))
        loss, entropy, batch_entropy = self.dino_loss(student_logits, teacher_logits)
        # Each teacher view is in the same number of pairs, so mean KL = mean cross-entropy - mean entropy.
        kl = loss.detach() - entropy
        if self.training:
            count = teacher_logits.new_tensor([teacher_logits.shape[:2].numel()], dtype=torch.float32)
            self._teacher_mean.add(teacher_logits.float().sum((0, 1)), count)
            self.watch.add(torch.stack([entropy, batch_entropy, kl, loss.detach()]))
        return loss, {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy, "teacher_student_kl": kl,
                      "center_norm": self.center.norm(), "loss_over_ln_k": loss.detach() / self.ln_k}

    def collapse_signs(self, watched: torch.Tensor) -> torch.Tensor:
        """[entropy, batch entropy, KL, loss] -> [batch entropy near 0, entropy near ln K]."""
        return torch.stack([near_zero(watched[1], self.ln_k), near_ln_k(watched[0], self.ln_k)])

    # ----- hooks -----
    def start_step(self, info: StepInfo, optimizer: torch.optim.Optimizer) -> None:
        """Weight decay on its cosine (groups that decay at all), the teacher temperature; drop
        sums left by a step the loop skipped (non-finite loss)."""
        self._teacher_mean.reset()
        self.watch.start_step()
        self.schedule_weight_decay(optimizer, info.step / max(info.total_steps, 1))
        self.teacher_temp = self.teacher_temperature(info.step, info.steps_per_epoch)

    def before_optimizer_step(self, info: StepInfo) -> None:
        """Freeze the last layer in the first epoch(s): drop its gradients (as DINO does; toggling
        requires_grad would break DDP), so AdamW leaves it, and its weight decay, alone."""
        if info.step < self.cfg.freeze_last_layer_epochs * info.steps_per_epoch:
            self.head.freeze_last_layer()

    @torch.no_grad()
    def end_step(self, info: StepInfo) -> None:
        """Once per optimizer step: centre EMA over the step's teacher outputs (all processes and
        micro-batches), teacher EMA of the student, collapse watch."""
        if self._teacher_mean.empty:  # no training forward in this step
            return
        batch_center = self._teacher_mean.pop(over_processes=True)
        center = self.center.mul(self.cfg.center_momentum).add_(batch_center, alpha=1.0 - self.cfg.center_momentum)
        self.center.copy_(center if info.applied is None else torch.where(info.applied, center, self.center))
        self.update_teacher(info)
        self.watch.end_step()

    def summary(self) -> list[str]:
        if self.watch.last is None:
            return []
        entropy, batch_entropy, kl, loss = self.watch.last.tolist()
        low, high = self.watch.sustained()
        lines = [f"DINO end state: teacher entropy {entropy:.3f} nats per image (collapse: ln K = {self.ln_k:.3f}), "
                 f"{batch_entropy:.3f} over the batch (collapse: 0), KL(teacher || student) {kl:.4f}, "
                 f"centre norm {self.center.norm().item():.3f}, loss {loss:.4f} (ln K = {self.ln_k:.3f})"]
        if low is not None:
            lines.append(
                f"WARNING: DINO looks collapsed: the entropy of the teacher's batch-mean output stayed below "
                f"{COLLAPSE_MARGIN * self.ln_k:.3f} nats (one prototype wins for every image) for {low:.0f} "
                f"steps in a row. Sharpening beats centring: raise --teacher-temp or warm it up "
                f"(--warmup-teacher-temp-epochs), make the centre follow faster (lower --center-momentum), "
                f"raise --momentum-teacher (e.g. 0.9995 at batch 256), use a larger --batch-size "
                f"(--grad-accum), or lower --lr.")
        if high is not None:
            lines.append(
                f"WARNING: DINO looks collapsed: the teacher's output entropy stayed above "
                f"{(1 - COLLAPSE_MARGIN) * self.ln_k:.3f} nats, near ln K (a uniform output for every image), "
                f"for {high:.0f} steps in a row. Centring beats sharpening: lower --teacher-temp (0.04 is the "
                f"paper's), raise --momentum-teacher (e.g. 0.9995 at batch 256) so the teacher does not chase "
                f"the student, use a larger --batch-size (--grad-accum), or lower --lr.")
        return lines
