"""What the objectives with an EMA teacher share (DINO, MSN; later iBOT).

- ``TeacherObjective``: the teacher is a copy of some student modules (the backbone without
  drop-path, a head) that gets no gradient and moves only by an EMA of the student,
  ``t = m * t + (1 - m) * s``, once per optimizer step (``end_step``), whatever the gradient
  accumulation; the momentum follows a schedule to 1 (``teacher_momentum``). ``ckpt.pt`` holds the
  teacher's backbone.
- the schedules their recipes run on: ``cosine_schedule`` (DINO's momentum, weight decay),
  ``linear_schedule`` (MSN's momentum and sharpening), the weight-decay cosine
  (``schedule_weight_decay``);
- ``StepMean``: a mean over one optimizer step's micro-batches and processes (DINO's centre,
  the collapse watch);
- ``all_reduce_sum`` / ``all_reduce_mean``: sums and means over processes, a no-op in one process.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import chain
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..backbone import Backbone
from .base import Objective, StepInfo


def cosine_schedule(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0, ``end`` at progress 1, half a cosine in between (DINO's
    ``cosine_scheduler`` for momentum and weight decay; timm's schedulers only drive the lr)."""
    return end + (start - end) * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2.0


def linear_schedule(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0, ``end`` at progress 1 (MSN's momentum and sharpening schedules)."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over processes, in place (no gradient)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over processes, differentiable: torch.distributed.nn's all-reduce sums the
    gradient over processes, so each process's x gets d loss / d mean (MSN's ``AllReduce``), and
    DDP's gradient average then equals one process holding the whole batch."""
    if not distributed():
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x) / dist.get_world_size()


class StepMean:
    """The mean over one optimizer step's micro-batches (and, on request, over processes) of values
    added as (sum, count). Plain tensors, not buffers: DDP would overwrite each process's sums with
    process 0's at every forward (broadcast_buffers)."""

    def __init__(self):
        self._sum: Optional[torch.Tensor] = None  # [..., V + 1]: the summed values, then the count

    @property
    def empty(self) -> bool:
        return self._sum is None

    def reset(self) -> None:
        self._sum = None

    def add(self, total: torch.Tensor, count: torch.Tensor) -> None:
        """total [V]: a micro-batch's values summed over its ``count`` items (count: [1])."""
        part = torch.cat([total, count])
        self._sum = part if self._sum is None else self._sum + part

    def pop(self, over_processes: bool = False) -> torch.Tensor:
        """[V]: the mean since the last reset (summed over processes first on request); resets."""
        total = all_reduce_sum(self._sum) if over_processes else self._sum
        self._sum = None
        return total[:-1] / total[-1]


def batch_views(batch: dict, expected: int, needs: str) -> list[torch.Tensor]:
    """The views of a multi-view batch (each [B, C, h, w]), or a clear error naming what the objective
    ``needs`` when the data did not come through its ``train_transform``."""
    views = batch["image"]
    if not isinstance(views, (list, tuple)) or len(views) != expected:
        got = f"{len(views)} views" if isinstance(views, (list, tuple)) else "one tensor"
        raise ValueError(f"{needs}, got {got}")
    return list(views)


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter (or gradient), detached, sharing its storage: a DTensor's
    (FSDP2) local shard, else the whole tensor. A teacher parameter and its student's have one shape
    and are split alike (dim 0 over the same processes), so an elementwise update of the shards is
    that of the whole tensors, with no communication."""
    return p.detach().to_local() if isinstance(p, DTensor) else p.detach()


def teacher_copy(student: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with the student's weights, frozen: the teacher's start."""
    teacher = build()
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_backbone(student: Backbone) -> Backbone:
    """The student backbone's architecture without drop-path (the teacher has none), its weights."""
    return teacher_copy(student, lambda: Backbone(dataclasses.replace(student.cfg, drop_path_rate=0.0)))


class TeacherObjective(Objective):
    """An objective whose ``self.teacher`` (and other teacher modules) follow an EMA of student modules.

    Subclasses set ``teacher_of``: (student attribute, teacher attribute) pairs, in the order the EMA
    pairs their parameters, and have ``cfg.momentum_teacher`` (the momentum at step 0).
    """

    teacher_of: tuple[tuple[str, str], ...] = (("backbone", "teacher"),)

    def _student_parameters(self) -> Iterator[nn.Parameter]:
        return chain.from_iterable(getattr(self, student).parameters() for student, _ in self.teacher_of)

    def _teacher_parameters(self) -> Iterator[nn.Parameter]:
        return chain.from_iterable(getattr(self, teacher).parameters() for _, teacher in self.teacher_of)

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """EMA momentum after optimizer step ``step``: ``momentum_teacher`` at 0, 1 at ``total_steps``
        on a cosine (DINO's)."""
        return cosine_schedule(self.cfg.momentum_teacher, 1.0, step / max(total_steps, 1))

    @torch.no_grad()
    def update_teacher(self, info: StepInfo) -> None:
        """t = m * t + (1 - m) * s over all parameters at once (one kernel per group on a GPU, not one each),
        on each process's shards when FSDP shards them (``local_shard``). With ``info.applied`` (whether
        the step was applied, known on the device only) the weight is ``applied * (1 - m)``: 0 for a
        dropped step, which leaves the teacher exactly as it was (the student, not updated, is finite)
        with no copy of it. Torch's fused kernel wants weights shaped as the tensors, so this 0-d device
        weight may cost one kernel per parameter on a GPU (untested there)."""
        m = self.teacher_momentum(info.step, info.total_steps)
        teacher = [local_shard(t) for t in self._teacher_parameters()]
        student = [local_shard(s) for s in self._student_parameters()]
        weight = 1.0 - m
        if info.applied is not None:  # 0 when the step was dropped
            weight = [info.applied.to(teacher[0].dtype) * weight] * len(teacher)
        torch._foreach_lerp_(teacher, student, weight)

    def schedule_weight_decay(self, optimizer: torch.optim.Optimizer, progress: float) -> None:
        """Weight decay on a cosine from --weight-decay to ``cfg.weight_decay_end`` (the groups that
        decay at all), as DINO's and MSN's recipes."""
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

    def export_backbone(self) -> Backbone:
        """The teacher: its features are the ones evaluated (kNN, linear), as DINO and MSN do."""
        return self.teacher
