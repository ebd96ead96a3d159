"""Images/s per CPU core of the input pipeline, for each objective's augmentation, at 32 and 224 px.

    python benchmarks/loader_speed.py                                   # both sizes, every objective
    python benchmarks/loader_speed.py --img-size 32 --objectives supervised dino --seconds 2 --json out.json

Three paths deliver the same thing, a batch of normalised float images on the training device:

- ``pil``: the recipe's loader as the trainer builds it (``split_loader``: PIL decoding and the
  objective's per-image augmentation in ``--workers`` worker processes, uint8 batches), then the
  device normalisation (``ssl_vit.data.device``).
- ``device``: ``--data-on-device`` (``ssl_vit.data.in_memory``): the images decoded once (not timed),
  augmented a batch at a time on the device (CUDA when present, else one CPU thread).
- ``timm``: ``timm.data.create_loader`` with ``create_transform``'s same random resized crop (scale,
  bicubic) and flip, no colour jitter, its prefetcher normalising on the device, the same workers
  (crop-and-flip objectives only: timm has no multi-crop loader).

Data: CIFAR-10 from ``../shared/data/cifar10`` at 32 px when present, else synthetic 32 x 32 PNGs;
at 224 px synthetic 256 x 256 JPEGs (smooth random images, quality 90), made in memory. Rates are
counted from the batch after each worker has delivered one (workers started and busy) for at least
``--seconds``. Per core: images per CPU second of this process and its workers (from ``/proc``), so
other load on the machine does not lower it; images/s is wall-clock. With workers, the batches in flight at either end of the timed window
blur the count by up to one batch per worker, so the default is one worker (the trainer's code
path, one core) over at least MIN_BATCHES batches.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from datasets import Dataset, Features, Image as ImageFeature, Value
from PIL import Image

from ssl_vit.config import parse_run_config
from ssl_vit.data import MEAN, STD, DataSource, EpochSampler, load_data, resolve_workers
from ssl_vit.data.device import DeviceBatch
from ssl_vit.data.in_memory import InMemoryLoader, batch_augmentation, decode_split
from ssl_vit.objectives import DataInfo, get_objective
from ssl_vit.train.pipeline import Shard, split_loader
from ssl_vit.train.step import to_device

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
OBJECTIVES = ("supervised", "masked_patch", "mae", "dino", "msn")
CROP_AND_FLIP = {"supervised", "masked_patch", "mae"}  # the objectives whose augmentation timm's loader has
PAPER_SETTINGS = {"dino": dict(local_crop_size=96), "msn": dict(focal_size=96)}  # at 224 px (train_throughput's)
BATCH = {32: 128, 224: 64}
MIN_BATCHES = 4  # timed batches at least, whatever --seconds (DINO and MSN at 224 px: ~8 s on one core)
IMAGES = {32: 4096, 224: 512}  # images in the data set (the device path holds them all)
STORED_224 = 256  # synthetic images for 224 px crops are stored at 256 x 256 (ImageNet resized to 256)
REFERENCE_STEP = ("ViT-B/16 at 224 px, one H100-class GPU, bf16", 3000)  # images/s a training step consumes


# ----- data -----
def synthetic(n: int, size: int, fmt: str, seed: int = 0) -> Dataset:
    """n smooth random RGB images (8 x 8 noise upsampled, plus fine noise), encoded as ``fmt``, labels 0..9."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        rows.append({"bytes": buf.getvalue(), "path": None})
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    return Dataset.from_dict({"image": rows, "label": rng.integers(0, 10, n).tolist()}, features=features)


def data_for(img_size: int, n: int) -> DataSource:
    """CIFAR-10's first n training images at 32 px when present, else synthetic images."""
    if img_size == 32 and CIFAR10.exists():
        source = load_data(str(CIFAR10))
        return DataSource("cifar10", source.train.select(range(n)), None, source.image_column, source.label_column,
                          source.class_names)
    stored, fmt = (32, "PNG") if img_size == 32 else (STORED_224, "JPEG")
    return DataSource(f"synthetic {stored}px {fmt}", synthetic(n, stored, fmt), None, "image", "label",
                      [str(i) for i in range(10)])


