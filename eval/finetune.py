"""Fine-tuning: the whole backbone plus a new zero-initialised linear head, through the ONE training
loop (``ssl_vit.train.Trainer``, on Accelerate: ``accelerate launch -m eval.finetune ...`` runs it
on many GPUs).

    python -m eval.finetune CKPT [CKPT ...] --data NAME_OR_PATH [--protocol paper|mae] [--img-size 64]

``--protocol paper`` (ViT paper section 3.2, appendix B.1.1): SGD with momentum 0.9 (not Nesterov),
no weight decay, gradient clipping at norm 1, linear warmup then cosine decay, zero-initialised
D x K head, batch 512; the paper's CIFAR grid is 10k steps with lr in {0.001, 0.003, 0.01, 0.03}.
``--protocol mae`` (MAE ``main_finetune.py``): AdamW, lr 5e-4 x batch / 256, weight decay 0.05,
layer-wise lr decay 0.65 (layers from timm's ``group_matcher``), drop-path 0.1, Mixup 0.8 /
CutMix 1.0, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1 (timm), no clipping.

``--img-size`` larger than the checkpoint's keeps the patch size and resamples the position
embeddings in 2-D. Defaults: batch 512 and 500 steps on a GPU; 64 and 200 steps on a CPU (so a
run takes minutes); warmup 10% of the steps. Each (checkpoint, data) pair trains in its own run
folder ``<--out>/finetune-<protocol>-<checkpoint>-<data>[-<settings>]`` (config.json,
metrics.jsonl, ckpt.pt), where ``<settings>`` names every setting given on the command line
(``lr_0.003-steps_500``), so runs that differ only in settings never share a folder; the reported
accuracy is the Trainer's test accuracy at the last step.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ssl_vit.backbone import BackboneConfig
from ssl_vit.checkpoint import backbone_info, load_checkpoint
from ssl_vit.config import RunConfig, TrainConfig
from ssl_vit.data import eval_crop_fraction
from ssl_vit.names import folder_safe, short_name
from ssl_vit.objectives.supervised import SupervisedConfig
from ssl_vit.train import Trainer

from .common import EvalError, base_parser, data_specs, percent, positive_int, print_table, run_cli, write_json
from .features import labelled_source


@dataclass(frozen=True)
class Protocol:
    optimizer: str  # a timm optimizer name ("momentum" is SGD with classical momentum 0.9)
    lr: float
    lr_ref_batch: Optional[int]  # lr is given at this batch size and scaled linearly (MAE)
    weight_decay: float
    clip_grad: float  # 0: no clipping
    layer_decay: Optional[float]
    drop_path_rate: float
    label_smoothing: float
    mixup: float
    cutmix: float
    randaugment: Optional[str]  # timm RandAugment spec


PROTOCOLS = {
    "paper": Protocol("momentum", 0.01, None, 0.0, 1.0, None, 0.0, 0.0, 0.0, 0.0, None),
    "mae": Protocol("adamw", 5e-4, 256, 0.05, 0.0, 0.65, 0.1, 0.1, 0.8, 1.0, "rand-m9-mstd0.5-inc1"),
}
GPU_STEPS, GPU_BATCH = 500, 512  # the paper's short schedule (Pets, Flowers) and batch
CPU_STEPS, CPU_BATCH = 200, 64  # minutes on a laptop CPU
CROP_SCALE = (0.35, 1.0)  # random resized crop; small images have little to spare (ImageNet: 0.08)


def settings_tag(args) -> list[str]:
    """``name_value`` for each setting given on the command line that shapes the run."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Protocol)}
    given.update(steps=args.steps, batch=args.batch_size, img=args.img_size, warmup=args.warmup_steps,
                 seed=args.seed or None, crop=None if tuple(args.crop_scale) == CROP_SCALE else args.crop_scale)
    return [folder_safe(f"{k}_{v}") for k, v in given.items() if v is not None]


