"""Pictures of the feature space: the test set mapped to 2-D by class, and the training images nearest
a few test images, for any checkpoints side by side.

    python -m eval.embedding CKPT [CKPT ...] --data NAME_OR_PATH --out DIR [--method pca|umap]
        [--max-points 2000] [--queries 8] [--neighbours 8] [--seed 0]

writes to ``--out``:

* ``embedding.png``: the test features, L2-normalised (the geometry of the kNN evaluation), projected
  to 2-D by PCA (or UMAP with ``--method umap`` where umap-learn is installed) and coloured by class;
  a panel per checkpoint (columns) and data set (rows); at most ``--max-points`` points, a seeded draw;
* ``retrieval.png``: ``--queries`` test images (drawn with ``--seed``: the same for every checkpoint),
  each followed by its ``--neighbours`` most cosine-similar training images, framed green when they
  share the query's class and red when not; a block of rows per checkpoint and data set;
* ``embedding.json``: per checkpoint and data set, the PCA explained-variance ratios, the neighbour
  label agreement (the fraction of the K nearest training images of every test image that share its
  class: a cheap purity number, not DINO's weighted kNN accuracy), the queries and their neighbours
  as rows of the data set's test and train splits. ``--json PATH`` writes the same records as a list.

Features are ``ssl_vit.evaluation.features``' (cached; ``--max-train``/``--max-test``, ``--crop-fraction``,
``--skip-bad-images`` as in every evaluation); neighbours come from ``knn_search.topk_chunks``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from ssl_vit.checkpoint import atomic_write, atomic_write_text, backbone_info
from ssl_vit.data import DataSource, ImageDataset
from ssl_vit.names import short_name

from .common import EvalError, data_specs, percent, positive_int, print_table, resolve_device, run_cli, write_json
from ssl_vit.evaluation.features import Features, labelled_source
from ssl_vit.evaluation.knn_search import topk_chunks

from .embedding_figures import FIGURES
from .features import each_features, feature_parser
from .inspection_figures import panel_count

METHODS = ("pca", "umap")
PCA_COMPONENTS = 10  # explained variance is reported for the first 2 and the first 10 components
MIN_TEST_IMAGES = 3  # fewer points have no second principal direction to draw
UMAP_NEIGHBOURS = 15  # umap-learn's default n_neighbors
FEATURE_NORM = "L2-normalised"  # what the map and the neighbour search see


@dataclass
class View:
    """What one checkpoint shows of one data set: the figures' inputs and the JSON record."""

    name: str  # the checkpoint's short name
    data: str
    method: str
    class_names: list[str]
    points: np.ndarray  # [P, 2] the drawn test points in 2-D
    point_labels: np.ndarray  # [P] their classes
    query_images: list[np.ndarray]  # Q raw images [H, W, 3] uint8
    neighbour_images: list[list[np.ndarray]]  # [Q][K] raw training images
    record: dict  # also the queries' and neighbours' labels and similarities


def umap_class():
    """umap-learn's ``UMAP``, or a one-line error naming the package."""
    try:
        from umap import UMAP
    except ImportError:
        raise EvalError("--method umap needs umap-learn, which is not installed: pip install umap-learn "
                        "(or use --method pca)") from None
    return UMAP


def seeded_positions(n: int, count: int, seed: int) -> torch.Tensor:
    """``count`` of the positions 0..n-1 (all when count >= n), a fixed draw of ``seed``, in order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:count].sort().values


def nearest_training(features: Features, k: int,
                     device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities, positions in ``features.train``) [M, K] of each test point's k most similar
    training points, most similar first; searched on ``device`` (default: the features'), returned on the CPU."""
    device = device or features.train.device
    train = F.normalize(features.train.float().to(device), dim=1)
    test = F.normalize(features.test.float().to(device), dim=1)
    sims, idx = zip(*topk_chunks(train, test, k))
    return torch.cat(sims).cpu(), torch.cat(idx).cpu()


