"""Weighted k-nearest-neighbour classification on frozen features (DINO's ``eval_knn.py``) from the
command line; the protocol is ``ssl_vit.evaluation.knn``.

    python -m eval.knn CKPT [CKPT ...] --data NAME_OR_PATH [--k 10 20 100 200] [--temperature 0.07]

Features are L2-normalised; each test image's k most cosine-similar training images vote for
their class with weight exp(similarity / T), T = 0.07; the class with the largest summed vote
wins. k = 20 is DINO's headline figure.
"""

from __future__ import annotations

from typing import Optional

from ssl_vit.evaluation.knn import DEFAULT_KS, TEMPERATURE, knn

from .common import EvalError, percent, pivot_table, positive_int, resolve_device, run_cli, write_json
from .features import each_features, feature_parser


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = feature_parser(__doc__)
    parser.add_argument("--k", type=positive_int, nargs="+", default=list(DEFAULT_KS),
                        help="numbers of neighbours (default: 10 20 100 200)")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="T of the exp(sim / T) votes")
    args = parser.parse_args(argv)
    if args.temperature <= 0:
        raise EvalError(f"--temperature {args.temperature}: must be > 0")
    device, records = resolve_device(args.device), []
    for first, feats in each_features(args):
        records += [{**first, **r} for r in knn(feats, args.k, args.temperature, device)]
    pivot_table(records, "k", lambda r: percent(r["accuracy"]),
                f"weighted kNN accuracy (%, cosine, T = {args.temperature:g})")
    write_json(args.json, records)
    return records


if __name__ == "__main__":
    run_cli(main)