def build_run(spec: str, data: str, args, protocol: Protocol) -> RunConfig:
    """The RunConfig of one fine-tuning run: the supervised objective with a zero-initialised head,
    the backbone initialised from ``spec`` at ``--img-size``."""
    info = backbone_info(spec)  # a clear error for a missing or foreign checkpoint, before training
    arch = dict(info["arch"])
    arch["img_size"] = args.img_size or arch["img_size"]
    arch["drop_path_rate"] = protocol.drop_path_rate
    cuda = torch.cuda.is_available() and args.device != "cpu"
    train = TrainConfig(
        data=data, image_column=args.image_column, label_column=args.label_column, num_workers=args.num_workers,
        crop_scale=tuple(args.crop_scale), randaugment=protocol.randaugment, steps=args.steps or (GPU_STEPS if cuda else CPU_STEPS),
        batch_size=args.batch_size or (GPU_BATCH if cuda else CPU_BATCH), init=spec,
        optimizer=protocol.optimizer, layer_decay=protocol.layer_decay, lr=protocol.lr,
        lr_ref_batch=protocol.lr_ref_batch, warmup_steps=args.warmup_steps, weight_decay=protocol.weight_decay,
        clip_grad=protocol.clip_grad, precision="bf16" if cuda else "no", seed=args.seed,
        out=os.path.join(args.out, "-".join(["finetune", args.protocol, folder_safe(short_name(spec)),
                                             folder_safe(short_name(data)), *settings_tag(args)])),
    )
    objective = SupervisedConfig(label_smoothing=protocol.label_smoothing, mixup=protocol.mixup,
                                 cutmix=protocol.cutmix, zero_head=True)
    return RunConfig("supervised", train, BackboneConfig(**arch), objective)


def finetune(run: RunConfig) -> tuple[dict, bool]:
    """Train one run; returns its record (without checkpoint/data) and whether this is the main process."""
    trainer = Trainer(run)
    epochs = run.train.steps / trainer.steps_per_epoch
    results = load_checkpoint(trainer.run()).get("results") or {}
    if "test_accuracy" not in results:
        raise EvalError(f"{run.train.data}: the run reported no test accuracy (no labelled test split?)")
    tc, oc = run.train, run.objective_config
    return {
        "accuracy": results["test_accuracy"], "epochs": epochs, "steps": tc.steps, "batch_size": tc.batch_size,
        "lr": tc.lr, "lr_ref_batch": tc.lr_ref_batch, "optimizer": tc.optimizer, "weight_decay": tc.weight_decay,
        "layer_decay": tc.layer_decay, "clip_grad": tc.clip_grad, "img_size": run.backbone.img_size,
        "crop_fraction": eval_crop_fraction(run.backbone.img_size),  # the test transform's (the training loop's)
        "drop_path_rate": run.backbone.drop_path_rate, "label_smoothing": oc.label_smoothing, "mixup": oc.mixup,
        "cutmix": oc.cutmix, "randaugment": tc.randaugment, "run": trainer.out,
    }, trainer.acc.is_main_process


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = base_parser(__doc__, batch_size=None,
                         batch_help=f"images per optimizer step over all processes (default: {GPU_BATCH} "
                                    f"with a GPU, {CPU_BATCH} on a CPU)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"optimizer steps (default: {GPU_STEPS} with a GPU, {CPU_STEPS} on a CPU)")
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="fine-tuning resolution (default: the checkpoint's); larger resamples the "
                             "position embeddings")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=CROP_SCALE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs", help="parent folder of the run folders")
    for f in dataclasses.fields(Protocol):  # every protocol setting can be overridden
        kind = str if f.name in ("optimizer", "randaugment") else int if f.name == "lr_ref_batch" else float
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            help="default: the protocol's (" + ", ".join(
                                f"{n}: {getattr(p, f.name)}" for n, p in PROTOCOLS.items()) + ")")
    args = parser.parse_args(argv)
    if args.device not in (None, "cpu"):
        raise EvalError(f"--device {args.device}: fine-tuning runs on Accelerate, which picks the GPUs; "
                        "choose them with CUDA_VISIBLE_DEVICES or accelerate launch, or pass --device cpu")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Protocol)
                 if getattr(args, f.name) is not None}
    protocol = dataclasses.replace(PROTOCOLS[args.protocol], **overrides)

    records, main_process = [], True
    for spec in args.checkpoints:
        for data in data_specs(args):
            labelled_source(data, args.image_column, args.label_column)  # evaluation needs labels
            record, main_process = finetune(build_run(spec, data, args, protocol))
            records.append({"checkpoint": spec, "data": data, "protocol": args.protocol, **record})
    if main_process:
        print_table(["checkpoint", "data", "accuracy (%)", "steps", "epochs", "img_size", "run"],
                    [[r["checkpoint"], r["data"], percent(r["accuracy"]), r["steps"], f"{r['epochs']:.2f}",
                      r["img_size"], r["run"]] for r in records], f"fine-tuning ({args.protocol} protocol)")
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    run_cli(main)
