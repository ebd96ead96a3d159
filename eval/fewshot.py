"""Few-shot linear evaluation (ViT paper section 4.1) from the command line; the protocol is
``ssl_vit.evaluation.fewshot``.

    python -m eval.fewshot CKPT [CKPT ...] --data NAME_OR_PATH [--shots 1 5 10 25] [--seeds 3] [--l2 sweep]

For each seed, k training images per class are drawn from the train features; the features are
standardised with that few-shot set's mean and std, a constant bias feature is appended, the
targets are {-1, 1}^K, and a regularised least-squares classifier is solved in closed form and
scored by argmax on the test set. Reported: mean and std (over seeds) of the test accuracy.
"""

from __future__ import annotations

import argparse
from typing import Optional

from ssl_vit.evaluation.fewshot import DEFAULT_L2, DEFAULT_SHOTS, DEFAULT_VAL_SIZE, L2, fewshot

from .common import percent, pivot_table, positive_int, resolve_device, run_cli, write_json
from .features import each_features, feature_parser


def l2_arg(text: str) -> L2:
    if text == "sweep":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a penalty (e.g. 1024) or 'sweep'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: the penalty must be > 0")
    return value


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = feature_parser(__doc__)
    parser.add_argument("--shots", type=positive_int, nargs="+", default=list(DEFAULT_SHOTS),
                        help="images per class (default: 1 5 10 25)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="random few-shot draws per shot count")
    parser.add_argument("--l2", type=l2_arg, default=DEFAULT_L2,
                        help="ridge penalty (default 2^10 = 1024, big_vision's), or 'sweep': per seed, the "
                             "best of 2^-10..2^19 on held-out training images; the record then lists one per seed")
    parser.add_argument("--val-size", type=positive_int, default=DEFAULT_VAL_SIZE,
                        help="held-out training images per seed for --l2 sweep")
    args = parser.parse_args(argv)
    device, records = resolve_device(args.device), []
    for first, feats in each_features(args):
        for r in fewshot(feats, args.shots, args.seeds, args.l2, args.val_size, device):
            records.append({**first, **r})
    pivot_table(records, "shots", lambda r: f"{percent(r['accuracy'])} ± {percent(r['accuracy_std'])}",
                f"few-shot linear accuracy (%, mean ± std over {args.seeds} seeds, l2 "
                f"{'sweep' if args.l2 == 'sweep' else f'{args.l2:g}'})")
    write_json(args.json, records)
    return records


if __name__ == "__main__":
    run_cli(main)
