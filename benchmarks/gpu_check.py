"""The one prepared GPU check: every GPU figure the toolkit reports, from one call of a few minutes.

    python benchmarks/gpu_check.py --out DIR            # on a machine with a CUDA GPU (under 8 minutes on an H200)
    python benchmarks/gpu_check.py --out DIR --smoke    # tiny sizes on a CPU: checks the script itself

Sections, each a subprocess with its own time limit (one that fails or runs out of time is recorded
with its output's tail, and the others still run):

1. ``eager``: ``train_throughput.py`` on ViT-B/16 at 224 px in bf16 on a batch already on the
   device: images/s, TFLOP/s and MFU of every objective; the MAE step against the supervised one.
2. ``loader``: the training loop itself (``recipes/<objective>.py``) on a synthetic 224 px image
   folder, fed by the real loader (decode, augment, workers; ``--num-workers auto``), and by the
   in-memory device path (``--data-on-device``) where the recipe has it: images/s from
   ``metrics.jsonl`` after warm-up, MFU from section 1's FLOPs per image.
3. ``fsdp``: 2-step runs under ``configs/accelerate/fsdp2.yaml``, and a DINO run resumed there.
4. ``pipeline``: ``loader_speed.py``, the input pipeline alone, images/s per core.
5. ``compiled``: supervised and MAE compiled (last: compiling ViT-B takes about a minute each).

Writes ``DIR/gpu_check.json`` (the device, versions, each section's command, exit status, seconds
and figures) and ``DIR/log.txt`` (every section's output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
OBJECTIVES = ["supervised", "masked_patch", "mae", "dino", "msn"]  # distill needs a trained teacher
COMPILED = ["supervised", "mae"]  # compiled too: compiling ViT-B takes about a minute per objective


@dataclass
class Sizes:
    """What one check runs at: the GPU sizes, or tiny ones for a CPU smoke run."""

    model: str = "vit_base/16@224"  # train_throughput.py's name
    backbone: tuple = ("--model", "vit_base", "--patch-size", "16", "--img-size", "224")
    batch: int = 256
    throughput: tuple = ("--rounds", "3", "--steps", "10", "--warmup", "3")
    images: int = 5120  # synthetic training images: JPEGs of ImageNet's mean size (about 400 x 350)
    image_px: tuple = (400, 350)
    loader_steps: int = 50
    fsdp_backbone: tuple = ("--model", "vit_small", "--patch-size", "16", "--img-size", "224")
    fsdp_batch: int = 32
    pipeline: tuple = ("--img-size", "32", "224", "--seconds", "4")
    # seconds per command: a section's whole run (eager, compiled, pipeline) or one launch (loader, fsdp)
    timeout: dict = field(default_factory=lambda: dict(eager=120, compiled=240, loader=60, pipeline=90, fsdp=45))


SMOKE = Sizes(model="vit_tiny/4@32", backbone=("--model", "vit_tiny", "--patch-size", "4", "--img-size", "32",
                                                "--depth", "1"),
              batch=8, throughput=("--depth", "1", "--rounds", "1", "--steps", "1", "--warmup", "1"),
              images=64, image_px=(40, 36), loader_steps=4, fsdp_backbone=("--model", "vit_tiny", "--patch-size", "4",
                                                                     "--img-size", "32", "--depth", "1"),
              fsdp_batch=8, pipeline=("--img-size", "32", "--seconds", "1"),
              timeout=dict(eager=150, compiled=300, loader=300, pipeline=120, fsdp=300))


# ----- running a section -----
MIN_SECONDS = 20  # a section given less is recorded as not run rather than started to time out


class Deadline:
    """The whole check's time limit: each section gets its own limit or what is left, if less."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def limit(self, seconds: float) -> Optional[float]:
        """``seconds``, or what is left if less; None when under ``MIN_SECONDS`` are left (not run)."""
        left = self.end - time.perf_counter()
        return min(seconds, left) if left >= MIN_SECONDS else None


def run_section(name: str, cmd: list[str], timeout: Optional[float], log, env: Optional[dict] = None) -> dict:
    """Run ``cmd`` from the repository root; its output goes to ``log``. Returns the command, exit
    status (124: out of time), seconds and the output's last 3,000 characters; ``timeout`` None:
    not run (the check's budget was spent)."""
    if timeout is None:
        print(f"== {name}: not run (the budget is spent)", flush=True)
        return {"command": " ".join(cmd), "rc": None, "seconds": 0.0, "not_run": "budget spent"}
    started = time.perf_counter()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    log.write(f"\n== {name}: {' '.join(cmd)}\n")
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc = 124
        output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    log.write(output)
    log.flush()
    seconds = time.perf_counter() - started
    print(f"   rc {rc} in {seconds:.0f} s", flush=True)
    return {"command": " ".join(cmd), "rc": rc, "seconds": round(seconds, 1),
            **({"tail": output[-3000:]} if rc else {})}


