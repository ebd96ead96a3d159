"""Inspecting Vision Transformers (ViT paper section 4.5) for any checkpoints, side by side.

    python -m eval.inspection runs/sup/ckpt.pt runs/mae/ckpt.pt --data ../shared/data/cifar10 --out runs/inspect

writes to ``--out``:

* ``filters.png``: top principal components of the patch-embedding filters (hybrids: the stem's
  first convolution);
* ``position_similarity.png``: cosine similarity of each position embedding with every other;
* ``attention_distance.png``: mean attention distance in pixels per head and layer, averaged over
  query patches and ``--images`` images of the data's test split (class token left out);
* ``attention_rollout.png``: attention rollout over a few images, from the class token (or, for
  average-pooled checkpoints, the mean of the patch queries);
* ``inspect.json``: the numbers behind every figure.

A checkpoint is a ``ckpt.pt`` (or its run folder), ``timm:MODEL_NAME`` or a ``.safetensors`` export.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from ssl_vit.checkpoint import load_backbone
from ssl_vit.data import DataSource, ImageDataset, eval_transform, load_data
from ssl_vit.names import short_name
from ssl_vit.evaluation.attention import CLASS_TOKEN_HANDLING, attention_pass, patch_distances, rollout_source
from ssl_vit.evaluation.embeddings import Filters, first_layer_filters, position_similarity, similarity_by_distance

from .common import EvalError, run_cli
from .inspection_figures import FIGURES, panel_count

NUM_IMAGES = 128  # the paper's attention-distance sample
NUM_ROLLOUT_IMAGES = 4


class InspectError(EvalError):
    """An argument that cannot work; the message says what would."""


@dataclass
class Inspection:
    """What one checkpoint's figures show."""

    name: str
    spec: str
    objective: str
    step: int
    arch: dict
    pixel_patch_size: int
    base_grid: tuple[int, int]  # grid of the position embeddings
    grid: tuple[int, int]  # grid of the inspected images
    num_images: int
    filters: Filters
    similarity: torch.Tensor  # [N0, N0] on base_grid
    distance: torch.Tensor  # [L, H] mean attention distance, pixels
    prefix_weight: torch.Tensor  # [L, H] attention of patch queries on the class token
    uniform_distance: float  # what uniform attention would give on this grid
    max_distance: float  # largest distance between two patch centres
    rollout_images: torch.Tensor  # [K, C, H, W] in 0..1
    rollout_maps: torch.Tensor  # [K, h, w]
    rollout_from: str  # FROM_CLASS or FROM_PATCH_MEAN: the rows the maps are read from


def resolve_spec(spec: str) -> str:
    """A run folder stands for its ckpt.pt."""
    return os.path.join(spec, "ckpt.pt") if os.path.isdir(spec) else spec


def image_loader(source: DataSource, img_size: int, num_images: int, batch_size: int) -> DataLoader:
    """The first ``num_images`` images of the test split (the train split if there is none)."""
    split = source.test if source.test is not None else source.train
    if not hasattr(split, "__len__"):
        raise InspectError(f"{source.name} is streamed; inspection needs a map-style data set (drop streaming)")
    dataset = ImageDataset(split, source.image_column, None, eval_transform(img_size), split="test")
    return DataLoader(Subset(dataset, range(min(num_images, len(dataset)))), batch_size=batch_size)


def inspect_checkpoint(spec: str, source: DataSource, num_images: int, num_rollout: int,
                       batch_size: int, device: torch.device, name: Optional[str] = None) -> Inspection:
    backbone, info = load_backbone(resolve_spec(spec))
    backbone.to(device)
    name = name or short_name(spec)
    loader = image_loader(source, backbone.cfg.img_size, num_images, batch_size)
    distance, prefix, maps, shown, grid, seen = attention_pass(backbone, loader, num_rollout, device, name)
    pair_distances = patch_distances(grid, backbone.pixel_patch_size)
    return Inspection(
        name=name, spec=spec, objective=str(info.get("objective")), step=int(info.get("step", 0)),
        arch=dict(info.get("arch", {})), pixel_patch_size=backbone.pixel_patch_size,
        base_grid=backbone.base_grid, grid=grid, num_images=seen,
        filters=first_layer_filters(backbone), similarity=position_similarity(backbone).cpu(),
        distance=distance, prefix_weight=prefix,
        uniform_distance=float(pair_distances.mean()), max_distance=float(pair_distances.max()),
        rollout_images=shown, rollout_maps=maps, rollout_from=rollout_source(backbone),
    )


