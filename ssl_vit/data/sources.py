"""Resolve ``--data`` to train and test splits of Hugging Face ``datasets``.

One naming scheme, shared by the recipes and the eval modules:

* ``default``: scikit-learn's handwritten digits (1,797 real 8x8 scans shipped inside the
  installed package), so the first run needs no network;
* a local folder with ``*train*.parquet`` / ``*test*.parquet`` files, or with ``train/`` and
  ``test/`` image folders (``datasets``' imagefolder), or a single Parquet file;
* a folder of images, flat or nested (``datasets``' imagefolder: class subfolders at one depth
  give labels, anything else none), with a test split held out by a fixed seed;
* a list of image paths (``.csv``, ``.json``, ``.jsonl``; paths relative to the list's folder),
  with optional labels and an optional ``split`` column (``train`` / ``test``);
* a Hugging Face hub name such as ``cifar10`` (optionally streamed).

Files in an image folder that are not images are skipped and counted.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional, Union

import datasets
from datasets import ClassLabel, Dataset, IterableDataset
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from ..errors import UserError

HFData = Union[Dataset, IterableDataset]

IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values", "picture")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target", "class")
PATH_COLUMN_NAMES = ("image", "path", "image_path", "file", "file_name", "filename", "img")  # lists of paths
LIST_SUFFIXES = {".csv": Dataset.from_csv, ".json": Dataset.from_json, ".jsonl": Dataset.from_json}
SPLIT_COLUMN = "split"  # optional column of a list: "train" or "test" per image
LOCAL_FORMS = (
    "  --data default                     the embedded digits data set\n"
    "  --data path/to/folder              *train*.parquet and *test*.parquet inside, or train/ and test/ image folders,\n"
    "                                     or any folder of images (flat or nested; 10% is held out as the test split)\n"
    "  --data path/to/file.parquet        one Parquet file (10% is held out as the test split)\n"
    "  --data path/to/list.csv            a list of image paths (.csv, .json, .jsonl) with optional label and split columns"
)
HELD_OUT_FRACTION = 0.1  # test split carved from a source that has none


class DataError(UserError):
    """A data set that cannot be used as given; the message says what would work."""


@dataclass
class DataSource:
    """Train and test splits plus the column names to read."""

    name: str
    train: HFData
    test: Optional[HFData]
    image_column: str
    label_column: Optional[str]
    class_names: Optional[list[str]]

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.class_names) if self.class_names else None

    @property
    def has_labels(self) -> bool:
        return self.label_column is not None


def _digits() -> datasets.DatasetDict:
    """scikit-learn's digits as 8x8 greyscale images, split 80/20 with a fixed seed."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray(np.uint8(np.round(img * 255.0 / 16.0)), mode="L") for img in digits.images]
    features = datasets.Features(
        {"image": datasets.Image(), "label": ClassLabel(names=[str(d) for d in range(10)])}
    )
    ds = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return ds.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")


def _hold_out(ds: Dataset, label_column: Optional[str]) -> datasets.DatasetDict:
    if len(ds) < 2:
        raise DataError(f"{len(ds)} image: too few to hold out a test split from; add images or give a test split")
    stratify = label_column if label_column and isinstance(ds.features[label_column], ClassLabel) else None
    held = math.ceil(len(ds) * HELD_OUT_FRACTION)
    if stratify and min(held, len(ds) - held) < ds.features[label_column].num_classes:
        stratify = None  # too few images for every class on both sides: a plain seeded split
    return ds.train_test_split(test_size=HELD_OUT_FRACTION, seed=0, stratify_by_column=stratify)


def _parquet_files(path: str) -> dict[str, list[str]]:
    """The Parquet files of a local ``--data`` path by split (empty for an image folder)."""
    if os.path.isfile(path):
        if not path.endswith(".parquet"):
            raise DataError(f"{path} is a file but not a .parquet file; local data forms:\n{LOCAL_FORMS}")
        return {"train": [path]}
    files = {split: sorted(glob.glob(os.path.join(path, f"*{split}*.parquet"))) for split in ("train", "test")}
    return {split: found for split, found in files.items() if found} if files["train"] else {}


