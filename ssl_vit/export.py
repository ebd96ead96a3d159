"""``python -m ssl_vit.export CKPT OUT.safetensors [--student]``: the backbone alone, for timm."""

import argparse

from .checkpoint import export_safetensors
from .errors import run_cli


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--student", action="store_true", help="export a DINO or MSN run's student instead of its teacher")
    args = parser.parse_args(argv)
    export_safetensors(args.checkpoint, args.out, student=args.student)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
