"""Fine-tuning: the whole backbone plus a new linear head, through the ONE training loop
(``ssl_vit.train.Trainer``, on Accelerate), as the ViT paper or MAE does it.

    finetune(build_run(checkpoint, data, FinetuneSettings(protocol="mae", steps=500))) -> (record, is_main)
    (command line: python -m eval.finetune CKPT --data NAME_OR_PATH [--protocol paper|mae]; its
    docstring describes both protocols, the defaults and the run folders)

``build_run`` reads the settings from a ``FinetuneSettings`` or the command line's namespace (the
same attributes); a protocol field left at None takes the protocol's value.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Optional

import torch

from ..backbone import BackboneConfig, token_width
from ..checkpoint import backbone_info, load_checkpoint
from ..config import RunConfig, TrainConfig
from ..data import eval_crop_fraction
from ..errors import EvalError
from ..names import folder_safe, short_name
from ..objectives.supervised import SupervisedConfig
from ..train import Trainer


@dataclass(frozen=True)
class Protocol:
    optimizer: str  # a timm optimizer name ("momentum" is SGD with classical momentum 0.9)
    lr: float
    lr_ref_batch: Optional[int]  # lr is given at this batch size and scaled linearly (MAE)
    min_lr: float  # the floor of the cosine decay
    warmup_fraction: float  # warmup as a fraction of the steps (--warmup-steps: in steps)
    weight_decay: float
    clip_grad: float  # 0: no clipping
    layer_decay: Optional[float]
    drop_path_rate: float
    label_smoothing: float
    mixup: float
    cutmix: float
    randaugment: Optional[str]  # timm RandAugment spec
    random_erasing: float  # probability of timm's RandomErasing (pixel mode, one box)
    head_init_std: float  # 0: zero head (the paper's); > 0: truncated normal weights of this std, zero bias
    global_pool: Optional[str]  # token | avg; None: the checkpoint's
    fc_norm: Optional[bool]  # with avg: a fresh norm after averaging, none per token (MAE); None: the checkpoint's
    train_pos_embed: bool  # a checkpoint's fixed sin-cos position embeddings are trained (MAE) or stay fixed

    def __post_init__(self):
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise EvalError(f"--warmup-fraction {self.warmup_fraction}: use a fraction of the steps in [0, 1)")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise EvalError(f"--layer-decay {self.layer_decay}: use a value in (0, 1] (1: no decay)")


PROTOCOLS = {
    "paper": Protocol(optimizer="momentum", lr=0.01, lr_ref_batch=None, min_lr=0.0, warmup_fraction=0.1, weight_decay=0.0,
                      clip_grad=1.0, layer_decay=None, drop_path_rate=0.0, label_smoothing=0.0, mixup=0.0,
                      cutmix=0.0, randaugment=None, random_erasing=0.0, head_init_std=0.0, global_pool=None,
                      fc_norm=None, train_pos_embed=False),
    # MAE FINETUNE.md (ViT-B: 100 epochs, 5 of warmup); layer decay and drop-path by size: MAE_SIZES
    "mae": Protocol(optimizer="adamw", lr=5e-4, lr_ref_batch=256, min_lr=1e-6, warmup_fraction=0.05, weight_decay=0.05,
                    clip_grad=0.0, layer_decay=0.65, drop_path_rate=0.1, label_smoothing=0.1, mixup=0.8,
                    cutmix=1.0, randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25, head_init_std=2e-5,
                    global_pool="avg", fc_norm=True, train_pos_embed=True),
}
# MAE FINETUNE.md's (token width, layer decay, drop-path) of ViT-B, L and H. A model takes the row
# of the largest of these widths it reaches; narrower ones (Ti, S: 12 layers, as B) take ViT-B's.
MAE_SIZES = ((768, 0.65, 0.1), (1024, 0.75, 0.2), (1280, 0.75, 0.3))
GPU_STEPS, GPU_BATCH = 500, 512  # the paper's short schedule (Pets, Flowers) and batch
CPU_STEPS, CPU_BATCH = 200, 64  # minutes on a laptop CPU
CROP_SCALE = (0.35, 1.0)  # random resized crop; small images have little to spare (ImageNet: 0.08)


@dataclass
class _RunSettings:
    """The settings of a fine-tuning run besides the protocol's (None: chosen per device or checkpoint)."""

    protocol: str = "paper"  # a key of PROTOCOLS
    steps: Optional[int] = None  # GPU_STEPS with a GPU, CPU_STEPS on a CPU
    batch_size: Optional[int] = None  # GPU_BATCH with a GPU, CPU_BATCH on a CPU
    img_size: Optional[int] = None  # the checkpoint's
    warmup_steps: Optional[int] = None  # the protocol's warmup_fraction x the steps
    crop_scale: tuple[float, float] = CROP_SCALE
    seed: int = 0
    label_fraction: float = 1.0
    device: Optional[str] = None  # "cpu": no GPU defaults or bf16 (Accelerate picks the device)
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    num_workers: int = 2
    out: str = "runs"  # the parent folder of the run folders

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise EvalError(f"protocol {self.protocol!r}: use one of {', '.join(PROTOCOLS)}")


# the run's settings, then every Protocol field as an override (None: the protocol's)
FinetuneSettings = dataclasses.make_dataclass(
    "FinetuneSettings", [(name, Optional[hint], None) for name, hint in typing.get_type_hints(Protocol).items()],
    bases=(_RunSettings,), namespace={"__doc__": "What ``build_run`` reads (the command line's flags)."})


