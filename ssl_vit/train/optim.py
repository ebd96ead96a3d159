"""The optimizer and its learning-rate schedule, built from a ``TrainConfig`` (timm's pieces)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from ..config import TrainConfig

MAX_WARMUP_STEPS = 10_000  # the ViT paper's warmup
FUSED = ("adam", "adamw")  # timm optimizers that take fused=True: one kernel for all parameters


def scaled_lr(tc: TrainConfig) -> float:
    """--lr at --lr-ref-batch, scaled to --batch-size linearly or by the square root."""
    if not tc.lr_ref_batch:
        return tc.lr
    ratio = tc.batch_size / tc.lr_ref_batch
    return tc.lr * (math.sqrt(ratio) if tc.lr_scaling == "sqrt" else ratio)


def fused_by_default(tc: TrainConfig, device: torch.device) -> bool:
    """Adam and AdamW fused on CPUs and GPUs; not on a TPU (torch_xla has no fused kernel for them)."""
    return tc.optimizer in FUSED and device.type != "xla"


def build_optimizer(model: nn.Module, tc: TrainConfig, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """timm's optimizer with its parameter groups (no weight decay on biases, norms, tokens and position
    embeddings; ``model.no_weight_decay()`` and ``group_matcher`` for --layer-decay) at the scaled lr.
    ``fused`` (default: for Adam and AdamW; the trainer passes ``fused_by_default``): one kernel for all
    parameters, and no host sync in a step (``step.takes_found_inf``); ``benchmarks/train_throughput.py
    --fused`` measures the difference."""
    kwargs = {"betas": tuple(tc.betas)} if any(k in tc.optimizer for k in ("adam", "lamb")) else {}
    if fused if fused is not None else tc.optimizer in FUSED:
        kwargs["fused"] = True
    return create_optimizer_v2(model, opt=tc.optimizer, lr=scaled_lr(tc), weight_decay=tc.weight_decay,
                               layer_decay=tc.layer_decay, **kwargs)


def build_schedule(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> CosineLRScheduler:
    """Per step t = 1..steps (``step_update(t)``): linear warmup to the peak at t = warmup (default 10% of
    the steps, at most the paper's 10,000), then half a cosine towards --min-lr."""
    warmup = tc.warmup_steps if tc.warmup_steps is not None else min(MAX_WARMUP_STEPS, tc.steps // 10)
    return CosineLRScheduler(optimizer, t_initial=max(1, tc.steps - warmup + 1), lr_min=tc.min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