def _rounded(t: torch.Tensor, digits: int = 4) -> list:
    return torch.round(t.float(), decimals=digits).tolist()


def to_json(r: Inspection) -> dict:
    return {
        "name": r.name, "spec": r.spec, "objective": r.objective, "step": r.step, "arch": r.arch,
        "pixel_patch_size": r.pixel_patch_size, "grid": list(r.grid), "num_images": r.num_images,
        "filters": {"what": r.filters.title, "explained_variance_ratio": r.filters.explained_variance_ratio},
        "position_similarity": {
            "grid": list(r.base_grid),
            "mean_by_grid_distance": similarity_by_distance(r.similarity, r.base_grid),
            "matrix": _rounded(r.similarity),
        },
        "attention_distance": {
            "class_token": CLASS_TOKEN_HANDLING,
            "mean_px": _rounded(r.distance, 3),  # [layer][head]
            "layer_mean_px": _rounded(r.distance.mean(dim=1), 3),
            "uniform_attention_px": round(r.uniform_distance, 3),
            "class_token_weight": _rounded(r.prefix_weight),  # [layer][head]
        },
        "rollout": {"from": r.rollout_from, "maps": _rounded(r.rollout_maps, 5)},  # maps: [image][row][column]
    }


def write_outputs(results: Sequence[Inspection], out: str, data: str) -> dict:
    """Write the four PNGs and inspect.json into ``out``; returns the JSON payload."""
    os.makedirs(out, exist_ok=True)
    figures = {}
    for filename, plot in FIGURES.items():
        fig = plot(results)
        fig.savefig(os.path.join(out, filename), dpi=100)
        figures[filename] = {"panels": panel_count(fig)}
    payload = {"data": data, "figures": figures, "checkpoints": [to_json(r) for r in results]}
    with open(os.path.join(out, "inspect.json"), "w") as fh:
        json.dump(payload, fh, indent=1)
    return payload


def unique_names(specs: Sequence[str]) -> list[str]:
    names, seen = [], {}
    for spec in specs:
        name = short_name(spec)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return names


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="ckpt.pt or run folder, timm:MODEL_NAME, or .safetensors")
    parser.add_argument("--data", default="default", help="data set name or path (its test split is used)")
    parser.add_argument("--out", required=True, help="folder for the PNGs and inspect.json")
    parser.add_argument("--images", type=int, default=NUM_IMAGES, help="images averaged for attention distance")
    parser.add_argument("--rollout-images", type=int, default=NUM_ROLLOUT_IMAGES, help="images shown with rollout maps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.images < 1 or args.rollout_images < 1 or args.batch_size < 1:
        raise InspectError(
            f"--images {args.images}, --rollout-images {args.rollout_images} and --batch-size "
            f"{args.batch_size} must all be at least 1"
        )

    source = load_data(args.data)
    device = torch.device(args.device)
    results = [
        inspect_checkpoint(spec, source, args.images, args.rollout_images, args.batch_size, device, name)
        for spec, name in zip(args.checkpoints, unique_names(args.checkpoints))
    ]
    payload = write_outputs(results, args.out, args.data)
    for r in results:
        layer_mean = ", ".join(f"{d:.1f}" for d in r.distance.mean(dim=1).tolist())
        print(f"{r.name}: mean attention distance per layer (px): {layer_mean}")
    print(f"wrote {', '.join(payload['figures'])} and inspect.json to {args.out}")
    return payload


if __name__ == "__main__":
    run_cli(main)
