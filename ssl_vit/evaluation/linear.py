"""Linear probe on a frozen backbone: on cached features (fast), or DINO's protocol on augmented images.

    linear_probe(features, ProbeSettings(...)) -> record        (the cached protocol)
    dino_linear_probe(extractor, data, ProbeSettings(lr=0.001, ...)) -> record
    (command line: python -m eval.linear CKPT --data NAME_OR_PATH [--protocol cached|dino] [--epochs 100] [--bn])

Both follow DINO's ``eval_linear.py``: a linear layer (weights N(0, 0.01), zero bias) trained with
SGD, momentum 0.9, no weight decay, lr = base lr x batch / 256, cosine decay to 0, cross-entropy;
``--bn`` puts MAE's non-affine BatchNorm (eps 1e-6) in front of it. Reported: the test accuracy
after the last epoch.

``--protocol cached`` (the default) trains on the cached representations (``backbone(images)``, no
augmentation: one epoch costs almost nothing). Defaults chosen here: batch 256, base lr 0.1 rather
than DINO's 0.001, because the features of an untrained or briefly trained backbone are small and
spread over many dimensions; the cosine steps per batch. Use ``--lr`` to sweep as DINO's grid does.

``--protocol dino`` is DINO's recipe: each batch is a fresh RandomResizedCrop (scale 0.08-1) and
horizontal flip of the training images, run through the frozen backbone; the features are the
class tokens, each after the final norm, of the last 4 blocks (embed dim < 768, ViT-S and smaller),
or of the last block with the mean of its patch tokens (ViT-B and wider); base lr 0.001, the cosine
steps once per epoch; batch 1024 with a GPU as DINO's 8 x 128, 128 (one of its GPUs' share) on a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..backbone import Backbone
from ..data import EpochSampler, ImageDataset, make_loader, train_transform
from ..data.subsets import class_balanced_subset
from ..errors import EvalError
from .features import Features, FeatureExtractor, check_labels, extract, frozen_autocast, image_split, labelled_source

PROTOCOLS = ("cached", "dino")
DEFAULT_EPOCHS = 100
DEFAULT_LR = {"cached": 0.1, "dino": 0.001}  # base lr at batch 256 (scaled linearly with --probe-batch-size)
CACHED_BATCH = 256
DINO_BATCH_GPU, DINO_BATCH_CPU = 1024, 128  # DINO: 8 GPUs x 128
LR_REF_BATCH = 256
BN_EPS = 1e-6  # MAE's linear-probe BatchNorm
DINO_WIDE = 768  # from ViT-B's width on, DINO reads 1 block and average-pools the patch tokens
DINO_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as DINO uses it


@dataclass
class ProbeSettings:
    """The optimisation of either protocol (recorded with every result)."""

    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR["cached"]
    batch_size: int = CACHED_BATCH
    bn: bool = False
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    label_fraction: float = 1.0  # train on this class-balanced, seeded fraction of the labelled train set


def probe_model(dim: int, num_classes: int, bn: bool, generator: torch.Generator) -> nn.Module:
    """DINO's linear layer (weights N(0, 0.01), zero bias), after MAE's BatchNorm with ``bn``."""
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, std=0.01, generator=generator)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=BN_EPS), head) if bn else head


def sgd(model: nn.Module, s: ProbeSettings) -> torch.optim.SGD:
    """SGD at the peak lr: base lr x batch / 256."""
    return torch.optim.SGD(model.parameters(), lr=s.lr * s.batch_size / LR_REF_BATCH, momentum=s.momentum,
                           weight_decay=s.weight_decay)


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


# ----- the cached-feature probe -----
def linear_probe(features: Features, s: Optional[ProbeSettings] = None,
                 device: Optional[torch.device] = None) -> dict:
    """Train on the train features [N, D], return the test accuracy and the settings."""
    s, device = s or ProbeSettings(), device or features.train.device
    keep = class_balanced_subset(features.train_labels, s.label_fraction, s.seed)
    train, train_y = features.train[keep].to(device), features.train_labels[keep].to(device)
    g = torch.Generator().manual_seed(s.seed)
    model = probe_model(train.shape[1], features.num_classes, s.bn, g).to(device)
    optimizer = sgd(model, s)
    steps_per_epoch = -(-len(train) // s.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs * steps_per_epoch)
    model.train()
    for _ in range(s.epochs):
        order = torch.randperm(len(train), generator=g).to(device)
        for start in range(0, len(train), s.batch_size):
            idx = order[start:start + s.batch_size]
            sgd_step(model, optimizer, train[idx], train_y[idx])
            schedule.step()
    test_accuracy = accuracy(model, features.test.to(device), features.test_labels.to(device))
    return {"protocol": "cached", "accuracy": test_accuracy, **dataclasses.asdict(s)}


# ----- DINO's protocol -----
def dino_layout(embed_dim: int, n_last_blocks: Optional[int] = None,
                avgpool_patchtokens: Optional[bool] = None) -> tuple[int, bool]:
    """(blocks whose class tokens are read, whether the mean patch token is added): DINO's choice for
    the width unless given (ViT-S and smaller: 4, no; ViT-B and wider: 1, yes)."""
    wide = embed_dim >= DINO_WIDE
    n = n_last_blocks if n_last_blocks is not None else (1 if wide else 4)
    return n, wide if avgpool_patchtokens is None else avgpool_patchtokens


def dino_features(backbone: Backbone, images: torch.Tensor, n_last_blocks: int,
                  avgpool_patchtokens: bool) -> torch.Tensor:
    """[B, C, H, W] -> [B, (n + avgpool) x D]: the class tokens of the last n blocks, each after the
    final norm (DINO's ``get_intermediate_layers``), then the mean of the last block's normed patch tokens.
    With a distillation token each block gives the mean of its class and distillation tokens, as the
    backbone's representation does (DeiT)."""
    layers = backbone.vit.forward_intermediates(images, indices=n_last_blocks, norm=True, return_prefix_tokens=True,
                                                output_fmt="NLC", intermediates_only=True)  # [(patches, prefix)]
    parts = [backbone.pooled_prefix(prefix) for _, prefix in layers]  # [B, D] each
    if avgpool_patchtokens:
        parts.append(layers[-1][0].mean(dim=1))
    return torch.cat(parts, dim=-1)


def check_dino_backbone(backbone: Backbone, spec: str, n_last_blocks: int) -> None:
    """Refuse, with one line, a backbone whose DINO features are not defined."""
    vit = backbone.vit
    if vit.cls_token is None:
        raise EvalError(f"{spec} has no class token: --protocol dino reads class tokens; use --protocol cached")
    if backbone.cfg.fc_norm:
        raise EvalError(f"{spec} normalises after average pooling (--fc-norm), so its tokens have no final norm "
                        "for --protocol dino to read; use --protocol cached")
    if not 1 <= n_last_blocks <= len(vit.blocks):
        raise EvalError(f"--n-last-blocks {n_last_blocks}: {spec} has {len(vit.blocks)} blocks; "
                        f"use 1..{len(vit.blocks)}")


def train_dino_probe(represent, model: nn.Module, train: ImageDataset, s: ProbeSettings, num_workers: int,
                     device: torch.device, check: Callable[[torch.Tensor], None]) -> None:
    """SGD over freshly augmented batches through the frozen backbone; the cosine steps per epoch (DINO)."""
    optimizer = sgd(model, s)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs)
    sampler = EpochSampler(len(train), s.batch_size, seed=s.seed, drop_last=False)
    loader = make_loader(train, sampler, num_workers, pin_memory=device.type == "cuda")
    for epoch in tqdm(range(s.epochs), desc="linear probe (dino)", unit="epoch"):
        sampler.set_epoch(epoch)  # new crops every epoch: the dataset augments under (seed, epoch, index)
        model.train()
        for batch in loader:
            if "image" not in batch:  # every image of this batch was unreadable
                continue
            check(batch["label"])
            with torch.no_grad(), frozen_autocast(device):
                x = represent(batch["image"].to(device, non_blocking=True))
            sgd_step(model, optimizer, x.float(), batch["label"].to(device))
        schedule.step()