def recipe(objective: str, img_size: int):
    """The recipe's settings at ``img_size`` (the papers' crop sizes at 224 px) and its augmentation."""
    cls = get_objective(objective)
    defaults = {**cls.recipe_defaults, "img_size": img_size, **(PAPER_SETTINGS.get(objective, {}) if img_size >= 224 else {})}
    run = parse_run_config(objective, cls.Config, defaults, argv=[])
    info = DataInfo("bench", 10, None, MEAN, STD, img_size)
    return run, cls, cls.train_transform(run.train, run.objective_config, info, uint8=True)


# ----- timing -----
def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live children (the loader's workers): from
    ``/proc`` on Linux, this process alone elsewhere. A rate per CPU second is a rate per core, whatever
    else loads the machine."""
    total = time.process_time()
    proc = Path("/proc")
    if not proc.exists():
        return total
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me:  # fields[1]: the parent's pid; [11], [12]: user and system ticks
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def time_batches(batches: Iterator, batch_size: int, warm: int, seconds: float, min_batches: int,
                 device: torch.device) -> tuple[float, float]:
    """(images/s, images per CPU second) of ``batches`` after the first ``warm`` ones, over at least
    ``seconds`` and ``min_batches``."""
    for _ in range(warm):
        next(batches)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, cpu0, done = time.perf_counter(), cpu_seconds(), 0
    while done < min_batches or time.perf_counter() - t0 < seconds:
        next(batches)
        done += 1
    sync()
    images = done * batch_size
    return images / (time.perf_counter() - t0), images / max(cpu_seconds() - cpu0, 1e-9)


def endless(loader, sampler: Optional[EpochSampler] = None) -> Iterator:
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def pil_rate(source: DataSource, objective: str, img_size: int, workers: int, seconds: float,
             device: torch.device) -> tuple[float, float]:
    run, cls, transform = recipe(objective, img_size)
    shard = Shard(micro_batch=BATCH[img_size], pin_memory=device.type == "cuda", workers=workers)
    label = source.label_column if cls.needs_labels else None
    loader, sampler = split_loader(source.train, source, label, transform, run, shard, train=True)
    prepare = DeviceBatch()
    batches = (prepare(to_device(b, device)) for b in endless(loader, sampler))
    return time_batches(batches, BATCH[img_size], max(workers, 1), seconds, MIN_BATCHES, device)


def device_rate(images: torch.Tensor, labels: torch.Tensor, objective: str, img_size: int, seconds: float
                ) -> tuple[float, float]:
    run, _, transform = recipe(objective, img_size)
    sampler = EpochSampler(len(images), BATCH[img_size], seed=0)
    loader = InMemoryLoader(images, labels, batch_augmentation(transform, img_size, run.train), sampler, seed=0)
    prepare = DeviceBatch()
    batches = (prepare(b) for b in endless(loader, sampler))
    return time_batches(batches, BATCH[img_size], 1, seconds, MIN_BATCHES, images.device)


class TimmDataset(torch.utils.data.Dataset):
    """The same rows for timm's loader: decoded to RGB PIL images, ``transform`` (set by timm) applied."""

    def __init__(self, split, image_column: str):
        self.split, self.image_column, self.transform = split, image_column, None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        img = self.split[i][self.image_column]
        return self.transform(img.convert("RGB")), 0


def timm_rate(source: DataSource, objective: str, img_size: int, workers: int, seconds: float,
              device: torch.device) -> tuple[float, float]:
    from timm.data import create_loader

    run, _, _ = recipe(objective, img_size)
    loader = create_loader(TimmDataset(source.train, source.image_column), (3, img_size, img_size), BATCH[img_size],
                           is_training=True, scale=tuple(run.train.crop_scale), hflip=0.5 if run.train.hflip else 0.0,
                           color_jitter=None, interpolation="bicubic", mean=MEAN, std=STD, num_workers=workers,
                           device=device, use_prefetcher=True, pin_memory=device.type == "cuda")
    return time_batches(endless(loader), BATCH[img_size], max(workers, 1), seconds, MIN_BATCHES, device)


# ----- the table -----
def pil_and_timm(source: DataSource, objective: str, img_size: int, workers: int, seconds: float,
                 device: torch.device) -> tuple[tuple[float, float], Optional[tuple[float, float]]]:
    """One turn of the PIL path, then timm's (None for objectives it has no loader for)."""
    pil = pil_rate(source, objective, img_size, workers, seconds, device)
    return pil, timm_rate(source, objective, img_size, workers, seconds, device) if objective in CROP_AND_FLIP else None


def medians(rates: list[tuple[float, float]]) -> tuple[float, float]:
    """The median images/s and images per core of several rounds."""
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


def measure(img_size: int, objectives: list[str], workers: int, seconds: float, device: torch.device,
            n_images: Optional[int] = None, rounds: int = 1) -> list[dict]:
    """A row per objective. With ``rounds`` > 1, the PIL and timm paths take turns that many times and
    the row holds the medians, and the median of the rounds' ratios (each round's two paths measured
    seconds apart, under the same load)."""
    source = data_for(img_size, n_images or IMAGES[img_size])
    t0 = time.perf_counter()
    images, labels = decode_split(source.train, source.image_column, source.label_column, source.name, device)
    decode_s = time.perf_counter() - t0
    rows = []
    for objective in objectives:
        turns = [pil_and_timm(source, objective, img_size, workers, seconds, device) for _ in range(rounds)]
        pil, pil_core = medians([p for p, _ in turns])
        on_device, device_core = device_rate(images, labels, objective, img_size, seconds)
        row = {"img_size": img_size, "objective": objective, "data": source.name, "batch_size": BATCH[img_size],
               "workers": workers, "rounds": rounds, "pil_images_per_s": pil, "pil_per_core": pil_core,
               "device": device.type, "device_images_per_s": on_device, "device_per_core": device_core,
               "device_decode_s": decode_s, "device_over_pil_per_core": device_core / pil_core}
        if objective in CROP_AND_FLIP:
            timm, timm_core = medians([t for _, t in turns])
            ratios = [p[1] / t[1] for p, t in turns]
            row.update(timm_images_per_s=timm, timm_per_core=timm_core,
                       pil_over_timm_per_core=statistics.median(ratios), pil_over_timm_per_core_rounds=ratios)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = ("px  objective     workers  pil img/s  pil /core  timm /core  pil/timm  device img/s  device /core  "
          f"device/pil  cores for {REFERENCE_STEP[1]} img/s (pil, device)")


def format_row(r: dict) -> str:
    timm = f"{r['timm_per_core']:10.0f}  {r['pil_over_timm_per_core']:8.2f}" if "timm_per_core" in r else f"{'-':>10}  {'-':>8}"
    need = REFERENCE_STEP[1]
    return (f"{r['img_size']:<3} {r['objective']:<13} {r['workers']:>7}  {r['pil_images_per_s']:9.0f}  "
            f"{r['pil_per_core']:9.0f}  {timm}  {r['device_images_per_s']:12.0f}  {r['device_per_core']:12.0f}  "
            f"{r['device_over_pil_per_core']:10.1f}  "
            f"{need / r['pil_per_core']:.1f}, {need / r['device_per_core']:.2f}")


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--img-size", type=int, nargs="+", default=[32, 224], choices=sorted(BATCH))
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per path (after warm-up)")
    p.add_argument("--rounds", type=int, default=1, help="turns of the PIL and timm paths; the medians are kept")
    p.add_argument("--workers", default="1", help="loader workers of the PIL and timm paths (auto: as the trainer; "
                   "each worker blurs the CPU count by up to a batch in flight at either end)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: 128 at 32 px, 64 at 224 px)")
    p.add_argument("--images", type=int, help="images in the data set (default: 4096 at 32 px, 512 at 224 px)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    device, workers = torch.device(args.device), resolve_workers(args.workers)
    if args.batch_size:
        BATCH.update({size: args.batch_size for size in BATCH})
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # the device path on one core
    try:
        return run(args, device, workers, argv)
    finally:
        torch.set_num_threads(threads)


def run(args, device: torch.device, workers: int, argv: Optional[list[str]]) -> dict:
    print(f"reference: {REFERENCE_STEP[0]}: a training step consumes ~{REFERENCE_STEP[1]} images/s; the last column "
          "is the CPU cores each path needs to keep up")
    print(HEADER)
    rows = [row for size in args.img_size
            for row in measure(size, args.objectives, workers, args.seconds, device, args.images, args.rounds)]
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
              "command": " ".join(["python", "benchmarks/loader_speed.py", *(argv if argv is not None else sys.argv[1:])]),
              "reference_step": {"what": REFERENCE_STEP[0], "images_per_s": REFERENCE_STEP[1]}, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