# ----- synthetic data -----
def _write_image(job: tuple) -> None:
    """One random RGB image as a JPEG: coarse noise upsampled, plus fine grain, so that it is
    neither as cheap to decode as a flat image nor as dear as white noise."""
    import numpy as np
    from PIL import Image

    path, (width, height), seed = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, pixels.shape, dtype=np.int16)
    Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8)).save(path, quality=90)


def synthetic_folder(root: Path, n: int, px: tuple, classes: int = 10) -> Path:
    """``root/<class>/<i>.jpg``: a labelled image folder of ``n`` images (any ``--data`` reads it)."""
    jobs = []
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{i:06d}.jpg"), px, i))
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_write_image, jobs, chunksize=64)
    return root


# ----- the sections -----
def model_section(sizes: Sizes, out: Path, log, label: str, deadline: Deadline) -> dict:
    """Section 1 (``eager``): the step alone of every objective; the last one (``compiled``): supervised
    and MAE compiled (each compile takes about a minute for ViT-B, so it comes last)."""
    objectives, compile_ = (OBJECTIVES, "off") if label == "eager" else (COMPILED, "on")
    path = out / f"throughput-{label}.json"
    cmd = [PY, "benchmarks/train_throughput.py", "--models", sizes.model, "--objectives", *objectives,
           "--batch-size", str(sizes.batch), *sizes.throughput, "--compile", compile_, "--no-references",
           "--no-memory", "--data", "", "--results-file", str(path)]
    result = run_section(f"model ({label})", cmd, deadline.limit(sizes.timeout[label]), log)
    return {**result, "rows": _throughput_rows(path)}


def _throughput_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    keep = ("objective", "model", "impl", "batch_size", "images_per_s", "tflops", "mfu", "flops_per_image", "error")
    return [{k: r[k] for k in keep if k in r} for run in json.loads(path.read_text())["runs"] for r in run["rows"]]


def _mae_ratio(rows: list[dict]) -> Optional[float]:
    """MAE's images/s over supervised's, both eager."""
    speed = {r["objective"]: r.get("images_per_s") for r in rows if r["impl"] == "ours"}
    return round(speed["mae"] / speed["supervised"], 3) if speed.get("mae") and speed.get("supervised") else None


