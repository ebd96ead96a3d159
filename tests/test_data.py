"""Naming a data set: every form, and the bad inputs a user will hit."""

import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.data import (BadImageError, DataError, EpochSampler, ImageDataset, collate, load_data, make_loader,
                          train_transform)


def _image_folder(root, split_sizes=(("train", 4), ("test", 2))):
    for split, n in split_sizes:
        for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (20, 20), colour).save(root / split / cls / f"{i}.png")


def test_default_is_real_digits_with_two_splits():
    src = load_data("default")
    assert len(src.train) + len(src.test) == 1797
    assert src.num_classes == 10 and src.has_labels
    img = src.train[0][src.image_column]
    assert img.size == (8, 8) and len(set(img.getdata())) > 2  # real strokes, not a constant


def test_parquet_folder(cifar10_dir):
    src = load_data(cifar10_dir)
    assert (len(src.train), len(src.test)) == (50_000, 10_000)
    assert src.image_column == "image" and src.label_column == "label"
    assert src.class_names[0] == "airplane"


def test_image_folder(tmp_path):
    _image_folder(tmp_path)
    src = load_data(str(tmp_path))
    assert len(src.train) == 8 and len(src.test) == 4
    assert sorted(src.class_names) == ["cat", "dog"]
    ds = ImageDataset(src.train, src.image_column, src.label_column, train_transform(16))
    item = ds[(0, 3)]
    assert item["image"].shape == (3, 16, 16)


def test_single_parquet_file_gets_a_held_out_test_split(tmp_path):
    load_data("default").train.to_parquet(str(tmp_path / "digits.parquet"))
    src = load_data(str(tmp_path / "digits.parquet"))
    assert len(src.test) == round(0.1 * 1437) and len(src.train) + len(src.test) == 1437


def test_a_small_labelled_folder_holds_out_a_test_split_too_small_for_every_class(tmp_path):
    """64 images of 10 classes: 7 held out cannot hold every class, so the split is plain (seeded)."""
    for i in range(64):
        (tmp_path / f"class{i % 10}").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"class{i % 10}" / f"{i}.png")
    src = load_data(str(tmp_path))
    assert len(src.test) == 7 and len(src.train) == 57 and src.num_classes == 10


def test_missing_path_is_named():
    with pytest.raises(DataError, match="data path './no/such/folder' does not exist"):
        load_data("./no/such/folder")


def test_unreachable_hub_name_shows_local_forms():
    with pytest.raises(DataError) as err:
        load_data("surely-not-a-dataset-xyz")
    assert "Hugging Face hub" in str(err.value) and "--data path/to/folder" in str(err.value)


def test_column_flags(tmp_path):
    _image_folder(tmp_path)
    with pytest.raises(DataError, match="no label column 'klass'"):
        load_data(str(tmp_path), label_column="klass")


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path):
    _image_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "0.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    src = load_data(str(tmp_path))
    ds = ImageDataset(src.train, src.image_column, src.label_column, train_transform(16))
    paths = [row["path"] for row in ds.ds[src.image_column]]
    bad_row = next(i for i, p in enumerate(paths) if p.endswith(os.path.join("cat", "0.png")))
    with pytest.raises(BadImageError, match=r"cat/0\.png.*--skip-bad-images"):
        ds[bad_row]
    ds_skip = ImageDataset(src.train, src.image_column, src.label_column, train_transform(16), skip_bad_images=True)
    batch = collate([ds_skip[i] for i in range(len(ds_skip))])
    assert batch["skipped"] == 1 and len(batch["image"]) == 7


def test_sampler_shards_and_resumes():
    full = list(EpochSampler(40, 4, seed=1))
    assert sorted(i for _, i in full) == list(range(40))
    # two processes see disjoint halves of the same permutation
    r0, r1 = list(EpochSampler(40, 4, seed=1, rank=0, world_size=2)), list(EpochSampler(40, 4, seed=1, rank=1, world_size=2))
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 20
    # resuming at batch 3 continues exactly where the uninterrupted order was
    s = EpochSampler(40, 4, seed=1)
    s.set_epoch(0, start_batch=3)
    assert list(s) == full[12:]
    s.set_epoch(1)
    assert list(s) != [(1, i) for _, i in full]


