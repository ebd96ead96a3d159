"""Linear probe on a frozen backbone from the command line: on cached features (fast), or DINO's
protocol on augmented images; the protocols are ``ssl_vit.evaluation.linear``.

    python -m eval.linear CKPT [CKPT ...] --data NAME_OR_PATH [--protocol cached|dino] [--epochs 100] [--bn]

Both follow DINO's ``eval_linear.py``: a linear layer (weights N(0, 0.01), zero bias) trained with
SGD, momentum 0.9, no weight decay, lr = base lr x batch / 256, cosine decay to 0, cross-entropy;
``--bn`` puts MAE's non-affine BatchNorm (eps 1e-6) in front of it. Reported: the test accuracy
after the last epoch.

``--protocol cached`` (the default) trains on the cached representations (``backbone(images)``, no
augmentation): batch 256, base lr 0.1, the cosine steps per batch. ``--protocol dino`` is DINO's
recipe (fresh RandomResizedCrop and flip per batch, the class tokens of the last 4 blocks or, from
width 768 on, the last block with its mean patch token; base lr 0.001; batch 1024 with a GPU, 128
on a CPU). ``ssl_vit.evaluation.linear`` says more of each.
"""

from __future__ import annotations

import argparse
from typing import Optional

from ssl_vit.data.subsets import check_fraction
from ssl_vit.evaluation.linear import (CACHED_BATCH, DEFAULT_EPOCHS, DEFAULT_LR, DINO_BATCH_CPU, DINO_BATCH_GPU,
                                       LR_REF_BATCH, PROTOCOLS, ProbeSettings, dino_linear_probe, linear_probe)

from .common import EvalError, data_specs, percent, positive_int, print_table, resolve_device, run_cli, write_json
from .features import each_features, extractors, feature_parser, first_fields


def dino_records(args: argparse.Namespace, s: ProbeSettings) -> list[dict]:
    records = []
    for extractor in extractors(args):
        for data in data_specs(args):
            result = dino_linear_probe(extractor, data, s, args.n_last_blocks, args.avgpool_patchtokens,
                                       args.image_column, args.label_column, args.max_train, args.max_test)
            records.append({**first_fields(extractor, data), **result})
    return records


# ----- the command line -----
def settings(args: argparse.Namespace) -> ProbeSettings:
    """The protocol's defaults, overridden by the flags given; DINO-only flags refused elsewhere."""
    dino = args.protocol == "dino"
    if not dino and (args.n_last_blocks is not None or args.avgpool_patchtokens is not None):
        raise EvalError("--n-last-blocks and --avgpool-patchtokens set DINO's features: add --protocol dino")
    cuda = resolve_device(args.device).type == "cuda"
    batch = CACHED_BATCH if not dino else DINO_BATCH_GPU if cuda else DINO_BATCH_CPU
    return ProbeSettings(args.epochs, args.lr if args.lr is not None else DEFAULT_LR[args.protocol],
                         args.probe_batch_size or batch, args.bn, args.momentum, args.weight_decay, args.seed,
                         check_fraction(args.label_fraction))


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = feature_parser(__doc__)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="cached",
                        help="cached: a fast probe on cached features; dino: DINO's eval_linear (see above)")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS)
    parser.add_argument("--lr", type=float, default=None,
                        help=f"base lr at batch {LR_REF_BATCH} (default: cached 0.1, dino 0.001)")
    parser.add_argument("--probe-batch-size", type=positive_int, default=None,
                        help=f"examples per SGD step (default: cached {CACHED_BATCH}; dino {DINO_BATCH_GPU} with "
                             f"a GPU, {DINO_BATCH_CPU} on a CPU); --batch-size is the extraction batch")
    parser.add_argument("--bn", action="store_true", help="MAE's non-affine BatchNorm before the linear layer")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-fraction", type=float, default=1.0,
                        help="train on this fraction of each class's labelled training images (0.01, 0.1: the "
                             "1%% / 10%% protocols), chosen by --seed; the test set stays whole")
    parser.add_argument("--n-last-blocks", type=positive_int, default=None,
                        help="dino: class tokens of this many last blocks (default: 4, or 1 from width 768 on)")
    parser.add_argument("--avgpool-patchtokens", action=argparse.BooleanOptionalAction, default=None,
                        help="dino: add the mean patch token of the last block (default: from width 768 on)")
    args = parser.parse_args(argv)
    s = settings(args)
    if args.protocol == "dino":
        records = dino_records(args, s)
    else:
        device = resolve_device(args.device)
        records = [{**first, **linear_probe(feats, s, device)} for first, feats in each_features(args)]
    print_table(["checkpoint", "data", "accuracy (%)", "protocol", "labels", "epochs", "lr", "bn"],
                [[r["checkpoint"], r["data"], percent(r["accuracy"]), r["protocol"], f"{r['label_fraction']:.0%}",
                  r["epochs"], f"{r['lr']:g}", r["bn"]] for r in records], "linear probe on a frozen backbone")
    write_json(args.json, records)
    return records


if __name__ == "__main__":
    run_cli(main)
