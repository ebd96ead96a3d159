"""Export a checkpoint's backbone for timm or for Hugging Face transformers.

    python -m ssl_vit.export CKPT OUT.safetensors [--student]          # timm (the default format)
    python -m ssl_vit.export CKPT OUT_DIR --format hf [--student] [--eval-json FILE ...] \\
        [--push-to-hub REPO_ID [--private]]

``--format hf`` writes a folder that ``transformers.ViTModel.from_pretrained(OUT_DIR,
add_pooling_layer=False)`` loads, with its image processor and a model card (``ssl_vit.hf_export``,
``ssl_vit.model_card``); ``--push-to-hub`` then uploads it (a token from ``huggingface-cli login`` or
HF_TOKEN is checked before anything is written).
"""

import argparse

from .checkpoint import export_safetensors
from .errors import UserError, run_cli

HF_ONLY = ("eval_json", "push_to_hub", "private")


def check_flags(args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in HF_ONLY if getattr(args, name)]
    if args.format == "timm" and given:
        raise UserError(f"{', '.join(given)} go with --format hf (the timm export is one file, without a model card)")
    if args.private and not args.push_to_hub:
        raise UserError("--private makes the repository of --push-to-hub REPO_ID private: add --push-to-hub")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="OUT.safetensors (timm), or a folder (--format hf)")
    parser.add_argument("--format", choices=("timm", "hf"), default="timm",
                        help="timm: safetensors for timm.create_model (default); hf: a transformers ViTModel folder")
    parser.add_argument("--student", action="store_true", help="export a DINO or MSN run's student instead of its teacher")
    parser.add_argument("--eval-json", nargs="+", default=[], metavar="FILE",
                        help="hf: records that eval commands wrote with --json; this checkpoint's go into the card")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="hf: upload the folder to this Hub model repository")
    parser.add_argument("--private", action="store_true", help="hf: make the --push-to-hub repository private")
    args = parser.parse_args(argv)
    check_flags(args)
    if args.format == "timm":
        export_safetensors(args.checkpoint, args.out, student=args.student)
    else:
        from .hf_export import export_hf

        export_hf(args.checkpoint, args.out, args.student, args.eval_json, args.push_to_hub, args.private)
    print(f"wrote {args.out}" + (f" and uploaded it to {args.push_to_hub}" if args.push_to_hub else ""))


if __name__ == "__main__":
    run_cli(main)
