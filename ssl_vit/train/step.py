"""One optimizer step: forward and backward over the step's micro-batches, the objective's hooks,
clipping, the finite check and the update. Used by the trainer, and usable alone (the benchmark)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
from accelerate import Accelerator
from torch import nn

from ..data.device import DeviceBatch
from ..objectives import StepInfo


@dataclass
class StepResult:
    """What a step did; tensors stay on the device (no host sync beyond the finite check)."""

    loss: torch.Tensor  # 0-d: the mean loss over the micro-batches
    grad_norm: torch.Tensor  # 0-d: the global gradient norm before clipping
    finite: bool  # False: the update was skipped (a NaN or infinite loss or gradient)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's, averaged over micro-batches
    images: int = 0  # images this process trained on
    skipped_images: int = 0  # unreadable images left out (--skip-bad-images)


def to_device(batch: dict, device: torch.device) -> dict:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, list):
            return [move(x) for x in v]
        return v
    return {k: move(v) for k, v in batch.items()}


def batch_len(images) -> int:
    return len(images[0]) if isinstance(images, list) else len(images)


def clip_per_parameter(parameters, max_norm: float) -> None:
    """DINO's clipping (``utils.clip_gradients``): each parameter's gradient is scaled to norm at most
    ``max_norm`` on its own. By hand: timm's ``dispatch_clip_grad`` clips the global norm, values or
    AGC-style, none per parameter; torch has no per-parameter mode. No host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        scales = [torch.clamp(max_norm / (norm + 1e-6), max=1.0) for norm in torch._foreach_norm(grads)]
        torch._foreach_mul_(grads, scales)


def optimizer_step(acc: Accelerator, model: nn.Module, hooks, optimizer: torch.optim.Optimizer,
                   micro_batches: list[dict], info: StepInfo, clip_grad: float, clip_mode: str = "norm",
                   forward: Optional[Callable] = None, host_sync: Callable[[], ContextManager] = nullcontext,
                   on_device: Callable[[dict], dict] = DeviceBatch()) -> StepResult:
    """One update of ``model`` (prepared by ``acc``, or plain) from ``micro_batches``.

    ``hooks``: the objective (``start_step``, ``before_optimizer_step``, ``end_step``); ``forward``:
    batch -> (loss, metrics), default ``model``. Each micro-batch's loss is divided by their number,
    so accumulation equals the large batch; gradients are all-reduced on the last one only.
    ``clip_mode``: ``norm`` clips the global norm to ``clip_grad``, ``per_param`` each parameter's
    (DINO; after ``before_optimizer_step``, where DINO clips first: per parameter the order does
    not matter, a dropped gradient stays dropped). ``on_device``: what a batch becomes on the device
    (uint8 images made float and normalised: ``ssl_vit.data.device``). The one host sync (``host_sync`` wraps it)
    keeps a non-finite loss or gradient from the weights.
    """
    forward = forward or model
    hooks.start_step(info, optimizer)
    n = len(micro_batches)
    loss_sum, sums, images, skipped = torch.zeros((), device=acc.device), {}, 0, 0
    for i, batch in enumerate(micro_batches):
        skipped += batch.pop("skipped", 0)
        batch = on_device(to_device(batch, acc.device))
        with nullcontext() if i == n - 1 else acc.no_sync(model):
            with acc.autocast():  # a prepared model autocasts itself; a plain one (the benchmark's) here
                loss, metrics = forward(batch)
            acc.backward(loss / n)
        loss_sum += loss.detach() / n
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0) + v.detach().float() / n
        images += batch_len(batch["image"])
    hooks.before_optimizer_step(info)
    global_clip = clip_grad if clip_grad > 0 and clip_mode == "norm" else math.inf
    grad_norm = acc.clip_grad_norm_(model.parameters(), global_clip)  # also unscales fp16 gradients
    if clip_grad > 0 and clip_mode == "per_param":
        clip_per_parameter(model.parameters(), clip_grad)
    check = loss_sum if acc.mixed_precision == "fp16" else loss_sum + grad_norm  # fp16: the scaler skips inf grads
    with host_sync():
        finite = bool(torch.isfinite(check).item())
    if finite:
        with host_sync():  # an optimizer's step counters may live on the host
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if finite:
        hooks.end_step(info)
    return StepResult(loss_sum, grad_norm.detach().float(), finite, sums, images, skipped)
