"""MSN: Masked Siamese Networks (Assran et al. 2022; facebookresearch/msn).

A masked anchor view of an image must be assigned to the same learned prototypes as the unmasked
target view of that image, seen by an EMA teacher. In the order a step runs (``msn_train.py``):

1. views (``ssl_vit.data.MultiCrop`` with MSN's values): the target view and the random anchor
   view (the two "global" crops, scale 0.3 - 1), N focal anchor views (small crops, 0.05 - 0.3);
2. patch drop (``encode_masked``): the random anchor view keeps a random (1 - patch_drop) of its
   patches, a fresh subset per image, and the encoder runs on the kept tokens only
   (``Backbone.encode(..., keep)``, as MAE); hybrids blank the dropped patches in pixel space before
   their stem, so no dropped pixel leaks into a kept token. The focal views keep all their patches
   (``deit.py`` drops patches from the first run of equal-sized views only);
3. target: the target view, unmasked, through the teacher's backbone and projection head, no gradient;
4. anchors: the random anchor and focal views through the student's backbone and projection head
   (3-layer MLP with BatchNorm, ``heads.projection_mlp``);
5. prototypes: each embedding is L2-normalised and compared by cosine similarity with K learnable
   prototypes (the student's: the teacher has none, ``heads.cosine_prototypes``), p = softmax(cos / tau);
6. targets: the teacher's p sharpened (p^(1/T), renormalised) and, with ``sinkhorn``, balanced over
   the prototypes by 3 Sinkhorn-Knopp iterations over the batch of all processes;
7. loss (``msn_loss``): the cross-entropy H(target, anchor) averaged over every anchor view, plus
   ``memax_weight`` x me-max, log K - H(mean anchor prediction over the batch of all processes),
   which keeps the anchors spread over the prototypes;
8. once per optimizer step (``end_step``): the teacher takes an EMA of the student's backbone and
   head, with a momentum linear from 0.996 to 1 over 1.25 x the run (``schedule_horizon``), which
   the sharpening temperature and the weight-decay cosine span too.

With --grad-accum, Sinkhorn and me-max see each micro-batch (of all processes), not the whole
step's batch. Collapse watch (``collapse.CollapseWatch``): every step logs the targets' entropy per
image (ln K: the embeddings no longer tell images apart), the entropy of the batch-mean target
(prototype usage; 0: one prototype for every image), the anchors' entropy and me-max;
``summary()`` warns when one sat near 0 or ln K for a sustained stretch. ``ckpt.pt`` holds the
teacher's backbone, as MSN's released checkpoints are its target encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..data import MultiCrop
from ..data.multicrop import SMALL_IMAGE_SIZES
from ..errors import ConfigError
from ..masking import Masking, random_masking
from .base import DataInfo, StepInfo
from .collapse import COLLAPSE_MARGIN, CollapseWatch, near_ln_k, near_zero
from .heads import cosine_prototypes, projection_mlp
from .teacher import (TeacherObjective, all_reduce_mean, all_reduce_sum, batch_views, distributed,
                      linear_schedule, teacher_backbone, teacher_copy)

NUM_RANDOM_VIEWS = 2  # the target view and the random anchor view
SINKHORN_ITERATIONS = 3  # losses.distributed_sinkhorn
BLUR_P = 0.5  # data_manager.make_transforms: GaussianBlur(p=0.5) on every view
# Patch drop by model size, from facebookresearch/msn: ViT-S/16 0.15 (configs/pretrain/msn_vits16.yaml),
# ViT-B/4 0.7 (the maintainers' config in its issue 5); ViT-B/16 0.3 from the paper (no config released).
# Ti takes S's; a wider model takes B's ratio at its patch size.
PATCH_DROP_SMALL, PATCH_DROP_BASE, PATCH_DROP_SMALL_PATCHES = 0.15, 0.3, 0.7


@dataclass
class MSNConfig:
    num_prototypes: int = 1024  # K
    output_dim: int = 256  # the projection head's output: the prototypes' dimension
    hidden_dim: int = 2048  # the projection head's MLP width
    head_bn: bool = True  # BatchNorm in the projection head (MSN's use_bn)
    temperature: float = 0.1  # tau of the softmax over the prototypes' cosine similarities
    start_sharpen: float = 0.25  # T, the targets' sharpening temperature at step 0...
    final_sharpen: float = 0.25  # ...linear to this over schedule_horizon x --steps
    sinkhorn: bool = True  # balance the targets over the prototypes (Sinkhorn-Knopp)
    memax_weight: float = 1.0  # weight of the mean-entropy maximisation regulariser (0: off)
    entropy_weight: float = 0.0  # weight of the anchors' mean entropy (MSN's ent_weight; 0 in its configs)
    patch_drop: Optional[float] = None  # fraction of the random anchor's patches dropped; None: by model size
    momentum_teacher: float = 0.996  # teacher EMA momentum at step 0, linear to 1 over schedule_horizon x --steps
    weight_decay_end: float = 0.4  # weight decay follows a cosine from --weight-decay to this
    schedule_horizon: float = 1.25  # momentum, sharpening and weight decay schedules span this many runs
    focal_views: int = 10
    rand_size: Optional[int] = None  # the target and random anchor views; None: --img-size
    focal_size: int = 96
    rand_crop_scale: tuple[float, float] = (0.3, 1.0)
    focal_crop_scale: tuple[float, float] = (0.05, 0.3)
    color_jitter: float = 0.5  # strength s: ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with p = 0.8
    # Position embeddings of the focal views: "msn" (deit.py: bicubic at the plain size ratio), "dino", "timm".
    pos_interpolation: str = "msn"

    def __post_init__(self):
        if self.num_prototypes < 2:
            raise ConfigError(f"--num-prototypes {self.num_prototypes}: use at least 2 (MSN: 1024)")
        for name in ("temperature", "start_sharpen", "final_sharpen", "schedule_horizon"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be positive")
        for name in ("memax_weight", "entropy_weight", "color_jitter"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 0")
        if self.patch_drop is not None and not 0.0 <= self.patch_drop < 1.0:
            raise ConfigError(f"--patch-drop {self.patch_drop}: use a fraction in [0, 1) (MSN: 0.15 for ViT-S/16)")
        if not 0.0 <= self.momentum_teacher <= 1.0:
            raise ConfigError(f"--momentum-teacher {self.momentum_teacher} must lie in [0, 1]")
        if self.focal_views < 0:
            raise ConfigError(f"--focal-views {self.focal_views}: use 0 or more")
        if self.pos_interpolation not in ("msn", "dino", "timm"):
            raise ConfigError(f"--pos-interpolation {self.pos_interpolation!r}: use 'msn', 'dino' or 'timm'")


def default_patch_drop(backbone: Backbone) -> float:
    """MSN's patch-drop ratio for the backbone's size (see PATCH_DROP_*)."""
    if backbone.embed_dim <= 384:
        return PATCH_DROP_SMALL
    return PATCH_DROP_BASE if backbone.pixel_patch_size >= 16 else PATCH_DROP_SMALL_PATCHES


@torch.no_grad()
def sinkhorn(probs: torch.Tensor, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """[B, K] assignments -> [B, K] rows summing to 1 whose prototype totals over the batch of all
    processes are equal (``losses.distributed_sinkhorn``). By hand: no maintained library has it
    outside the SSL frameworks (lightly, solo-learn), which ssl_vit does not depend on."""
    q = probs.T.float()  # [K, B]
    num_prototypes, samples = q.shape[0], q.shape[1] * (dist.get_world_size() if distributed() else 1)
    q = q / all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)) / num_prototypes  # each prototype's total: 1 / K
        q = q / q.sum(dim=0, keepdim=True) / samples  # each sample's total: 1 / B
    return (q * samples).T


class MSN(TeacherObjective):
    """Student = ``self.backbone`` + ``self.head`` (+ ``self.prototypes``); teacher = ``self.teacher`` +
    ``self.teacher_head``."""

    Config = MSNConfig
    teacher_of = (("backbone", "teacher"), ("head", "teacher_head"))
    # msn_vits16.yaml's optimisation (AdamW, lr 1e-3 at batch 1024 with a cosine to 1e-6, weight decay
    # 0.04 -> 0.4, clipping 3.0, no drop-path) on a CPU-sized model; see recipes/msn.py for the choices.
    recipe_defaults = dict(
        model="vit_tiny", patch_size=4, img_size=SMALL_IMAGE_SIZES[0], focal_size=SMALL_IMAGE_SIZES[1],
        depth=6,  # as DINO's recipe: the anchors are 2.5x the tokens of a supervised step, plus the target
        drop_path_rate=0.0,
        steps=50, batch_size=64,
        optimizer="adamw", lr=1e-3, lr_ref_batch=1024, min_lr=1e-6, betas=(0.9, 0.999),
        weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0,
        num_prototypes=256,  # MSN: 1024 at batch 1024; a batch of 64 fills fewer
    )

    def __init__(self, backbone: Backbone, cfg: MSNConfig, data: DataInfo):
        super().__init__(backbone, cfg, data)
        for size in (cfg.rand_size or data.img_size, cfg.focal_size):
            backbone.check_img_size(size)
        self.patch_drop = cfg.patch_drop if cfg.patch_drop is not None else default_patch_drop(backbone)
        head_kw = dict(in_dim=backbone.embed_dim, hidden_dim=cfg.hidden_dim, out_dim=cfg.output_dim,
                       batch_norm=cfg.head_bn)
        self.head = projection_mlp(**head_kw)
        self.prototypes = cosine_prototypes(cfg.output_dim, cfg.num_prototypes)
        self.teacher = teacher_backbone(backbone)
        self.teacher_head = teacher_copy(self.head, lambda: projection_mlp(**head_kw))
        backbone.pos_interpolation = self.teacher.pos_interpolation = cfg.pos_interpolation
        # msn_train.py syncs the heads' BatchNorm over processes; torch's SyncBatchNorm runs on GPUs only
        self.bn_per_process = cfg.head_bn and distributed() and dist.get_backend() == "gloo"
        if cfg.head_bn and distributed() and not self.bn_per_process:
            self.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.head)
            self.teacher_head = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher_head)
        self.ln_k = math.log(cfg.num_prototypes)
        self.sharpen_temp = cfg.start_sharpen
        self.watch = CollapseWatch(self.collapse_signs)  # of [target entropy, usage, anchor entropy, me-max, loss]

    @classmethod
    def train_transform(cls, train_cfg, cfg: MSNConfig, data: DataInfo, uint8: bool = False) -> MultiCrop:
        """MSN's views: [target, random anchor, focal 1..N] (it replaces --crop-scale and --hflip); ``uint8``
        as ``Objective``'s."""
        s = cfg.color_jitter
        return MultiCrop(cfg.rand_size or data.img_size, cfg.focal_size, cfg.focal_views, cfg.rand_crop_scale,
                         cfg.focal_crop_scale, data.mean, data.std, color_jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
                         blur_p=(BLUR_P,) * 3, solarize_p=0.0, uint8=uint8)

    def no_weight_decay(self) -> set[str]:
        """MSN's rule (``init_opt``): every parameter with more than one dimension decays, the position
        embedding and class token included, except the prototypes."""
        return {"prototypes.parametrizations.weight.original1"}

    # ----- schedules -----
    def horizon_progress(self, step: int, total_steps: int) -> float:
        """MSN's schedules span ``schedule_horizon`` (1.25) x the run: at the last step they are 80% along."""
        return step / max(self.cfg.schedule_horizon * total_steps, 1)

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """``momentum_teacher`` at step 0, linear towards 1 (``msn_train.py``'s momentum_scheduler)."""
        return linear_schedule(self.cfg.momentum_teacher, 1.0, self.horizon_progress(step, total_steps))

    # ----- the method, in the order it runs -----
    def encode_masked(self, images: torch.Tensor, masking: Optional[Masking] = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, P + K, D]: the prefix tokens and the K kept patch tokens only (``masking``:
        default a fresh random patch drop; none when patch_drop is 0). Hybrids blank the dropped
        patches before their stem."""
        grid = self.backbone.grid_size(images)
        if masking is None:
            if self.patch_drop == 0:
                return self.backbone.forward_features(images)
            masking = random_masking(images.shape[0], grid[0] * grid[1], self.patch_drop, images.device)
        if self.backbone.is_hybrid:
            images = self.backbone.blank_patches(images, masking.mask)
        return self.backbone.encode(self.backbone.embed(images), grid, keep=masking.keep)

    def anchor_embeddings(self, anchor: torch.Tensor, focal: list[torch.Tensor]) -> torch.Tensor:
        """The random anchor [B, 3, H, W] (patch-dropped) and N focal views [B, 3, h, w] -> [(1 + N) B, d],
        view after view. The head runs once per view size, so its BatchNorm normalises each size's
        batch apart, as ``deit.py``'s forward."""
        parts = [self.head(self.backbone.pool(self.encode_masked(anchor)))]
        if focal:
            parts.append(self.head(self.backbone(torch.cat(focal))))
        return torch.cat(parts)

    def prototype_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[n, d] -> [n, K]: cosine similarities to the prototypes over the temperature tau."""
        return self.prototypes(F.normalize(embeddings, dim=-1)) / self.cfg.temperature

    def msn_loss(self, anchors: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """anchors [V B, d] (V anchor views, view after view), targets [B, d] (the teacher's) -> (loss,
        its parts and the watched entropies). In float32 whatever the autocast."""
        with torch.autocast(anchors.device.type, enabled=False):
            anchor_log_probs = F.log_softmax(self.prototype_logits(anchors.float()), dim=-1)  # [V B, K]
            anchor_probs = anchor_log_probs.exp()
            with torch.no_grad():
                # softmax(l / tau) sharpened at T is softmax(l / (tau T)): p^(1/T) / sum p^(1/T)
                target_probs = F.softmax(self.prototype_logits(targets.float()) / self.sharpen_temp, dim=-1)
                if self.cfg.sinkhorn:
                    target_probs = sinkhorn(target_probs)
            views = anchors.shape[0] // targets.shape[0]
            cross_entropy = -(target_probs.repeat(views, 1) * anchor_log_probs).sum(-1).mean()
            mean_anchor = all_reduce_mean(anchor_probs.mean(0))  # [K] over the batch of all processes
            me_max = self.ln_k - torch.special.entr(mean_anchor).sum()
            anchor_entropy = torch.special.entr(anchor_probs).sum(-1).mean()
        loss = cross_entropy + self.cfg.memax_weight * me_max + self.cfg.entropy_weight * anchor_entropy
        return loss, {"cross_entropy": cross_entropy.detach(), "me_max": me_max.detach(),
                      "anchor_entropy": anchor_entropy.detach(),
                      "target_entropy": torch.special.entr(target_probs).sum(-1).mean(),
                      "prototype_usage_entropy": torch.special.entr(target_probs.mean(0)).sum()}

    def forward(self, batch):
        views = batch_views(batch, NUM_RANDOM_VIEWS + self.cfg.focal_views,
                            f"MSN needs a target, a random anchor and {self.cfg.focal_views} focal views per image "
                            "(MSN.train_transform)")
        with torch.no_grad():
            targets = self.teacher_head(self.teacher(views[0]))  # [B, d]
        anchors = self.anchor_embeddings(views[1], list(views[NUM_RANDOM_VIEWS:]))
        loss, metrics = self.msn_loss(anchors, targets)
        if self.training:
            self.watch.add(torch.stack([metrics["target_entropy"], metrics["prototype_usage_entropy"],
                                        metrics["anchor_entropy"], metrics["me_max"], loss.detach()]))
        return loss, metrics

    def collapse_signs(self, watched: torch.Tensor) -> torch.Tensor:
        """[target entropy, usage, anchor entropy, me-max, loss] -> [the targets' or the anchors' batch
        mean on one prototype, the targets uniform]."""
        anchor_usage = self.ln_k - watched[3]  # the entropy of the mean anchor prediction
        return torch.stack([near_zero(torch.minimum(watched[1], anchor_usage), self.ln_k),
                            near_ln_k(watched[0], self.ln_k)])

    # ----- hooks -----
    def start_step(self, info: StepInfo, optimizer: torch.optim.Optimizer) -> None:
        """Weight decay and sharpening on their schedules; drop values left by a skipped step."""
        self.watch.start_step()
        progress = self.horizon_progress(info.step, info.total_steps)
        self.schedule_weight_decay(optimizer, progress)
        self.sharpen_temp = linear_schedule(self.cfg.start_sharpen, self.cfg.final_sharpen, progress)

    @torch.no_grad()
    def end_step(self, info: StepInfo) -> None:
        """Once per optimizer step: the teacher's EMA of the student, the collapse watch."""
        self.update_teacher(info)
        self.watch.end_step()

    def summary(self) -> list[str]:
        if self.watch.last is None:
            return []
        target_entropy, usage, anchor_entropy, me_max, loss = self.watch.last.tolist()
        one_prototype, uniform = self.watch.sustained()
        lines = [f"MSN end state: target entropy {target_entropy:.3f} nats per image (collapse: ln K = "
                 f"{self.ln_k:.3f}), prototype usage {usage:.3f} nats (the batch-mean target; collapse: 0), "
                 f"anchor entropy {anchor_entropy:.3f}, me-max {me_max:.4f}, loss {loss:.4f}"]
        if self.bn_per_process:
            lines.append("MSN: the projection heads' BatchNorm normalised each process's batch on its own (torch's "
                         "SyncBatchNorm needs GPUs); --no-head-bn trains the same on any number of CPU processes")
        if one_prototype is not None:
            lines.append(
                f"WARNING: MSN looks collapsed: the batch-mean assignment of the targets or the anchors stayed "
                f"below {COLLAPSE_MARGIN * self.ln_k:.3f} nats (one prototype for every image) for "
                f"{one_prototype} steps in a row. Balance the targets (--sinkhorn, MSN's default), raise "
                f"--memax-weight (1 is MSN's), raise --momentum-teacher, or lower --lr.")
        if uniform is not None:
            lines.append(
                f"WARNING: MSN looks collapsed: the targets' entropy stayed above "
                f"{(1 - COLLAPSE_MARGIN) * self.ln_k:.3f} nats, near ln K (a uniform assignment for every image: "
                f"the embeddings no longer tell images apart), for {uniform} steps in a row. Sharpen the targets "
                f"more (lower --start-sharpen and --final-sharpen; 0.25 is MSN's), lower --temperature, raise "
                f"--momentum-teacher, or lower --lr.")
        return lines