@pytest.mark.parametrize("randaugment", [None, "rand-m9-mstd0.5-inc1"])  # timm's RandAugment picks ops with numpy
def test_augmentation_is_a_function_of_seed_epoch_and_index(randaugment):
    src = load_data("default")
    ds = ImageDataset(src.train, src.image_column, src.label_column, train_transform(16, randaugment=randaugment),
                      seed=3)

    def images(global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed), random.seed(global_seed), np.random.seed(global_seed)
        return torch.stack([ds[(2, i)]["image"] for i in range(8)])

    a = images(0)
    assert torch.equal(a, images(123))  # the global RNGs (a process's, a worker's) do not matter
    assert not torch.equal(a[7], ds[(3, 7)]["image"])  # another epoch, another crop


def test_randaugment_posterize_keeps_zero_bits_as_a_black_image():
    """PosterizeIncreasing at magnitude 10 keeps 0 bits, which Pillow 11+ refuses (DeiT's recipe then
    stopped about one image in 500); earlier Pillow, and DeiT's runs, made the image black."""
    from timm.data.auto_augment import RandAugment

    augment = next(t for t in train_transform(16, randaugment="rand-m10-inc1").transforms if isinstance(t, RandAugment))
    op = next(op for op in augment.ops if op.name == "PosterizeIncreasing")
    op.prob = 1.0
    assert op(Image.new("RGB", (16, 16), (200, 100, 50))).getextrema() == ((0, 0),) * 3


def test_streaming_parquet(tmp_path):
    load_data("default").train.to_parquet(str(tmp_path / "digits-train.parquet"))
    src = load_data(str(tmp_path), streaming=True)
    from ssl_vit.data import StreamingImageDataset
    ds = StreamingImageDataset(src.train, src.image_column, src.label_column, train_transform(16))
    stream = iter(make_loader(ds, None, 0, False, batch_size=8))
    first, second = next(stream), next(stream)
    assert first["image"].shape == (8, 3, 16, 16)
    ds.set_start(8)  # resume: skips the first 8 examples of the same stream
    again = next(iter(make_loader(ds, None, 0, False, batch_size=8)))
    assert again["index"].tolist() == list(range(8, 16))
    # the same rows as the uninterrupted stream's second batch, with the same augmentation
    assert torch.equal(again["label"], second["label"]) and torch.equal(again["image"], second["image"])
    assert not torch.equal(again["label"], first["label"])


def test_random_erasing_in_the_training_transform():
    """--random-erasing p reaches the training augmentation: timm's RandomErasing fills one box of the
    normalised image with per-pixel noise (pixel mode), so a uniform image is uniform no longer."""
    from ssl_vit.config import TrainConfig
    from ssl_vit.data import MEAN, STD
    from ssl_vit.objectives import DataInfo, get_objective

    grey = Image.new("RGB", (16, 16), (120, 120, 120))
    data = DataInfo("grey", 2, None, MEAN, STD, 16)

    def spread(probability: float) -> float:
        tc = TrainConfig(random_erasing=probability, crop_scale=(1.0, 1.0), hflip=False)
        torch.manual_seed(0)
        image = get_objective("supervised").train_transform(tc, None, data)(grey)
        return image.flatten(1).std(1).max().item()  # within each channel

    assert spread(0.0) < 1e-5
    assert spread(1.0) > 0.1


# ----- data a practitioner has: a folder of unlabelled images, a list of paths -----
def _photos(root, names):
    """Small distinct RGB images at the given relative paths under ``root``."""
    for i, name in enumerate(names):
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        Image.new("RGB", (12, 12), (10 * i, 255 - 10 * i, 7 * i)).save(root / name)


def test_flat_or_nested_image_folder_is_unlabelled_with_a_seeded_held_out_split(tmp_path, capsys):
    from datasets import Image as Img

    names = [f"img{i}.png" for i in range(12)] + [f"2024/trip/{i}.jpg" for i in range(4)] + ["2023/a.png"]
    _photos(tmp_path, names)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "2024" / "camera.log").write_text("neither")
    src = load_data(str(tmp_path))
    assert not src.has_labels and len(src.train) + len(src.test) == 17 and len(src.test) == 2  # 10%, nested too
    err = capsys.readouterr().err
    assert "skipped 2 files that are not images" in err and str(tmp_path) in err
    again = load_data(str(tmp_path))
    paths = lambda s: sorted(r["path"] for r in s.test.cast_column(s.image_column, Img(decode=False))[s.image_column])  # noqa: E731
    assert paths(again) == paths(src)  # the held-out images are the same every time


