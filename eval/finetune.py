"""Fine-tuning: the whole backbone plus a new linear head, through the ONE training
loop (``ssl_vit.train.Trainer``, on Accelerate: ``accelerate launch -m eval.finetune ...`` runs it
on many GPUs). The protocols and runs are ``ssl_vit.evaluation.finetune``; this is their command line.

    python -m eval.finetune CKPT [CKPT ...] --data NAME_OR_PATH [--protocol paper|mae] [--img-size 64]

``--protocol paper`` (ViT paper section 3.2, appendix B.1.1): SGD with momentum 0.9 (not Nesterov),
no weight decay, gradient clipping at norm 1, linear warmup (10% of the steps) then cosine decay to
0, zero-initialised D x K head, the checkpoint's pooling, batch 512; the paper's CIFAR grid is 10k
steps with lr in {0.001, 0.003, 0.01, 0.03}.
``--protocol mae`` (MAE ``main_finetune.py``, ``models_vit.py`` and FINETUNE.md): AdamW, lr 5e-4 x
batch / 256, weight decay 0.05, warmup 5% of the steps (5 of 100 epochs) then cosine decay to 1e-6,
layer-wise lr decay (layers from timm's ``group_matcher``) and drop-path by width (``MAE_SIZES``),
Mixup 0.8 / CutMix 1.0, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1 and random erasing
0.25 (timm), no clipping; the head's weights from a truncated normal of std 2e-5 and a zero bias;
global average pooling of the patch tokens then a fresh LayerNorm, the final per-token norm dropped
(``fc_norm``, as ``models_vit.py`` with ``global_pool``); fixed sin-cos position embeddings become
trainable ones (MAE loads them into a learnable ``pos_embed``). Every setting has its flag.

``--img-size`` larger than the checkpoint's keeps the patch size and resamples the position
embeddings in 2-D. Defaults: batch 512 and 500 steps on a GPU; 64 and 200 steps on a CPU (so a
run takes minutes). Each (checkpoint, data) pair trains in its own run
folder ``<--out>/finetune-<protocol>-<checkpoint>-<data>[-<settings>]`` (config.json,
metrics.jsonl, ckpt.pt), where ``<settings>`` names every setting given on the command line
(``lr_0.003-steps_500``), so runs that differ only in settings never share a folder; the reported
accuracy is the Trainer's test accuracy at the last step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Optional

from ssl_vit.config import unwrap_optional
from ssl_vit.evaluation.features import labelled_source
from ssl_vit.train import end_processes
from ssl_vit.evaluation.finetune import (CPU_BATCH, CPU_STEPS, GPU_BATCH, GPU_STEPS, MAE_SIZES, PROTOCOLS,
                                         FinetuneSettings, Protocol, build_run, finetune)

from .common import EvalError, base_parser, data_specs, percent, positive_int, print_table, run_cli, write_json


def protocol_help(name: str) -> str:
    """The --help line of a protocol setting: each protocol's default."""
    defaults = {n: getattr(p, name) for n, p in PROTOCOLS.items()}
    if name in ("layer_decay", "drop_path_rate"):
        column = 1 if name == "layer_decay" else 2
        sizes = zip(("ViT-B and narrower", "ViT-L", "ViT-H"), MAE_SIZES)
        defaults["mae"] = "by width (" + ", ".join(f"{n} ({row[0]}): {row[column]}" for n, row in sizes) + ")"
    return "default: the protocol's (" + ", ".join(f"{n}: {v}" for n, v in defaults.items()) + ")"


def build_parser():
    parser = base_parser(__doc__, batch_size=None,
                         batch_help=f"images per optimizer step over all processes (default: {GPU_BATCH} "
                                    f"with a GPU, {CPU_BATCH} on a CPU)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS))
    parser.add_argument("--steps", type=positive_int,
                        help=f"optimizer steps (default: {GPU_STEPS} with a GPU, {CPU_STEPS} on a CPU)")
    parser.add_argument("--img-size", type=positive_int,
                        help="fine-tuning resolution (default: the checkpoint's); larger resamples the "
                             "position embeddings")
    parser.add_argument("--warmup-steps", type=int, help="default: --warmup-fraction x the steps")
    parser.add_argument("--crop-scale", type=float, nargs=2)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--label-fraction", type=float,
                        help="train on this fraction of each class's labelled training images (0.01, 0.1: the "
                             "1%% / 10%% protocols), chosen by --seed; the test set stays whole")
    parser.add_argument("--out", help="parent folder of the run folders")
    hints = typing.get_type_hints(Protocol)
    for f in dataclasses.fields(Protocol):  # every protocol setting can be overridden
        kind, _ = unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=protocol_help(f.name))
        else:
            parser.add_argument(flag, type=kind, help=protocol_help(f.name))
    parser.set_defaults(**dataclasses.asdict(FinetuneSettings()))  # the library's defaults, one home
    return parser


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.device not in (None, "cpu"):
        raise EvalError(f"--device {args.device}: fine-tuning runs on Accelerate, which picks the GPUs; "
                        "choose them with CUDA_VISIBLE_DEVICES or accelerate launch, or pass --device cpu")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    runs = []  # every setting, checkpoint and data set checked before the first run trains
    for spec in args.checkpoints:
        for data in data_specs(args):
            labelled_source(data, args.image_column, args.label_column)  # evaluation needs labels
            runs.append((spec, data, build_run(spec, data, args)))
    records, main_process = [], True
    for spec, data, run in runs:
        record, main_process = finetune(run)
        records.append({"checkpoint": spec, "data": data, "protocol": args.protocol, **record})
    end_processes()  # after every run: each trains in the same processes
    if main_process:
        print_table(["checkpoint", "data", "accuracy (%)", "steps", "epochs", "img_size", "run"],
                    [[r["checkpoint"], r["data"], percent(r["accuracy"]), r["steps"], f"{r['epochs']:.2f}",
                      r["img_size"], r["run"]] for r in records], f"fine-tuning ({args.protocol} protocol)")
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    run_cli(main)
