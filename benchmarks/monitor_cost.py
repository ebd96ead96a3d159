"""What the online monitors (``--monitor knn,fewshot,rankme``) add to a CPU pretraining run's wall time.

    OMP_NUM_THREADS=1 python benchmarks/monitor_cost.py [--objective supervised] [--steps 4] [--data PATH]

Side by side in one process, on CIFAR-10 (``../shared/data/cifar10`` when present, else the
embedded digits) with the recipe's ViT-Ti/4 at 32 px: a short run without monitors and the same
run with all three at their defaults (one measurement, at its last step). The test split is cut
to its first ``TEST_ROWS`` images, for both runs alike, so that each run's final test pass stays short. Their wall-time
difference is what the monitors cost: decoding the monitor images once, plus one measurement.
Both are also timed alone (``Monitors.build`` and ``Monitors.measure`` on the run's backbone),
and the seconds per training step come from the unmonitored run's ``metrics.jsonl``. The extra
wall time of a full run is then

    (decode + (steps / monitor_every) x measurement) / (steps x seconds per step)

reported for the recipe's step count and for a 10x longer run. A shared machine makes every
figure rough: the parts are timed more than once and the medians kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ssl_vit.checkpoint import load_backbone
from ssl_vit.config import TrainConfig, recipe_defaults
from ssl_vit.data import load_data
from ssl_vit.evaluation.monitor import Monitors
from ssl_vit.objectives import DataInfo
from ssl_vit.train import run_recipe

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
TEST_ROWS = 1000
ALL = "knn,fewshot,rankme"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def seconds_per_step(run: Path, batch_size: int) -> float:
    """Median seconds per optimizer step over the run's training records (setup excluded)."""
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return statistics.median(batch_size / r["images_per_s"] for r in records if "images_per_s" in r)


def short_test_split(spec: str, folder: Path) -> str:
    """A Parquet folder of ``spec``'s train split and the first ``TEST_ROWS`` images of its test split."""
    source = load_data(spec)
    folder.mkdir()
    source.train.to_parquet(str(folder / "data-train.parquet"))
    source.test.select(range(min(TEST_ROWS, len(source.test)))).to_parquet(str(folder / "data-test.parquet"))
    return str(folder)


def measure(args: argparse.Namespace, work: Path) -> dict:
    data = short_test_split(args.data, work / "data")
    base = ["--data", data, "--steps", str(args.steps), "--log-every", "1", "--num-workers", "0",
            "--report-to", "none", "--save-every", "0"]
    monitored = ["--monitor", ALL, "--monitor-every", str(args.steps)]
    walls = {"plain": [], "monitored": []}
    for i in range(args.rounds):  # the two runs take turns, so load on a shared machine hits both
        for name, extra in (("plain", []), ("monitored", monitored)):
            out = work / f"{name}{i}"
            wall, _ = timed(lambda: run_recipe(args.objective, None, argv=[*base, *extra, "--out", str(out)]))
            walls[name].append(wall)
    run = recipe_defaults(args.objective)
    tc = TrainConfig(**{**vars(run.train), "data": data, "monitor": ALL, "num_workers": 0})
    backbone, ckpt = load_backbone(str(work / "plain0" / "ckpt.pt"))
    info = DataInfo(**{f.name: ckpt["data"][f.name] for f in dataclasses.fields(DataInfo)})
    source, acc = load_data(data), SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    decode, monitors = zip(*(timed(lambda: Monitors.build(tc, source, info, acc)) for _ in range(args.rounds)))
    calls = [timed(lambda: monitors[0].measure(backbone))[0] for _ in range(args.rounds)]
    step = statistics.median(seconds_per_step(work / f"plain{i}", run.train.batch_size) for i in range(args.rounds))
    return {"objective": args.objective, "data": args.data, "steps_timed": args.steps, "rounds": args.rounds,
            "monitor_every": tc.monitor_every, "monitor_max_train": tc.monitor_max_train,
            "monitor_max_test": tc.monitor_max_test, "recipe_steps": run.train.steps,
            "seconds_per_step": step, "decode_s": statistics.median(decode), "measure_s": statistics.median(calls),
            "run_plain_s": statistics.median(walls["plain"]), "run_monitored_s": statistics.median(walls["monitored"]),
            "threads": torch.get_num_threads()}


def extra_fraction(r: dict, steps: int) -> float:
    """The monitors' share of a ``steps``-step run's wall time, at ``r``'s defaults."""
    calls = -(-steps // r["monitor_every"])  # every monitor_every steps, and at the last
    return (r["decode_s"] + calls * r["measure_s"]) / (steps * r["seconds_per_step"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="supervised", help="recipe to run (default: supervised)")
    parser.add_argument("--data", default=str(CIFAR10) if CIFAR10.exists() else "default")
    parser.add_argument("--steps", type=int, default=4, help="steps of each timed run (default: 4)")
    parser.add_argument("--rounds", type=int, default=2, help="times each part is timed (medians kept)")
    parser.add_argument("--json", default=None, help="also write the record here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        r = measure(args, Path(work))
    r["extra_recipe_run"] = extra_fraction(r, r["recipe_steps"])
    r["extra_10x_run"] = extra_fraction(r, 10 * r["recipe_steps"])
    print(f"{r['objective']} on {os.path.basename(r['data'])}: {r['seconds_per_step']:.2f} s/step; monitors at their "
          f"defaults (every {r['monitor_every']} steps, {r['monitor_max_train']} + {r['monitor_max_test']} images): "
          f"decode once {r['decode_s']:.1f} s, one measurement {r['measure_s']:.1f} s")
    print(f"{args.steps}-step runs: {r['run_plain_s']:.1f} s without, {r['run_monitored_s']:.1f} s with "
          f"(+{r['run_monitored_s'] - r['run_plain_s']:.1f} s = decode + one measurement)")
    print(f"extra wall time: {100 * r['extra_recipe_run']:.1f} % of the recipe's {r['recipe_steps']}-step run, "
          f"{100 * r['extra_10x_run']:.1f} % of a {10 * r['recipe_steps']}-step run")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return r


if __name__ == "__main__":
    sys.exit(main() and 0)