def neighbour_agreement(neighbour_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of neighbours [M, K] that share their test point's label [M]."""
    return (neighbour_labels == labels[:, None]).double().mean().item()


def pca_and_points(test: torch.Tensor, method: str, shown: torch.Tensor, seed: int) -> tuple[list[float], np.ndarray]:
    """(explained-variance ratios of the first ``PCA_COMPONENTS`` principal components of all L2-normalised
    test features [M, D], the ``shown`` ones [P] in 2-D by ``method``)."""
    x = F.normalize(test.float(), dim=1).numpy()
    pca = PCA(n_components=min(PCA_COMPONENTS, *x.shape), random_state=seed).fit(x)
    if method == "pca":
        points = pca.transform(x[shown.numpy()])[:, :2]
    else:
        umap = umap_class()(n_components=2, n_neighbors=min(UMAP_NEIGHBOURS, len(shown) - 1), random_state=seed)
        points = umap.fit_transform(x[shown.numpy()])
    return [round(float(r), 5) for r in pca.explained_variance_ratio_], np.asarray(points)


def split_images(source: DataSource, split: str, rows: list[int]) -> list[np.ndarray]:
    """The raw images [H, W, 3] uint8 of these rows of a split, decoded as for the features (RGB)."""
    dataset = ImageDataset(getattr(source, split), source.image_column, None, np.asarray, split=split)
    return [dataset[row]["image"] for row in rows]


def explore(first: dict, features: Features, source: DataSource, args: argparse.Namespace,
            device: torch.device) -> View:
    """One checkpoint's view of one data set: the 2-D map, the neighbour agreement, the queries."""
    k = args.neighbours
    if k > len(features.train) or len(features.test) < MIN_TEST_IMAGES:
        raise EvalError(f"{first['data']} has {len(features.train)} readable training and {len(features.test)} test "
                        f"images: too few for --neighbours {k} or a 2-D map (at least {MIN_TEST_IMAGES} test images)")
    sims, idx = nearest_training(features, k, device)
    neighbour_labels = features.train_labels[idx]  # [M, K]
    queries = seeded_positions(len(features.test), args.queries, args.seed)  # the same for every checkpoint
    shown = seeded_positions(len(features.test), args.max_points, args.seed)
    ratios, points = pca_and_points(features.test, args.method, shown, args.seed)
    query_rows = features.test_rows[queries].tolist()
    neighbour_rows = features.train_rows[idx[queries]].tolist()  # [Q][K] rows of the train split
    record = {
        **first, "method": args.method, "features": FEATURE_NORM, "num_train": len(features.train),
        "num_test": len(features.test), "points_drawn": len(shown), "seed": args.seed,
        "pca_explained_variance_ratio": ratios, "pca_variance_2": round(sum(ratios[:2]), 5),
        "pca_variance_10": round(sum(ratios), 5),
        "neighbours": k, "neighbour_agreement": neighbour_agreement(neighbour_labels, features.test_labels),
        "queries": query_rows, "query_labels": features.test_labels[queries].tolist(),
        "neighbour_rows": neighbour_rows, "neighbour_labels": neighbour_labels[queries].tolist(),
        "neighbour_similarity": [[round(s, 4) for s in row] for row in sims[queries].tolist()],
    }
    return View(
        name=short_name(first["checkpoint"]), data=first["data"], method=args.method,
        class_names=list(source.class_names), points=points, point_labels=features.test_labels[shown].numpy(),
        query_images=split_images(source, "test", query_rows),
        neighbour_images=[split_images(source, "train", rows) for rows in neighbour_rows], record=record,
    )


def check_sizes(source: DataSource, data: str, args: argparse.Namespace) -> None:
    """Enough test and training images for the map, the queries and the neighbours (before any extraction)."""
    num_train = min(len(source.train), args.max_train or len(source.train))
    num_test = min(len(source.test), args.max_test or len(source.test))
    if num_test < max(MIN_TEST_IMAGES, args.queries):
        raise EvalError(f"{data}: {num_test} test images are too few for a 2-D map and --queries {args.queries} "
                        f"(at least {max(MIN_TEST_IMAGES, args.queries)}); pass fewer --queries or a larger --max-test")
    if num_train < args.neighbours:
        raise EvalError(f"--neighbours {args.neighbours} exceeds the {num_train} training images of {data}; "
                        "pass a smaller --neighbours or a larger --max-train")


def validate(args: argparse.Namespace) -> dict[str, DataSource]:
    """Every check that can run before extraction: the method, the checkpoints, the data sets."""
    if args.method == "umap":
        umap_class()
    for flag, values in (("checkpoint", args.checkpoints), ("--data", data_specs(args))):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise EvalError(f"{flag} {twice[0]} is given twice; name each once (the figures have a panel per value)")
    for spec in args.checkpoints:
        backbone_info(spec)  # a missing or foreign checkpoint is one line, before minutes of extraction
    sources = {}
    for data in data_specs(args):
        sources[data] = labelled_source(data, args.image_column, args.label_column,
                                        why="the map is coloured by class and neighbours are compared by class")
        check_sizes(sources[data], data, args)
    return sources


def write_outputs(views: list[View], out: str) -> dict:
    """embedding.png, retrieval.png and embedding.json in ``out``; returns the JSON payload."""
    os.makedirs(out, exist_ok=True)
    figures = {}
    for filename, plot in FIGURES.items():
        fig = plot(views)
        atomic_write(os.path.join(out, filename), lambda tmp: fig.savefig(tmp, dpi=100))
        figures[filename] = {"panels": panel_count(fig)}
    payload = {"figures": figures, "records": [v.record for v in views]}
    text = json.dumps(payload, indent=1) + "\n"
    atomic_write_text(os.path.join(out, "embedding.json"), text)
    return payload


def build_parser() -> argparse.ArgumentParser:
    parser = feature_parser(__doc__)
    parser.add_argument("--out", required=True, help="folder for embedding.png, retrieval.png and embedding.json")
    parser.add_argument("--method", choices=METHODS, default="pca",
                        help="2-D projection: pca (default), or umap (needs: pip install umap-learn)")
    parser.add_argument("--max-points", type=positive_int, default=2000,
                        help="test points drawn on the map at most (a seeded draw; default: 2000)")
    parser.add_argument("--queries", type=positive_int, default=8, help="query test images shown (default: 8)")
    parser.add_argument("--neighbours", type=positive_int, default=8,
                        help="nearest training images per test image (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="draws the queries, the drawn points and UMAP (default: 0)")
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    sources, device = validate(args), resolve_device(args.device)
    views = [explore(first, feats, sources[first["data"]], args, device) for first, feats in each_features(args)]
    payload = write_outputs(views, args.out)
    records = payload["records"]
    print_table(["checkpoint", "data", "PCA 2 (%)", "PCA 10 (%)", f"agreement@{args.neighbours} (%)"],
                [[r["checkpoint"], r["data"], percent(r["pca_variance_2"]), percent(r["pca_variance_10"]),
                  percent(r["neighbour_agreement"])] for r in records],
                f"feature space ({FEATURE_NORM}): PCA explained variance, nearest-neighbour label agreement")
    print(f"wrote {', '.join(payload['figures'])} and embedding.json to {args.out}")
    write_json(args.json, records)
    return payload


if __name__ == "__main__":
    run_cli(main)