def _load_local(path: str, streaming: bool, image_column: Optional[str]) -> dict[str, HFData]:
    if os.path.splitext(path)[1].lower() in LIST_SUFFIXES:
        return _load_list(path, image_column, streaming)
    files = _parquet_files(path)
    if os.path.isfile(path):
        return {"train": datasets.load_dataset("parquet", data_files=files["train"], split="train",
                                               streaming=streaming)}
    if files:
        return dict(datasets.load_dataset("parquet", data_files=files, streaming=streaming))
    if not _count_files(path):
        raise DataError(f"{path} holds no images, no *train*.parquet files and no train/ image folder; "
                        f"local data forms:\n{LOCAL_FORMS}")
    return dict(datasets.load_dataset("imagefolder", data_dir=path, streaming=streaming))


def _count_files(folder: str) -> int:
    """The number of images under ``folder`` (any depth, hidden files left out), saying how many other
    files imagefolder will skip; the metadata files it reads count as neither."""
    images, others = 0, []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith(".") or name in ImageFolder.METADATA_FILENAMES:
                continue
            if os.path.splitext(name)[1].lower() in ImageFolder.EXTENSIONS:
                images += 1
            else:
                others.append(os.path.join(root, name))
    if others and images:
        files = "1 file that is" if len(others) == 1 else f"{len(others)} files that are"
        _note(f"data: skipped {files} not images in {folder} (e.g. {others[0]})")
    return images


def _note(line: str) -> None:
    """A line about the data for the user, printed by the first process only."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def _load_list(path: str, image_column: Optional[str], streaming: bool) -> dict[str, HFData]:
    """A list of image paths (relative to the list's folder) with optional label and split columns."""
    if streaming:
        raise DataError(f"--streaming reads hub data sets and Parquet files; {path} is a list: drop --streaming")
    table = LIST_SUFFIXES[os.path.splitext(path)[1].lower()](path)
    column = _pick_column(table, image_column, PATH_COLUMN_NAMES, datasets.Image, "image path", path)
    if column is None:
        raise DataError(f"{path} has no column of image paths (columns: {table.column_names}); name it with "
                        f"--image-column (looked for {', '.join(PATH_COLUMN_NAMES)})")
    folder = os.path.dirname(os.path.abspath(path))
    paths = [os.path.join(folder, os.path.expanduser(str(p))) for p in table[column]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(paths)} images listed in {path} do not exist (first: {missing[0]}); "
                        "paths are read relative to the list's folder")
    resolved = table.add_column(f"{column}__resolved", paths).remove_columns(column)
    table = resolved.rename_column(f"{column}__resolved", column).cast_column(column, datasets.Image())
    if SPLIT_COLUMN not in table.column_names:
        return {"train": table}
    return _list_splits(table, path)


def _list_splits(table: Dataset, path: str) -> dict[str, Dataset]:
    """The rows of a list by its ``split`` column (train / test), without that column."""
    values = set(table.unique(SPLIT_COLUMN))
    if not values <= {"train", "test"} or "train" not in values:
        raise DataError(f"the {SPLIT_COLUMN!r} column of {path} holds {sorted(map(str, values))}: use 'train' and "
                        "'test' (or leave the column out: 10% is then held out as the test split)")
    splits = {name: table.filter(lambda v, name=name: v == name, input_columns=SPLIT_COLUMN) for name in values}
    return {name: ds.remove_columns(SPLIT_COLUMN) for name, ds in splits.items()}


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith((".", "/", "~")) or spec.endswith((".parquet", *LIST_SUFFIXES))
            or os.sep + os.sep in spec)


def hub_name(spec: str) -> Optional[str]:
    """The Hugging Face hub data set a ``--data`` value names, as ``load_data`` reads it; None for the
    embedded digits (``default``) and for local paths."""
    if spec == "default" or os.path.exists(os.path.expanduser(spec)) or _looks_like_path(spec):
        return None
    return spec