def dino_linear_probe(extractor: FeatureExtractor, data: str, s: ProbeSettings, n_last_blocks: Optional[int] = None,
                      avgpool_patchtokens: Optional[bool] = None, image_column: Optional[str] = None,
                      label_column: Optional[str] = None, max_train: Optional[int] = None,
                      max_test: Optional[int] = None) -> dict:
    """DINO's linear evaluation of one extractor's backbone on ``data``: train on augmented images, then
    the test accuracy on the evaluation transform's images. ``n_last_blocks``, ``avgpool_patchtokens``:
    ``dino_layout``'s; the extractor gives the device, batch size, workers and normalisation."""
    backbone, device = extractor.backbone, extractor.device
    n, avgpool = dino_layout(backbone.embed_dim, n_last_blocks, avgpool_patchtokens)
    check_dino_backbone(backbone, extractor.spec, n)
    represent = partial(dino_features, backbone, n_last_blocks=n, avgpool_patchtokens=avgpool)
    source = labelled_source(data, image_column, label_column)
    augment = train_transform(extractor.img_size, DINO_CROP_SCALE, True, extractor.mean, extractor.std)
    train = image_split(source, data, "train", max_train, augment, extractor.skip_bad_images)
    labels = torch.tensor(list(train.ds[source.label_column]))
    train.ds = train.ds.select(class_balanced_subset(labels, s.label_fraction, s.seed).tolist())
    test = image_split(source, data, "test", max_test, extractor.transform, extractor.skip_bad_images)
    feature_dim = backbone.embed_dim * (n + avgpool)
    model = probe_model(feature_dim, source.num_classes, s.bn, torch.Generator().manual_seed(s.seed)).to(device)
    check = partial(check_labels, num_classes=source.num_classes, data=data, split="train")
    train_dino_probe(represent, model, train, s, extractor.num_workers, device, check)
    test_x, test_y, _ = extract(represent, test, extractor.batch_size, extractor.num_workers, device, "features test")
    check_labels(test_y, source.num_classes, data, "test")
    return {"protocol": "dino", "accuracy": accuracy(model, test_x.to(device), test_y.to(device)),
            **dataclasses.asdict(s), "n_last_blocks": n, "avgpool_patchtokens": avgpool,
            "feature_dim": feature_dim, "crop_scale": list(DINO_CROP_SCALE), "hflip": True}