def settings_tag(args) -> list[str]:
    """``name_value`` for each setting given on the command line that shapes the run."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Protocol)}
    given.update(steps=args.steps, batch=args.batch_size, img=args.img_size, warmup=args.warmup_steps,
                 seed=args.seed or None, crop=None if tuple(args.crop_scale) == CROP_SCALE else args.crop_scale,
                 labels=None if args.label_fraction == 1.0 else args.label_fraction)
    return [folder_safe(f"{k}_{v}") for k, v in given.items() if v is not None]


def protocol_for(args, width: int) -> Protocol:
    """``--protocol``'s settings for a backbone of token width ``width`` (MAE: layer decay and
    drop-path by size), with every setting given on the command line in their place."""
    protocol = PROTOCOLS[args.protocol]
    if args.protocol == "mae":
        _, layer_decay, drop_path_rate = max((row for row in MAE_SIZES if row[0] <= width), default=MAE_SIZES[0])
        protocol = dataclasses.replace(protocol, layer_decay=layer_decay, drop_path_rate=drop_path_rate)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Protocol) if getattr(args, f.name) is not None}
    return dataclasses.replace(protocol, **overrides)


def finetune_arch(arch: dict, args, protocol: Protocol) -> dict:
    """The checkpoint's architecture as fine-tuned: ``--img-size``, drop-path, pooling (a norm after
    averaging only with average pooling) and sin-cos position embeddings made trainable (their
    values come from the checkpoint through --init)."""
    pool = protocol.global_pool or arch["global_pool"]
    fc_norm = arch["fc_norm"] if protocol.fc_norm is None else protocol.fc_norm and pool == "avg"
    trained_pos = "learned" if protocol.train_pos_embed else arch["pos_embed"]
    return {**arch, "img_size": args.img_size or arch["img_size"], "drop_path_rate": protocol.drop_path_rate,
            "global_pool": pool, "fc_norm": fc_norm, "pos_embed": trained_pos}


def build_run(spec: str, data: str, args) -> RunConfig:
    """The RunConfig of one fine-tuning run: the supervised objective with a new head, the backbone
    initialised from ``spec`` at ``--img-size``."""
    info = backbone_info(spec)  # a clear error for a missing or foreign checkpoint, before training
    protocol = protocol_for(args, token_width(BackboneConfig(**info["arch"])))
    backbone = BackboneConfig(**finetune_arch(info["arch"], args, protocol))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    steps = args.steps or (GPU_STEPS if cuda else CPU_STEPS)
    train = TrainConfig(
        data=data, image_column=args.image_column, label_column=args.label_column, num_workers=args.num_workers,
        crop_scale=tuple(args.crop_scale), randaugment=protocol.randaugment, random_erasing=protocol.random_erasing,
        steps=steps, batch_size=args.batch_size or (GPU_BATCH if cuda else CPU_BATCH), init=spec,
        optimizer=protocol.optimizer, layer_decay=protocol.layer_decay, lr=protocol.lr,
        lr_ref_batch=protocol.lr_ref_batch, min_lr=protocol.min_lr, weight_decay=protocol.weight_decay,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else int(protocol.warmup_fraction * steps),
        clip_grad=protocol.clip_grad, precision="bf16" if cuda else "no", seed=args.seed,
        label_fraction=args.label_fraction,
        out=os.path.join(args.out, "-".join(["finetune", args.protocol, folder_safe(short_name(spec)),
                                             folder_safe(short_name(data)), *settings_tag(args)])),
    )
    objective = SupervisedConfig(label_smoothing=protocol.label_smoothing, mixup=protocol.mixup, cutmix=protocol.cutmix,
                                 zero_head=protocol.head_init_std == 0, head_init_std=protocol.head_init_std)
    return RunConfig("supervised", train, backbone, objective)


def finetune(run: RunConfig) -> tuple[dict, bool]:
    """Train one run; returns its record (without checkpoint/data) and whether this is the main process."""
    trainer = Trainer(run)
    epochs = run.train.steps / trainer.steps_per_epoch
    results = load_checkpoint(trainer.run()).get("results") or {}
    if "test_accuracy" not in results:
        raise EvalError(f"{run.train.data}: the run reported no test accuracy (no labelled test split?)")
    tc, oc, bc = run.train, run.objective_config, run.backbone
    return {
        "accuracy": results["test_accuracy"], "epochs": epochs, "steps": tc.steps, "batch_size": tc.batch_size,
        "lr": tc.lr, "lr_ref_batch": tc.lr_ref_batch, "min_lr": tc.min_lr, "warmup_steps": tc.warmup_steps,
        "optimizer": tc.optimizer, "weight_decay": tc.weight_decay, "layer_decay": tc.layer_decay,
        "clip_grad": tc.clip_grad, "img_size": bc.img_size, "drop_path_rate": bc.drop_path_rate,
        "crop_fraction": eval_crop_fraction(bc.img_size),  # the test transform's (the training loop's)
        "global_pool": bc.global_pool, "fc_norm": bc.fc_norm, "pos_embed": bc.pos_embed,
        "head_init_std": oc.head_init_std, "label_smoothing": oc.label_smoothing, "mixup": oc.mixup,
        "cutmix": oc.cutmix, "randaugment": tc.randaugment, "random_erasing": tc.random_erasing,
        "crop_scale": list(tc.crop_scale), "label_fraction": tc.label_fraction, "run": trainer.out,
    }, trainer.acc.is_main_process