def test_folder_without_images_names_the_forms(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="holds no images.*local data forms") as err:
        load_data(str(tmp_path))
    assert "list.csv" in str(err.value)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_list_of_image_paths_with_labels_and_splits(tmp_path, suffix):
    import pandas as pd

    names = [f"photos/{i}.png" for i in range(6)]
    _photos(tmp_path, names)
    rows = pd.DataFrame({"path": names, "label": ["cat", "dog", "cat", "dog", "cat", "dog"],
                         "split": ["train"] * 4 + ["test"] * 2})
    listing = tmp_path / "lists" / f"all{suffix}"
    os.makedirs(listing.parent)
    rows["path"] = "../" + rows["path"]  # relative to the list's own folder
    {".csv": lambda: rows.to_csv(listing, index=False), ".jsonl": lambda: rows.to_json(listing, orient="records", lines=True),
     ".json": lambda: rows.to_json(listing, orient="records")}[suffix]()
    src = load_data(str(listing))
    assert (len(src.train), len(src.test)) == (4, 2) and src.class_names == ["cat", "dog"]
    first = src.test[0]
    assert first[src.image_column].getpixel((0, 0)) == (40, 215, 28)  # photos/4.png, read from the right place
    assert src.class_names[first[src.label_column]] == "cat" and "split" not in src.train.column_names


def test_an_unlabelled_list_holds_out_a_test_split_and_bad_lists_are_named(tmp_path):
    names = [f"{i}.png" for i in range(10)]
    _photos(tmp_path, names)
    (tmp_path / "list.csv").write_text("file\n" + "\n".join(names) + "\n")
    src = load_data(str(tmp_path / "list.csv"))
    assert not src.has_labels and (len(src.train), len(src.test)) == (9, 1)
    (tmp_path / "missing.csv").write_text("file\n0.png\nnope.png\n")
    with pytest.raises(DataError, match=r"1 of the 2 images listed in .*missing.csv do not exist \(first: .*nope.png\)"):
        load_data(str(tmp_path / "missing.csv"))
    (tmp_path / "nocol.csv").write_text("where\n0.png\n1.png\n")
    with pytest.raises(DataError, match="no column of image paths.*--image-column"):
        load_data(str(tmp_path / "nocol.csv"))
    assert load_data(str(tmp_path / "nocol.csv"), image_column="where").train.num_rows == 1
    (tmp_path / "one.csv").write_text("file\n0.png\n")
    with pytest.raises(DataError, match="1 image: too few to hold out a test split"):
        load_data(str(tmp_path / "one.csv"))
    (tmp_path / "badsplit.csv").write_text("file,split\n0.png,train\n1.png,val\n")
    with pytest.raises(DataError, match=r"'split' column .* holds \['train', 'val'\]: use 'train' and 'test'"):
        load_data(str(tmp_path / "badsplit.csv"))
    with pytest.raises(DataError, match="drop --streaming"):
        load_data(str(tmp_path / "list.csv"), streaming=True)


UNLABELLED_RUN = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "8",
                  "--num-workers", "0", "--steps", "1"]
OBJECTIVE_ARGS = {"masked_patch": [], "mae": ["--decoder-dim", "32", "--decoder-depth", "1"],
                  "dino": ["--out-dim", "32", "--hidden-dim", "32", "--bottleneck-dim", "16", "--local-crops-number", "2"]}


def test_an_unlabelled_folder_trains_the_self_supervised_recipes_and_is_refused_by_supervised(tmp_path):
    from ssl_vit.checkpoint import load_checkpoint
    from ssl_vit.train import run_recipe

    _photos(tmp_path / "photos", [f"{i}.png" for i in range(20)])
    data = ["--data", str(tmp_path / "photos")]
    for objective, extra in OBJECTIVE_ARGS.items():
        path = run_recipe(objective, argv=[*UNLABELLED_RUN, *extra, *data, "--out", str(tmp_path / objective)])
        assert load_checkpoint(path)["step"] == 1
    with pytest.raises(DataError, match="needs labels and .*photos has no label column"):
        run_recipe("supervised", argv=[*UNLABELLED_RUN, *data, "--out", str(tmp_path / "sup")])
    assert not (tmp_path / "sup").exists()  # refused before the folder was touched
