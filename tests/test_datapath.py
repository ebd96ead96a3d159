"""The data path for GPUs: uint8 batches normalised on the device, --num-workers auto, --data-on-device."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import small_digits
from ssl_vit.checkpoint import load_checkpoint
from ssl_vit.config import TrainConfig, parse_run_config
from ssl_vit.data import (MEAN, STD, DataError, EpochSampler, ImageDataset, MultiCrop, eval_transform,
                          load_data, make_loader, resolve_workers, train_transform)
from ssl_vit.data import in_memory
from ssl_vit.data.device import DeviceBatch, normalize
from ssl_vit.data.in_memory import InMemoryLoader, batch_augmentation, decode_split
from ssl_vit.errors import ConfigError
from ssl_vit.objectives import DataInfo, get_objective
from ssl_vit.train import run_recipe
from test_train import TINY, assert_same_weights

OBJECTIVES = ["supervised", "masked_patch", "mae", "dino", "msn"]
SMALL_VIEWS = {"dino": ["--local-crops-number", "2", "--local-crop-size", "8"],
               "msn": ["--focal-views", "2", "--focal-size", "8"]}


def _batch(transform, n: int = 8) -> dict:
    src = load_data("default")
    ds = ImageDataset(src.train, src.image_column, src.label_column, transform, seed=5)
    return next(iter(make_loader(ds, EpochSampler(len(ds), n, seed=5), 0, False)))


@pytest.mark.parametrize("make", [
    lambda uint8: train_transform(16, uint8=uint8),
    lambda uint8: MultiCrop(16, 8, 2, uint8=uint8),
    lambda uint8: eval_transform(16, uint8=uint8),
    lambda uint8: eval_transform(224, uint8=uint8),
], ids=["train", "multicrop", "eval", "eval-224"])
def test_uint8_batches_normalised_on_the_device_equal_the_float_path(make):
    as_float, as_uint8 = _batch(make(False))["image"], _batch(make(True))["image"]
    views = as_uint8 if isinstance(as_uint8, list) else [as_uint8]
    assert all(v.dtype == torch.uint8 for v in views)
    torch.testing.assert_close(normalize(as_uint8), as_float, rtol=0, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_s_trainer_transform_sends_uint8(objective):
    cls = get_objective(objective)
    run = parse_run_config(objective, cls.Config, cls.recipe_defaults, argv=[])
    out = cls.train_transform(run.train, run.objective_config, DataInfo("x", 10, None, MEAN, STD, 32), uint8=True)(
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)))
    assert all(v.dtype == torch.uint8 for v in (out if isinstance(out, list) else [out]))


def test_random_erasing_runs_on_the_normalised_batch_on_the_device():
    images = torch.full((16, 3, 8, 8), 128, dtype=torch.uint8)
    erased = DeviceBatch(random_erasing=1.0)({"image": images})["image"]
    plain = DeviceBatch()({"image": images})["image"]
    assert plain.dtype == torch.float32 and torch.equal(plain, normalize(images))
    assert all(not torch.equal(e, p) for e, p in zip(erased, plain))  # one box of noise in every image


# ----- --num-workers auto -----
def test_num_workers_auto_resolves_from_the_cpus_per_process(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    assert TrainConfig().num_workers == "auto"
    assert resolve_workers("auto") == min(16, cpus - 1)
    assert resolve_workers("auto", processes_here=cpus) == 0
    assert resolve_workers(3) == 3
    cls = get_objective("supervised")
    assert parse_run_config("supervised", cls.Config, {}, argv=["--num-workers", "4"]).train.num_workers == 4
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"num_workers": 2}}))  # a config.json from before "auto"
    assert parse_run_config("supervised", cls.Config, {}, argv=["--config", str(config)]).train.num_workers == 2
    with pytest.raises(ConfigError, match=r"--num-workers 'some': use auto or a whole number >= 0"):
        parse_run_config("supervised", cls.Config, {}, argv=["--num-workers", "some"])
    with pytest.raises(ConfigError, match=r"--num-workers -1: use auto or a whole number >= 0"):
        TrainConfig(num_workers=-1)


# ----- --data-on-device -----
def _device_loader(objective: str, rank: int = 0, world: int = 1, same_image: bool = True):
    """A device-path loader of ``objective``'s recipe at 16 px over 64 digits (each one copy of the
    first digit with ``same_image``, so batches differ by their augmentation alone)."""
    cls = get_objective(objective)
    run = parse_run_config(objective, cls.Config, cls.recipe_defaults, argv=[*TINY, *SMALL_VIEWS.get(objective, [])])
    src = load_data("default")
    images, labels = decode_split(src.train.select(range(64)), src.image_column, src.label_column, "digits",
                                  torch.device("cpu"))
    if same_image:
        images = images[:1].expand_as(images).contiguous()
    transform = cls.train_transform(run.train, run.objective_config, DataInfo("x", 10, None, MEAN, STD, 16), uint8=True)
    sampler = EpochSampler(len(images), 8, seed=0, rank=rank, world_size=world)
    return InMemoryLoader(images, labels, batch_augmentation(transform, 16, run.train), sampler, seed=0), sampler


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_device_batches_have_the_objective_s_views_and_differ_by_rank_and_step(objective):
    loader, sampler = _device_loader(objective)
    first, second = list(loader)[:2]
    views = first["image"] if isinstance(first["image"], list) else [first["image"]]
    shapes = {"dino": [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2, "msn": [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2}
    assert [tuple(v.shape) for v in views] == shapes.get(objective, [(8, 3, 16, 16)])
    assert all(v.dtype == torch.uint8 for v in views) and first["label"].shape == (8,)
    other_rank = next(iter(_device_loader(objective, rank=1, world=2)[0]))
    as_list = (lambda b: b["image"] if isinstance(b["image"], list) else [b["image"]])
    assert not torch.equal(as_list(first)[0], as_list(second)[0])  # the same image, another step
    assert not torch.equal(as_list(first)[0], as_list(other_rank)[0])  # the same image, another process
    sampler.set_epoch(1, start_batch=3)  # a resumed epoch: its batches as a whole pass gives them
    resumed = next(iter(loader))
    sampler.set_epoch(1)
    whole = list(loader)[3]
    assert all(torch.equal(a, b) for a, b in zip(as_list(resumed), as_list(whole)))


def test_device_crops_follow_the_per_image_crop_and_flip():
    """A full-image box without flip returns the image; with flip, its mirror; crop boxes fit the image
    and are drawn as torchvision's RandomResizedCrop draws them (area and shape statistics)."""
    from torchvision.transforms import RandomResizedCrop

    unit = torch.rand(4, 3, 12, 12)
    whole = torch.tensor([[0.0, 0.0, 12.0, 12.0]] * 4)
    torch.testing.assert_close(in_memory.resized_crops(unit, whole, torch.zeros(4, dtype=torch.bool), 12), unit)
    torch.testing.assert_close(in_memory.resized_crops(unit, whole, torch.ones(4, dtype=torch.bool), 12), unit.flip(-1))
    top, left, h, w = in_memory.crop_boxes(1000, 12, 20, (0.08, 1.0)).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 12).all() and (left + w <= 20).all()
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 12, 20), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(1000)], dtype=torch.float32)
    for ours, theirs in ((h * w, ref[:, 2] * ref[:, 3]), (h / w, ref[:, 2] / ref[:, 3])):
        assert abs(ours.mean() - theirs.mean()) < 0.1 * theirs.mean()


