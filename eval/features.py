"""The command-line side of feature extraction: its flags, and the features of every checkpoint and
data set a command names. The extraction and its cache are ``ssl_vit.evaluation.features``."""

from __future__ import annotations

import argparse
from typing import Iterator

from ssl_vit.evaluation.features import FeatureExtractor, Features

from .common import DEFAULT_CACHE_DIR, base_parser, data_specs, positive_int, resolve_device


def feature_parser(description: str) -> argparse.ArgumentParser:
    """``common.base_parser`` plus the flags of feature extraction."""
    parser = base_parser(description)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help=f"feature cache folder (default: {DEFAULT_CACHE_DIR})")
    parser.add_argument("--max-train", type=positive_int, default=None, metavar="N",
                        help="use a fixed random subset of N training images (a quick look on a slow machine)")
    parser.add_argument("--max-test", type=positive_int, default=None, metavar="N",
                        help="use a fixed random subset of N test images")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out unreadable images (counted) instead of stopping at the first")
    parser.add_argument("--crop-fraction", type=float, default=None, metavar="F",
                        help="evaluation resize: short side to size / F, centre crop (default: 0.875 for inputs "
                             "of 224 px or more, else 1: the exact size)")
    return parser


def extractors(args: argparse.Namespace) -> Iterator[FeatureExtractor]:
    """A ``FeatureExtractor`` for every checkpoint of the command line, one at a time."""
    device = resolve_device(args.device)
    for spec in args.checkpoints:
        yield FeatureExtractor.from_checkpoint(spec, device, args.cache_dir, batch_size=args.batch_size,
                                               num_workers=args.num_workers, skip_bad_images=args.skip_bad_images,
                                               crop_fraction=args.crop_fraction)


def first_fields(extractor: FeatureExtractor, data: str) -> dict:
    """The fields every evaluation record starts with: checkpoint, data and the evaluation crop."""
    return {"checkpoint": extractor.spec, "data": data, "crop_fraction": extractor.crop_fraction}


def each_features(args: argparse.Namespace) -> Iterator[tuple[dict, Features]]:
    """(``first_fields``, features) for every checkpoint and data set of the command line."""
    for extractor in extractors(args):
        for data in data_specs(args):
            yield first_fields(extractor, data), extractor.features(data, args.image_column, args.label_column,
                                              args.max_train, args.max_test)
