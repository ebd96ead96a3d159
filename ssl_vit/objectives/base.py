"""The objective contract: a module built from the shared backbone that turns a batch into a loss.

The training loop knows nothing else about an objective. Optional hooks let an objective keep
state that changes once per optimizer step (EMA teachers, centres, schedules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..backbone import Backbone
from ..data import train_transform


@dataclass
class DataInfo:
    """What an objective may need to know about the data: classes and normalisation."""

    name: str
    num_classes: Optional[int]
    class_names: Optional[list[str]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int


@dataclass
class StepInfo:
    """Where the run is, passed to the hooks (steps count optimizer steps)."""

    step: int
    total_steps: int
    epoch: int
    steps_per_epoch: int
    # end_step: 0-d bool on the device, whether this step's update was applied (False: dropped, a non-finite
    # loss or gradient found without a host sync); what end_step changes must then stay as it was. None: applied
    applied: Optional[torch.Tensor] = None


class Objective(nn.Module):
    """Base class: subclasses set ``Config`` and implement ``forward``."""

    Config: type = object  # a dataclass with the objective's own settings (flags of the recipe)
    needs_labels: bool = False
    has_test_metric: bool = False  # evaluate_batch and test_metrics are implemented (a test split is read)
    # The recipe's defaults (recipes/<name>.py): the paper's settings scaled to a laptop, as flag values.
    recipe_defaults: dict = {}

    def __init__(self, backbone: Backbone, cfg: Any, data: DataInfo):
        super().__init__()
        self.backbone, self.cfg, self.data = backbone, cfg, data

    @classmethod
    def initialise(cls, backbone: Backbone) -> None:
        """Re-initialise a fresh backbone where the objective's reference differs from timm's
        initialisation (not called when --init loads weights)."""

    @classmethod
    def train_transform(cls, train_cfg, cfg, data: DataInfo, uint8: bool = False) -> Callable:
        """The augmentation of the training images (default: inception crop and flip). ``uint8``: to
        uint8 tensors, normalised (and randomly erased) on the device, as the trainer's loader sends them."""
        return train_transform(data.img_size, scale=train_cfg.crop_scale, hflip=train_cfg.hflip,
                               mean=data.mean, std=data.std, randaugment=train_cfg.randaugment,
                               random_erasing=train_cfg.random_erasing, uint8=uint8)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """batch -> (scalar loss, metrics as 0-d tensors). No ``.item()`` here: the loop syncs."""
        raise NotImplementedError

    # ----- hooks, all optional -----
    def prepare_training(self) -> None:
        """Before training, before the run folder is written: load what training needs and ``ckpt.pt``
        does not hold (DeiT's frozen teacher). ``load_objective`` does not call it."""

    def start_step(self, info: StepInfo, optimizer: torch.optim.Optimizer) -> None:
        """Before the step's forward passes (schedules of weight decay, temperatures)."""

    def before_optimizer_step(self, info: StepInfo) -> None:
        """After backward on all micro-batches, before clipping and the update (gradient surgery)."""

    def end_step(self, info: StepInfo) -> None:
        """After the optimizer step (EMA teachers, centres); once per step, whatever the accumulation.
        Where ``info.applied`` is False on the device, leave what it changes as it was."""

    def evaluate_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        """Sums over a test batch (e.g. correct and count); only called when ``has_test_metric``."""
        raise NotImplementedError

    def test_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The named test metrics from ``evaluate_batch``'s sums over the whole test split (all processes)."""
        return {k: v.item() for k, v in sums.items()}

    def summary(self) -> list[str]:
        """Lines printed at the end of training (e.g. a collapse report)."""
        return []

    def headline(self, record: dict, results: dict) -> Optional[str]:
        """One line for the end of a run: the objective's own metric against its trivial baseline, from
        the last training record of ``metrics.jsonl`` (means over its steps) and the test ``results``."""
        return None

    # ----- what is saved -----
    def export_backbone(self) -> Backbone:
        """The backbone written to ``ckpt.pt`` (DINO: the teacher)."""
        return self.backbone

    def represent(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, D]: the representation of ``export_backbone()``. Sharded (FSDP), a forward
        method of the root unit (``sharding.shard_objective``), which gathers the embeddings and norms
        the root holds; the backbone's own call would meet them sharded."""
        return self.export_backbone()(images)

    def objective_state(self, state: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """This objective's own tensors for ``ckpt.pt`` (heads, decoders, tokens, a student): its
        state dict without the exported backbone, which the checkpoint holds under timm names.
        ``state``: the full state dict, where this module holds shards (FSDP: ``sharding.full_state_dict``)."""
        prefix = self._exported_prefix()
        state = self.state_dict() if state is None else state
        return {k: v.detach().cpu().clone() for k, v in state.items() if not k.startswith(prefix)}

    def exported_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The exported backbone's timm state dict (ckpt.pt's ``state_dict``) out of the full ``state``."""
        prefix = self._exported_prefix() + "vit."
        return {k[len(prefix):]: v.detach().cpu().clone() for k, v in state.items() if k.startswith(prefix)}

    def _exported_prefix(self) -> str:
        exported = self.export_backbone()
        return next(name for name, module in self.named_children() if module is exported) + "."

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards as units of their own, before the objective itself takes the rest
        (``train.sharding``): every Transformer block (the children of a ``blocks`` container), the
        student's, an EMA teacher's and a decoder's alike. Each is called as a module, which is when
        FSDP gathers its parameters."""
        return [block for name, module in self.named_modules() if name.rsplit(".", 1)[-1] == "blocks"
                for block in module.children()]

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping of the backbone (for layer-wise lr decay), renamed to this module's
        parameter names; the objective's own parameters (heads) fall in the last group."""
        prefix = r"^backbone\.vit\."

        def renamed(pattern: str) -> str:
            return prefix + "(?:" + pattern.lstrip("^") + ")"

        groups = {}
        for key, rule in self.backbone.vit.group_matcher(coarse).items():
            if isinstance(rule, str):
                groups[key] = renamed(rule)
            else:
                groups[key] = [(renamed(pattern), order) for pattern, order in rule]
        return groups

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides biases and other 1-D parameters (norms):
        timm's (position embedding, class token) unless an objective's reference says otherwise."""
        return {f"backbone.vit.{n}" for n in self.backbone.vit.no_weight_decay()}
