"""Data: naming a data set (``sources``), augmenting it (``transforms``), batching it (``loader``)."""

from .loader import (BadImageError, EpochSampler, ImageDataset, StreamingImageDataset, collate, make_loader,
                     resolve_workers)
from .multicrop import MultiCrop
from .sources import DataError, DataSource, hub_name, load_data
from .transforms import (MEAN, STD, denormalize, eval_crop_fraction, eval_transform, normalization,
                         train_transform)

__all__ = [
    "BadImageError", "DataError", "DataSource", "EpochSampler", "ImageDataset", "MEAN", "MultiCrop", "STD",
    "StreamingImageDataset", "collate", "denormalize", "eval_crop_fraction", "eval_transform", "hub_name", "load_data",
    "make_loader", "normalization", "resolve_workers", "train_transform",
]