def test_a_data_on_device_run_resumes_to_the_same_weights(tmp_path):
    small = ["--data", small_digits(tmp_path / "data"), "--batch-size", "8", "--steps", "8", "--data-on-device"]
    run_recipe("supervised", {}, argv=[*TINY, *small, "--out", str(tmp_path / "run"), "--stop-at", "3"])
    resumed = load_checkpoint(run_recipe("supervised", {}, argv=[*TINY, *small, "--out", str(tmp_path / "run")]))
    whole = load_checkpoint(run_recipe("supervised", {}, argv=[*TINY, *small, "--out", str(tmp_path / "whole")]))
    assert_same_weights(resumed, whole)


def test_data_on_device_refuses_what_it_cannot_hold_by_name(tmp_path, monkeypatch):
    src = load_data("default")
    split = src.train.select(range(16))
    monkeypatch.setattr(in_memory, "device_memory", lambda device: 4 * 16 * 3 * 8 * 8 - 1)  # a quarter is too little
    with pytest.raises(DataError, match=r"--data-on-device: the train split of digits decoded is 0\.0 GiB "
                                        r"\(16 images x 3 x 8 x 8 uint8\), more than .*drop --data-on-device"):
        decode_split(split, src.image_column, src.label_column, "digits", torch.device("cpu"))
    monkeypatch.undo()
    from datasets import Dataset, Features, Image as ImageFeature
    rows = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 9))]
    ds = Dataset.from_dict({"image": rows}, features=Features({"image": ImageFeature()}))
    with pytest.raises(DataError, match=r"--data-on-device needs images of one size: row 1 of two is \(9, 8\), "
                                        r"row 0 \(8, 8\); resize the data set, or drop --data-on-device"):
        decode_split(ds, "image", None, "two", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"--randaugment rand-m9 with --data-on-device: .* drop one of them"):
        batch_augmentation(train_transform(16), 16, TrainConfig(randaugment="rand-m9"))
    with pytest.raises(ConfigError, match=r"--data-on-device with --streaming: .* drop one of them"):
        run_recipe("supervised", {}, argv=[*TINY, "--data", small_digits(tmp_path / "d"), "--streaming",
                                           "--data-on-device", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_crop_and_flip_draws_and_crops_as_torchvision_v2():
    """The per-image crop and flip, called without v2's dispatch, give v2's images and leave its random state."""
    from torchvision.transforms import v2
    from ssl_vit.data.transforms import CropAndFlip

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    reference = v2.Compose([v2.RandomResizedCrop(24, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                                 antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    ours = v2.Compose([CropAndFlip(24, (0.08, 1.0)), v2.PILToTensor()])
    for seed in range(40):
        torch.manual_seed(seed)
        expected, state = reference(image), torch.get_rng_state()
        torch.manual_seed(seed)
        assert torch.equal(ours(image), expected) and torch.equal(torch.get_rng_state(), state), seed


def test_workers_decode_the_split_onto_the_device_as_one_process_does():
    """A worker sends one tensor per chunk of 1024 images: each tensor a worker sends keeps a file
    descriptor open, so one per image ran out of them on CIFAR-10 (50,000 against a limit of 20,000;
    here 1,437 against 256)."""
    import resource

    src = load_data("default")
    alone = decode_split(src.train, src.image_column, src.label_column, "digits", torch.device("cpu"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        workers = decode_split(src.train, src.image_column, src.label_column, "digits", torch.device("cpu"),
                               workers=1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(alone[0]) == len(src.train) > 1024
    assert torch.equal(alone[0], workers[0]) and torch.equal(alone[1], workers[1])


def test_a_worker_augments_each_example_as_the_training_process_does():
    """Workers only seed their generators per example (nothing else draws from them); the batches equal
    those made in the training process, which saves and restores its own random state around each."""
    src = load_data("default")
    ds = ImageDataset(src.train, src.image_column, src.label_column, train_transform(16, uint8=True), seed=2)
    here, worker = (next(iter(make_loader(ds, EpochSampler(len(ds), 16, seed=2), workers, False)))
                    for workers in (0, 1))
    assert torch.equal(here["image"], worker["image"]) and torch.equal(here["index"], worker["index"])
