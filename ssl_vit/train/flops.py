"""Training FLOPs of one optimizer step, counted on the real objective, not estimated.

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products and convolutions of a
forward and backward pass (the element-wise rest is a rounding error for a ViT). It runs on a
small probe batch with the shapes the objective's augmentation makes (DINO: every crop of its
multi-crop list; MAE: only the kept patches reach the encoder), scaled to the run's batch: every
objective here costs the same per image at any batch size.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from ..backbone import build_backbone
from ..config import RunConfig
from ..data import MEAN, STD
from ..objectives import DataInfo, StepInfo, get_objective
from .optim import build_optimizer

PROBE_IMAGES = 2


def example_batch(transform, n: int, img_size: int, device="cpu", num_classes: int = 10,
                  memory_format=torch.contiguous_format) -> dict:
    """Random tensors shaped as a collated batch of ``transform``'s output (one tensor, or a list
    of multi-crop tensors), with labels and indices: (n, C, H, W) per crop."""
    probe = transform(Image.fromarray(np.zeros((img_size, img_size, 3), dtype=np.uint8)))

    def like(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(n, *x.shape, device=device).contiguous(memory_format=memory_format)

    image = [like(c) for c in probe] if isinstance(probe, (list, tuple)) else like(probe)
    return {"image": image, "label": torch.randint(num_classes, (n,), device=device),
            "index": torch.arange(n, device=device)}


def step_flops(run: RunConfig, num_classes: int = 10) -> float:
    """FLOPs of one optimizer step of ``run`` (forward and backward over ``--batch-size`` images)."""
    cls = get_objective(run.objective)
    info = DataInfo("probe", num_classes, None, MEAN, STD, run.backbone.img_size)
    objective = cls(build_backbone(run.backbone), run.objective_config, info)
    objective.prepare_training()
    objective.train()
    objective.start_step(StepInfo(0, max(run.train.steps, 1), 0, 1), build_optimizer(objective, run.train))
    batch = example_batch(cls.train_transform(run.train, run.objective_config, info), PROBE_IMAGES,
                          run.backbone.img_size, num_classes=num_classes)
    with FlopCounterMode(display=False) as counter:
        loss, _ = objective(batch)
        loss.backward()
    return counter.get_total_flops() / PROBE_IMAGES * run.train.batch_size
