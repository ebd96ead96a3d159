"""One optimizer step: forward and backward over the step's micro-batches, the objective's hooks,
clipping, the finite check and the update. Used by the trainer, and usable alone (the benchmark).

The finite check needs no host sync where the optimizer takes a ``found_inf`` flag (torch's fused
Adam and AdamW, as ``torch.amp.GradScaler`` drives them): the host never waits for the device in a
step, and learns of a non-finite one when it reads ``StepResult.finite`` (the trainer: at log and
save steps). Other optimizers, and fp16 (its scaler calls the optimizer), read the flag every step."""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor

from ..data.device import DeviceBatch
from ..objectives import StepInfo
from ..objectives.teacher import local_shard


@dataclass
class StepResult:
    """What a step did; tensors stay on the device."""

    loss: torch.Tensor  # 0-d: the mean loss over the micro-batches
    grad_norm: torch.Tensor  # 0-d: the global gradient norm before clipping
    finite: torch.Tensor  # 0-d bool; False: the update was dropped (a NaN or infinite loss or gradient)
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


def parameter_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's norm (0-d, on the device). For gradients sharded by FSDP2 (``DTensor``), the local
    shards' squared norms are summed in one all-reduce per sharded mesh dimension: ``torch._foreach_norm``
    on the DTensors themselves all-reduces once per parameter (~150 for a ViT-B and DINO's head)."""
    norms = list(torch._foreach_norm([local_shard(g) for g in grads]))
    groups: dict[tuple, list[int]] = {}  # (mesh, its sharded dimensions) -> the gradients sharded so
    for i, g in enumerate(grads):
        if isinstance(g, DTensor):
            dims = tuple(d for d, p in enumerate(g.placements) if p.is_shard())
            if dims:
                groups.setdefault((g.device_mesh, dims), []).append(i)
    for (mesh, dims), members in groups.items():
        squares = torch.stack([norms[i] for i in members]).float().square()
        for d in dims:
            torch.distributed.all_reduce(squares, group=mesh.get_group(d))
        for i, total in zip(members, squares.sqrt().unbind()):
            norms[i] = total
    return norms


def clip_per_parameter(parameters, max_norm: float) -> None:
    """DINO's clipping (``utils.clip_gradients``): each parameter's gradient is scaled to norm at most
    ``max_norm`` on its own. By hand: timm's ``dispatch_clip_grad`` clips the global norm, values or
    AGC-style, none per parameter; torch has no per-parameter mode. No host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        scales = [torch.clamp(max_norm / (norm + 1e-6), max=1.0) for norm in parameter_norms(grads)]
        torch._foreach_mul_([local_shard(g) for g in grads], scales)


def takes_found_inf(acc: Accelerator, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` can drop an update on a device flag, no host sync: torch's fused
    optimizers skip the update and undo their step counters when ``found_inf`` is 1 (GradScaler's
    contract). Not under fp16, whose GradScaler sets the flag itself."""
    inner = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's AcceleratedOptimizer
    on_device = all(p.device.type == acc.device.type for g in inner.param_groups for p in g["params"][:1])
    # parameters offloaded to the CPU (FSDP's offload) would read a flag copied from the GPU without a wait
    return acc.mixed_precision != "fp16" and on_device and getattr(inner, "_step_supports_amp_scaling", False)


def agreed_finite(check: torch.Tensor, acc: Accelerator) -> torch.Tensor:
    """0-d bool on the device: whether ``check`` (each process's loss plus the global gradient norm)
    is finite on every process, so that all drop the same steps (a loss can be non-finite on one
    process alone). One tiny all-reduce, no host sync."""
    finite = torch.isfinite(check).float()
    if acc.num_processes > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return finite.bool()


def update_unless(found_inf: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` that leaves weights and optimizer state as they were when ``found_inf``
    (0-d float32, on the device) is 1."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del inner.found_inf


def optimizer_step(acc: Accelerator, model: nn.Module, hooks, optimizer: torch.optim.Optimizer,
                   micro_batches: list[dict], info: StepInfo, clip_grad: float, clip_mode: str = "norm",
                   forward: Optional[Callable] = None, host_sync: Callable[[], ContextManager] = nullcontext,
                   on_device: Callable[[dict], dict] = DeviceBatch()) -> StepResult:
    """One update of ``model`` (prepared by ``acc``, or plain) from ``micro_batches``.

    ``hooks``: the objective (``start_step``, ``before_optimizer_step``, ``end_step``);
    ``forward``: batch -> (loss, metrics), default ``model``. Each micro-batch's loss is divided by
    their number, so accumulation equals the large batch; gradients are all-reduced on the last one only.
    ``clip_mode``: ``norm`` clips the global norm to ``clip_grad``, ``per_param`` each parameter's
    (DINO; after ``before_optimizer_step``, where DINO clips first: per parameter the order does
    not matter, a dropped gradient stays dropped). ``on_device``: what a batch becomes on the device
    (uint8 images made float and normalised: ``ssl_vit.data.device``). A non-finite loss or gradient
    leaves the weights, the optimizer state and what ``end_step`` changes as they were; ``host_sync``
    wraps the host syncs of optimizers that cannot drop an update on the device (``takes_found_inf``).
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
    if isinstance(grad_norm, DTensor):  # FSDP2: a plain tensor for the all-reduces below and the logs (torch
        grad_norm = grad_norm.full_tensor()  # 2.11 has no sharding rule for all_reduce on a DTensor)
    if clip_grad > 0 and clip_mode == "per_param":
        clip_per_parameter(model.parameters(), clip_grad)
    check = loss_sum if acc.mixed_precision == "fp16" else loss_sum + grad_norm  # fp16: the scaler skips inf grads
    finite = agreed_finite(check, acc)
    if takes_found_inf(acc, optimizer):
        update_unless((~finite).float(), optimizer)
        optimizer.zero_grad(set_to_none=True)
        hooks.end_step(dataclasses.replace(info, applied=finite))  # dropped on the device: left as it was
    else:
        with host_sync():
            update = bool(finite.item())
        if update:
            with host_sync():  # an optimizer's step counters may live on the host
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if update:
            hooks.end_step(info)
    return StepResult(loss_sum, grad_norm.detach().float(), finite, sums, images, skipped)
