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
them sat near 0 or ln K for a sustained stretch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from itertools import chain, groupby
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..backbone import Backbone
from ..data import MultiCrop
from ..data.multicrop import SMALL_IMAGE_SIZES
from ..errors import ConfigError
from .base import DataInfo, Objective, StepInfo

NUM_GLOBAL_CROPS = 2  # the teacher's views
COLLAPSE_MARGIN = 0.02  # an entropy within 2% of ln K from 0 or from ln K counts as collapsed
COLLAPSE_MIN_STEPS = 5  # a sustained stretch: at least this many steps in a row...
COLLAPSE_FRACTION = 0.1  # ...and at least this fraction of the steps run


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


def cosine_schedule(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0, ``end`` at progress 1, half a cosine in between (DINO's
    ``cosine_scheduler`` for momentum and weight decay; timm's schedulers only drive the lr)."""
    return end + (start - end) * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2.0


def view_pairs(num_teacher_views: int, num_student_views: int) -> list[tuple[int, int]]:
    """(teacher view, student view) index pairs of *different* views. Views are numbered the same
    way for both (the global crops first), so a global crop is never compared with itself."""
    return [(t, s) for t in range(num_teacher_views) for s in range(num_student_views) if s != t]


class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> bottleneck -> L2 normalisation -> weight-normed linear layer to K.

    [B, D] -> [B, K]. With ``norm_last_layer`` the weight-norm scale g is fixed at 1, so the
    outputs are cosine similarities to K unit-norm prototypes.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        scale = self.last_layer.parametrizations.weight.original0  # g: [K, 1]
        with torch.no_grad():
            scale.fill_(1.0)
        scale.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def multi_crop_forward(backbone: Backbone, head: DINOHead, crops: list[torch.Tensor]) -> torch.Tensor:
    """V crops [B, 3, h_v, w_v] -> logits [V, B, K]; one backbone pass per run of equal-sized
    crops (DINO's ``MultiCropWrapper``), then one head pass over all of them."""
    features = [backbone(torch.cat(list(group))) for _, group in groupby(crops, key=lambda c: c.shape[-2:])]
    return head(torch.cat(features)).unflatten(0, (len(crops), -1))


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


class DINO(Objective):
    """Student = ``self.backbone`` + ``self.head``; teacher = ``self.teacher`` + ``self.teacher_head``."""

    Config = DINOConfig
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
        self.teacher = Backbone(dataclasses.replace(backbone.cfg, drop_path_rate=0.0))
        self.teacher_head = DINOHead(**head_kw)
        self.teacher.load_state_dict(backbone.state_dict())
        self.teacher_head.load_state_dict(self.head.state_dict())
        backbone.pos_interpolation = self.teacher.pos_interpolation = cfg.pos_interpolation
        for p in self._teacher_parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(cfg.out_dim))
        self.ln_k = math.log(cfg.out_dim)
        self.teacher_temp = self.teacher_temperature(0, 1)
        # Per-step sums over micro-batches. Plain attributes, not buffers: DDP would overwrite
        # each process's sums with process 0's at every forward (broadcast_buffers).
        self._teacher_sum: Optional[torch.Tensor] = None  # [K + 1]: summed teacher logits, count
        self._watch_sum: Optional[torch.Tensor] = None  # [5]: entropy, batch entropy, KL, loss, micro-batches
        # Collapse watch, on device (no host sync per step): last step's values, streaks.
        self._last: Optional[torch.Tensor] = None  # [4]: entropy, batch entropy, KL, loss
        self._streak = self._longest = None  # [2]: steps in a row with batch entropy near 0 / entropy near ln K
        self._steps_watched = 0

    @classmethod
    def train_transform(cls, train_cfg, cfg: DINOConfig, data: DataInfo) -> MultiCrop:
        """The multi-crop augmentation (it replaces --crop-scale and --hflip)."""
        return MultiCrop(cfg.global_crop_size or data.img_size, cfg.local_crop_size, cfg.local_crops_number,
                         cfg.global_crop_scale, cfg.local_crop_scale, data.mean, data.std)

    def _student_parameters(self):
        return chain(self.backbone.parameters(), self.head.parameters())

    def _teacher_parameters(self):
        return chain(self.teacher.parameters(), self.teacher_head.parameters())

    def no_weight_decay(self) -> set[str]:
        """DINO's rule (``utils.get_params_groups``): every parameter with more than one dimension
        decays, the position embedding and class token included."""
        return set()

    # ----- schedules -----
    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """EMA momentum after optimizer step ``step``: ``momentum_teacher`` at 0, 1 at ``total_steps``."""
        return cosine_schedule(self.cfg.momentum_teacher, 1.0, step / max(total_steps, 1))

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
        crops = batch["image"]
        if not isinstance(crops, (list, tuple)) or len(crops) != NUM_GLOBAL_CROPS + self.cfg.local_crops_number:
            got = f"{len(crops)} crops" if isinstance(crops, (list, tuple)) else "one tensor"
            raise ValueError(f"DINO needs {NUM_GLOBAL_CROPS} global + {self.cfg.local_crops_number} local crops "
                             f"per image (DINO.train_transform), got {got}")
        with torch.no_grad():
            teacher_logits = multi_crop_forward(self.teacher, self.teacher_head, list(crops[:NUM_GLOBAL_CROPS]))
        student_logits = multi_crop_forward(self.backbone, self.head, list(crops))
        loss, entropy, batch_entropy = self.dino_loss(student_logits, teacher_logits)
        # Each teacher view is in the same number of pairs, so mean KL = mean cross-entropy - mean entropy.
        kl = loss.detach() - entropy
        if self.training:
            watch = torch.stack([entropy, batch_entropy, kl, loss.detach(), torch.ones_like(kl)])
            self._accumulate(teacher_logits, watch)
        return loss, {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy, "teacher_student_kl": kl,
                      "center_norm": self.center.norm(), "loss_over_ln_k": loss.detach() / self.ln_k}

    @torch.no_grad()
    def _accumulate(self, teacher_logits: torch.Tensor, watch: torch.Tensor) -> None:
        """Add a micro-batch's teacher outputs [2, B, K] and collapse-watch values to the step's sums."""
        count = teacher_logits.new_tensor([teacher_logits.shape[:2].numel()], dtype=torch.float32)
        part = torch.cat([teacher_logits.float().sum((0, 1)), count])
        self._teacher_sum = part if self._teacher_sum is None else self._teacher_sum + part
        self._watch_sum = watch if self._watch_sum is None else self._watch_sum + watch

    # ----- hooks -----
    def start_step(self, info: StepInfo, optimizer: torch.optim.Optimizer) -> None:
        """Weight decay on its cosine (groups that decay at all), the teacher temperature; drop
        sums left by a step the loop skipped (non-finite loss)."""
        self._teacher_sum = self._watch_sum = None
        progress = info.step / max(info.total_steps, 1)
        decaying = 0
        for group in optimizer.param_groups:
            base = group.setdefault("initial_weight_decay", group["weight_decay"])
            if base > 0:
                group["weight_decay"] = cosine_schedule(base, self.cfg.weight_decay_end, progress)
                decaying += 1
        if not decaying and self.cfg.weight_decay_end > 0:
            raise ValueError(f"--weight-decay 0 leaves no parameter group to take --weight-decay-end "
                             f"{self.cfg.weight_decay_end}; pass --weight-decay-end 0 too, "
                             "or a positive --weight-decay")
        self.teacher_temp = self.teacher_temperature(info.step, info.steps_per_epoch)

    def before_optimizer_step(self, info: StepInfo) -> None:
        """Freeze the last layer in the first epoch(s): drop its gradients (as DINO does; toggling
        requires_grad would break DDP), so AdamW leaves it, and its weight decay, alone."""
        if info.step < self.cfg.freeze_last_layer_epochs * info.steps_per_epoch:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def end_step(self, info: StepInfo) -> None:
        """Once per optimizer step: centre EMA over the step's teacher outputs (all processes and
        micro-batches), teacher EMA of the student, collapse watch."""
        if self._teacher_sum is None:  # no training forward in this step
            return
        total = _all_reduce_sum(self._teacher_sum)
        batch_center = total[:-1] / total[-1]
        self.center.mul_(self.cfg.center_momentum).add_(batch_center, alpha=1.0 - self.cfg.center_momentum)
        m = self.teacher_momentum(info.step, info.total_steps)
        # t = m * t + (1 - m) * s over all parameters at once (one kernel per group on a GPU, not one each)
        torch._foreach_lerp_(list(self._teacher_parameters()), [s.detach() for s in self._student_parameters()], 1.0 - m)
        self._watch(self._watch_sum[:-1] / self._watch_sum[-1])
        self._teacher_sum = self._watch_sum = None

    def _watch(self, last: torch.Tensor) -> None:
        """last = [entropy, batch entropy, KL, loss] of this step; extend or reset the streaks."""
        entropy, batch_entropy = last[0], last[1]
        near = torch.stack([batch_entropy < COLLAPSE_MARGIN * self.ln_k, entropy > (1 - COLLAPSE_MARGIN) * self.ln_k])
        self._streak = near.float() if self._streak is None else (self._streak + 1) * near
        self._longest = self._streak.clone() if self._longest is None else torch.maximum(self._longest, self._streak)
        self._last = last
        self._steps_watched += 1

    def summary(self) -> list[str]:
        if self._last is None:
            return []
        entropy, batch_entropy, kl, loss = self._last.tolist()
        low, high = self._longest.tolist()
        lines = [f"DINO end state: teacher entropy {entropy:.3f} nats per image (collapse: ln K = {self.ln_k:.3f}), "
                 f"{batch_entropy:.3f} over the batch (collapse: 0), KL(teacher || student) {kl:.4f}, "
                 f"centre norm {self.center.norm().item():.3f}, loss {loss:.4f} (ln K = {self.ln_k:.3f})"]
        sustained = max(COLLAPSE_MIN_STEPS, math.ceil(COLLAPSE_FRACTION * self._steps_watched))
        if low >= sustained:
            lines.append(
                f"WARNING: DINO looks collapsed: the entropy of the teacher's batch-mean output stayed below "
                f"{COLLAPSE_MARGIN * self.ln_k:.3f} nats (one prototype wins for every image) for {low:.0f} "
                f"steps in a row. Sharpening beats centring: raise --teacher-temp or warm it up "
                f"(--warmup-teacher-temp-epochs), make the centre follow faster (lower --center-momentum), "
                f"raise --momentum-teacher (e.g. 0.9995 at batch 256), use a larger --batch-size "
                f"(--grad-accum), or lower --lr.")
        if high >= sustained:
            lines.append(
                f"WARNING: DINO looks collapsed: the teacher's output entropy stayed above "
                f"{(1 - COLLAPSE_MARGIN) * self.ln_k:.3f} nats, near ln K (a uniform output for every image), "
                f"for {high:.0f} steps in a row. Centring beats sharpening: lower --teacher-temp (0.04 is the "
                f"paper's), raise --momentum-teacher (e.g. 0.9995 at batch 256) so the teacher does not chase "
                f"the student, use a larger --batch-size (--grad-accum), or lower --lr.")
        return lines

    # ----- what is saved -----
    def export_backbone(self) -> Backbone:
        """The teacher: DINO evaluates (kNN, linear) the teacher's features."""
        return self.teacher