def recipe_images_per_s(run: Path) -> Optional[float]:
    """The median images/s of a run's training records after the first (which holds the warm-up)."""
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    speeds = sorted(r["images_per_s"] for r in records[1:] if "images_per_s" in r)
    return speeds[len(speeds) // 2] if speeds else None


def recipe_command(objective: str, data: Path, out: Path, steps: int, batch: int,
                   backbone: tuple, *extra: str, launcher: tuple = ()) -> list[str]:
    """A recipe run as a user types it, with the check's sizes."""
    script = f"recipes/{objective}.py"
    head = [*launcher, script] if launcher else [PY, script]
    return [*head, *backbone, "--data", str(data), "--steps", str(steps), "--batch-size", str(batch),
            "--log-every", str(max(1, steps // 5)), "--report-to", "none", "--out", str(out), *extra]


def loader_section(sizes: Sizes, data: Path, work: Path, flops: dict, peak: Optional[float], log,
                   deadline: Deadline) -> dict:
    """Section 2: the training loop fed by the real loader, and by the in-memory device path."""
    results = {}
    for objective in ("supervised", "mae"):
        for path_name, extra in (("workers", ("--num-workers", "auto")), ("device", ("--data-on-device",))):
            run = work / f"loader-{objective}-{path_name}"
            cmd = recipe_command(objective, data, run, sizes.loader_steps, sizes.batch, sizes.backbone, *extra)
            limit = deadline.limit(sizes.timeout["loader"])
            result = run_section(f"loader ({objective}, {path_name})", cmd, limit, log)
            ips = recipe_images_per_s(run)
            result["images_per_s"] = ips
            if ips and flops.get(objective) and peak:
                result["mfu"] = round(ips * flops[objective] / (peak * 1e12), 4)
            results[f"{objective}/{path_name}"] = result
    return results


def pipeline_section(sizes: Sizes, out: Path, log, deadline: Deadline) -> dict:
    """Section 3: the input pipeline alone (``loader_speed.py``)."""
    path = out / "loader_speed.json"
    result = run_section("pipeline", [PY, "benchmarks/loader_speed.py", *sizes.pipeline, "--json", str(path)],
                         deadline.limit(sizes.timeout["pipeline"]), log)
    result["figures"] = json.loads(path.read_text()) if path.exists() else None
    return result


def fsdp_section(sizes: Sizes, data: Path, work: Path, log, deadline: Deadline) -> dict:
    """Section 3: two FSDP steps of supervised, MAE, MSN and distill (taught by the supervised run), each
    ending with its checkpoint; then a DINO run stopped at step 2 (its last layer still frozen) and
    resumed (masked patch shares supervised's path: the blocks, then the objective)."""
    launcher = (PY, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp2.yaml",
                "--num_processes", "1")
    teacher = ("--teacher", str(work / "fsdp-supervised" / "ckpt.pt"))
    runs = [(o, o, 2, ()) for o in ("supervised", "mae", "msn")] + [("distill", "distill", 2, teacher),
                                                                     ("dino-stop", "dino", 4, ("--stop-at", "2")),
                                                                     ("dino-resume", "dino", 4, ())]
    results = {}
    for name, objective, steps, extra in runs:
        run = work / ("fsdp-dino-resumed" if name.startswith("dino-") else f"fsdp-{name}")
        cmd = recipe_command(objective, data, run, steps, sizes.fsdp_batch, sizes.fsdp_backbone, *extra,
                             launcher=launcher)
        result = run_section(f"fsdp ({name})", cmd, deadline.limit(sizes.timeout["fsdp"]), log)
        result["checkpoint"] = (run / "ckpt.pt").exists()
        results[name] = result
    return results


# ----- the whole check -----
def device_record() -> dict:
    import torch

    gpu = torch.cuda.is_available()
    record = {"device": torch.cuda.get_device_name(0) if gpu else f"cpu ({os.cpu_count()} cores)",
              "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "cuda": torch.version.cuda}
    for name in ("timm", "accelerate", "datasets", "torchvision"):
        try:
            record[name] = __import__(name).__version__
        except Exception as err:  # a missing package is part of what the check reports
            record[name] = f"missing: {err}"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        record["nvidia_smi"] = smi.stdout.strip()
    return record


def peak_tflops() -> Optional[float]:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from measure import bf16_peak_tflops

    return bf16_peak_tflops(torch.device("cuda")) if torch.cuda.is_available() else None


# in this order: the cheap, essential figures first, compiling (about a minute per model) last
SECTIONS = ("eager", "loader", "fsdp", "pipeline", "compiled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json, log.txt and the sections' JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check the script on a CPU")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole check (default: 540)")
    p.add_argument("--work", help="folder for the synthetic data and the runs (default: a temporary one)")
    return p.parse_args(argv)


def run_sections(args, sizes: Sizes, out: Path, work: Path, record: dict, log) -> dict:
    """Every requested section in ``SECTIONS`` order, within ``--budget``."""
    deadline, sections, data = Deadline(args.budget), {}, None
    if {"loader", "fsdp"} & set(args.sections):
        t0 = time.perf_counter()
        data = synthetic_folder(work / "images", sizes.images, sizes.image_px)
        record["synthetic_data_s"] = round(time.perf_counter() - t0, 1)
    for name in (s for s in SECTIONS if s in args.sections):
        if name in ("eager", "compiled"):
            sections[name] = model_section(sizes, out, log, name, deadline)
        elif name == "loader":
            flops = {r["objective"]: r.get("flops_per_image") for r in sections.get("eager", {}).get("rows", [])}
            sections[name] = loader_section(sizes, data, work, flops, record["peak_bf16_tflops"], log, deadline)
        elif name == "fsdp":
            sections[name] = fsdp_section(sizes, data, work, log, deadline)
        else:
            sections[name] = pipeline_section(sizes, out, log, deadline)
    rows = [r for name in ("eager", "compiled") for r in sections.get(name, {}).get("rows", [])]
    sections["mae_over_supervised"] = _mae_ratio(rows)
    return sections


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or f"/tmp/gpu_check-{os.getpid()}")
    started = time.perf_counter()
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke,
              "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
              **device_record(), "peak_bf16_tflops": peak_tflops()}
    print(json.dumps(record, indent=1), flush=True)
    with open(out / "log.txt", "a") as log:
        record["sections"] = run_sections(args, sizes, out, work, record, log)
    record["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print(summary(record))
    return record


def summary(record: dict) -> str:
    """The figures a reader wants first, one line each."""
    lines = [f"{record['device']}, torch {record['torch']}, {record['seconds']:.0f} s"]
    sections = record["sections"]
    for r in [r for name in ("eager", "compiled") for r in sections.get(name, {}).get("rows", [])]:
        mfu = f", MFU {100 * r['mfu']:.1f} %" if r.get("mfu") is not None else ""
        speed = f"{r['images_per_s']:.0f} img/s" if r.get("images_per_s") else f"error: {r.get('error')}"
        lines.append(f"model  {r['objective']:<13} {r['impl']:<14} {speed}{mfu}")
    if sections.get("mae_over_supervised"):
        lines.append(f"model  MAE step / supervised step (images/s): {sections['mae_over_supervised']:.2f}")
    for name, r in record["sections"].get("loader", {}).items():
        mfu = f", MFU {100 * r['mfu']:.1f} %" if r.get("mfu") is not None else ""
        lines.append(f"loader {name:<24} rc {r['rc']}: {r.get('images_per_s') or 0:.0f} img/s{mfu}")
    pipeline = record["sections"].get("pipeline")
    if pipeline:
        lines.append(f"pipeline rc {pipeline['rc']} ({pipeline['seconds']:.0f} s)")
    for name, r in record["sections"].get("fsdp", {}).items():
        lines.append(f"fsdp   {name:<13} rc {r['rc']}, checkpoint {'written' if r.get('checkpoint') else 'missing'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
