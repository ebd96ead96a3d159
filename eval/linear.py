"""Linear probe on frozen features, trained on the cached feature tensors (no image is decoded twice).

    python -m eval.linear CKPT [CKPT ...] --data NAME_OR_PATH [--epochs 100] [--lr 0.1] [--bn]

DINO's ``eval_linear.py``: a linear layer (weights N(0, 0.01), zero bias) trained with SGD,
momentum 0.9, no weight decay, lr = base lr x batch / 256, cosine decay to 0 over all steps,
cross-entropy; ``--bn`` puts MAE's non-affine BatchNorm (eps 1e-6) in front of it. Reported: the
test accuracy after the last epoch.

Defaults chosen here, on cached features without augmentation: 100 epochs (DINO's), batch 256,
base lr 0.1 rather than DINO's 0.001, because one epoch over cached features is cheap and the
features of an untrained or briefly trained backbone are small and spread over many dimensions;
use ``--lr`` to sweep as DINO's grid does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import percent, positive_int, print_table, resolve_device, run_cli, write_json
from .features import Features, each_features, feature_parser

DEFAULT_EPOCHS = 100
DEFAULT_BATCH = 256
DEFAULT_LR = 0.1  # base lr at batch 256 (scaled linearly with --probe-batch-size)
LR_REF_BATCH = 256
BN_EPS = 1e-6  # MAE's linear-probe BatchNorm


def linear_probe(features: Features, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR,
                 batch_size: int = DEFAULT_BATCH, bn: bool = False, momentum: float = 0.9,
                 weight_decay: float = 0.0, seed: int = 0, device: Optional[torch.device] = None) -> dict:
    """Train on the train features [N, D], return the test accuracy and the settings."""
    device = device or features.train.device
    train, train_y = features.train.to(device), features.train_labels.to(device)
    g = torch.Generator().manual_seed(seed)
    dim = train.shape[1]
    head = nn.Linear(dim, features.num_classes)
    nn.init.normal_(head.weight, std=0.01, generator=g)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=BN_EPS), head) if bn else head
    model.to(device)
    peak = lr * batch_size / LR_REF_BATCH
    optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = -(-len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g).to(device)
        for start in range(0, len(train), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(train[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predictions = model(features.test.to(device)).argmax(1)
    accuracy = (predictions == features.test_labels.to(device)).float().mean().item()
    return {"accuracy": accuracy, "epochs": epochs, "lr": lr, "batch_size": batch_size, "bn": bn,
            "momentum": momentum, "weight_decay": weight_decay, "seed": seed}


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = feature_parser(__doc__)
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"base lr at batch {LR_REF_BATCH}")
    parser.add_argument("--probe-batch-size", type=positive_int, default=DEFAULT_BATCH,
                        help="feature vectors per SGD step (--batch-size is the extraction batch)")
    parser.add_argument("--bn", action="store_true", help="MAE's non-affine BatchNorm before the linear layer")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device, records = resolve_device(args.device), []
    for ckpt, data, feats in each_features(args):
        result = linear_probe(feats, args.epochs, args.lr, args.probe_batch_size, args.bn, args.momentum,
                              args.weight_decay, args.seed, device)
        records.append({"checkpoint": ckpt, "data": data, **result})
    print_table(["checkpoint", "data", "accuracy (%)", "epochs", "lr", "bn"],
                [[r["checkpoint"], r["data"], percent(r["accuracy"]), r["epochs"], f"{r['lr']:g}", r["bn"]]
                 for r in records], "linear probe on frozen features")
    write_json(args.json, records)
    return records


if __name__ == "__main__":
    run_cli(main)
