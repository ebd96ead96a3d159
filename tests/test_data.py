"""Naming a data set: every form, and the bad inputs a user will hit."""

import os

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


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    src = load_data("default")
    ds = ImageDataset(src.train, src.image_column, src.label_column, train_transform(16), seed=3)
    torch.manual_seed(0)
    a = ds[(2, 7)]["image"]
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(a, ds[(2, 7)]["image"])
    assert not torch.equal(a, ds[(3, 7)]["image"])  # another epoch, another crop


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