def _load_hub(name: str, streaming: bool) -> dict[str, HFData]:
    try:
        return dict(datasets.load_dataset(name, streaming=streaming))
    except Exception as err:  # the hub raises many types (offline, not found, gated)
        raise DataError(
            f"could not load {name!r} from the Hugging Face hub ({type(err).__name__}: {err}).\n"
            f"No local path {name!r} exists either. Local data forms:\n{LOCAL_FORMS}"
        ) from err


def _pick_column(ds: HFData, wanted: Optional[str], names: tuple[str, ...], feature_type, what: str, data: str):
    features = ds.features or {}
    columns = list(features) if features else list(ds.column_names or [])
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{data} has no {what} column {wanted!r}; its columns are {columns}")
        return wanted
    for col, feat in features.items():
        if isinstance(feat, feature_type):
            return col
    for col in names:
        if col in columns:
            return col
    return None


def load_data(
    spec: str = "default",
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    streaming: bool = False,
) -> DataSource:
    """Turn a ``--data`` value into a ``DataSource`` (see the module docstring for the forms)."""
    if spec == "default":
        splits = dict(_digits())
    elif os.path.exists(os.path.expanduser(spec)):
        splits = _load_local(os.path.expanduser(spec), streaming, image_column)
    elif _looks_like_path(spec):
        raise DataError(f"data path {spec!r} does not exist; local data forms:\n{LOCAL_FORMS}")
    else:
        splits = _load_hub(spec, streaming)

    train = splits.get("train")
    if train is None:
        raise DataError(f"{spec} has no train split (it has {sorted(splits)})")
    image_col = _pick_column(train, image_column, IMAGE_COLUMN_NAMES, datasets.Image, "image", spec)
    if image_col is None:
        raise DataError(f"{spec} has no image column (columns: {train.column_names}); name it with --image-column")
    label_col = _pick_column(train, label_column, LABEL_COLUMN_NAMES, ClassLabel, "label", spec)

    test = splits.get("test", splits.get("validation"))
    if test is None and isinstance(train, Dataset):
        held = _hold_out(train, label_col)
        train, test = held["train"], held["test"]

    class_names = None
    if label_col is not None:
        train, test, class_names = _classes(train, test, label_col)
        if class_names is None and isinstance(train, IterableDataset) and os.path.exists(os.path.expanduser(spec)):
            class_names = _streamed_int_classes(_parquet_files(os.path.expanduser(spec)), label_col)
    return DataSource(spec, train, test, image_col, label_col, class_names)


def _streamed_int_classes(files: dict[str, list[str]], label_col: str) -> Optional[list[str]]:
    """Classes 0..K-1 of integer labels in local Parquet files, read without the images (pyarrow),
    so a streamed local data set knows its classes as a downloaded one does."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = files.get("train", [])  # as for a downloaded data set: the training split's labels
    if not paths or label_col not in pq.read_schema(paths[0]).names:
        return None
    column = pq.read_table(paths, columns=[label_col]).column(label_col)
    if not (pa.types.is_integer(column.type) and len(column)):
        return None
    return [str(v) for v in range(int(pc.max(column).as_py()) + 1)]


def _classes(train: HFData, test: Optional[HFData], label_col: str) -> tuple[HFData, Optional[HFData], Optional[list]]:
    """(train, test, class names) for a label column: a ``ClassLabel``'s names; plain integers 0..K-1;
    strings become classes in sorted order (both splits cast to one ``ClassLabel``). Other labels, or
    integers of a stream (whose largest is unknown before a full pass), give no class names."""
    feat = (train.features or {}).get(label_col)
    if isinstance(feat, ClassLabel):
        return train, test, list(feat.names)
    if not isinstance(train, Dataset) or not isinstance(feat, datasets.Value):
        return train, test, None
    if feat.dtype in ("string", "large_string"):
        values = set(train.unique(label_col)) | (set(test.unique(label_col)) if isinstance(test, Dataset) else set())
        classes = ClassLabel(names=sorted(values))
        return (train.cast_column(label_col, classes),
                test.cast_column(label_col, classes) if isinstance(test, Dataset) else test, classes.names)
    if feat.dtype.startswith(("int", "uint")):
        return train, test, [str(v) for v in range(int(max(train.unique(label_col))) + 1)]
    return train, test, None
