"""Training throughput, peak memory and FLOP utilisation of every objective, beside lightly and vit-pytorch.

    python benchmarks/train_throughput.py --quick        # CPU-sized: ViT-Ti/4 at 32 px, < 10 minutes
    python benchmarks/train_throughput.py                # every model (ViT-Ti/S/B/16 at 224, ViT-Ti/4 at
                                                         # 32, R50+ViT-B/16); for a GPU
    python benchmarks/train_throughput.py --models vit_base/16@224 --objectives supervised mae --compile both

What one step is, for every implementation alike: the forward pass on a synthetic batch already
on the device, backward, gradient-norm clipping (the recipe's threshold; the norm is computed even
without one, as our loop does), the loop's finite-loss check, AdamW (timm ``create_optimizer_v2``
with the recipe's settings, fused on CUDA), and the method's own per-step hooks (DINO's EMA
teacher and centre). Ours is built exactly as ``Trainer`` builds it: the recipe's defaults
(the objective's ``recipe_defaults``, what ``recipes/<objective>.py`` runs), ``get_objective(name)(build_backbone(...), Config, DataInfo)``,
the objective's own augmentation for the batch's shape (DINO: a list of multi-crop batches).
The other libraries' models are built at the same width, depth, heads, patch and image size,
mask ratio, decoder and DINO head (``reference_models.py``).

Timing: each model warms up, then the implementations of one objective take turns (the order
rotating every round) for ``--rounds`` rounds of ``--steps`` steps (at least ``--round-seconds``);
images/s is the median over rounds and ours/theirs the median of the per-round ratios, so a load
spike on a shared machine hits every implementation alike. Peak memory comes
from a fresh process per implementation (CPU: peak RSS growth over the RSS before building the
model; CUDA: ``max_memory_allocated``). FLOPs per image come from
``torch.utils.flop_counter.FlopCounterMode`` over one step (forward + backward); MFU divides the
achieved FLOP/s by the device's dense bf16 peak (GPU only).

Results go to ``benchmarks/results/<device>-<date>.json``; ``--update-readme`` rebuilds the table in
``benchmarks/README.md`` from every saved result.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.backbone import PRESETS, build_backbone
from ssl_vit.config import RunConfig, parse_run_config
from ssl_vit.data import MEAN, STD, DataSource, load_data, resolve_workers
from ssl_vit.errors import ConfigError
from ssl_vit.objectives import OBJECTIVES, DataInfo, StepInfo, get_objective
from ssl_vit.train.flops import example_batch
from ssl_vit.train.optim import FUSED, build_optimizer
from ssl_vit.train.pipeline import Shard, split_loader
from ssl_vit.train.step import optimizer_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (SyncAudit, bf16_peak_tflops, device_slug, median_rate,  # noqa: E402
                     peak_training_memory, synchronize)
from reference_models import REFERENCES, Geometry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
OURS = "ours"
NUM_CLASSES = 10  # synthetic labels for supervised
STEP_HORIZON = StepInfo(step=0, total_steps=10_000, epoch=0, steps_per_epoch=1_000)  # what the hooks see
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"

# name -> backbone flags. The hybrid is the paper's R50+ViT-B/16.
MODELS: dict[str, dict] = {
    "vit_tiny/4@32": dict(model="vit_tiny", patch_size=4, img_size=32),
    "vit_tiny/16@224": dict(model="vit_tiny", patch_size=16, img_size=224),
    "vit_small/16@224": dict(model="vit_small", patch_size=16, img_size=224),
    "vit_base/16@224": dict(model="vit_base", patch_size=16, img_size=224),
    "r50_vit_base@224": dict(model="r50_vit_base", patch_size=None, img_size=224),  # 1x1 patches of its stride-16 map
}
# At 224 px the papers' settings replace the recipes' small-image ones.
PAPER_SETTINGS: dict[str, dict] = {
    "mae": dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "dino": dict(local_crop_size=96, out_dim=65536),
    "msn": dict(focal_size=96, num_prototypes=1024),
}
DEFAULT_BATCH = {"vit_tiny/4@32": 128, "r50_vit_base@224": 128}  # others: 256
# One thread: on a shared 2-core machine two OpenMP threads per process oversubscribe the cores and
# their spin-waits make every step several times slower (pass --threads 2 on an idle machine).
QUICK = dict(models=["vit_tiny/4@32"], batch_size=32, warmup=2, rounds=7, steps=1, round_seconds=1.5,
             data_batches=8, threads=1)


@dataclass(frozen=True)
class Spec:
    """One implementation of one objective on one model: enough to rebuild it in another process."""

    objective: str
    model: str
    impl: str  # OURS or a name from reference_models.REFERENCES
    batch_size: int
    depth: Optional[int]
    device: str
    precision: str  # "no" or "bf16"
    compile: bool = False
    fused: bool = False
    channels_last: bool = False

    @property
    def label(self) -> str:
        return self.impl + ("+compile" if self.compile else "")


@dataclass
class Trainee:
    """What a timed step runs: a module, its loss, its optimizer and its per-step hooks."""

    spec: Spec
    eager: nn.Module
    loss: Callable[[nn.Module, dict], torch.Tensor]  # (module, batch) -> scalar loss
    batch: dict
    optimizer: torch.optim.Optimizer
    clip_grad: float
    clip_mode: str
    start_step: Callable[[StepInfo], None]
    before_optimizer_step: Callable[[StepInfo], None]
    end_step: Callable[[StepInfo], None]
    note: str = ""
    finite: Optional[torch.Tensor] = None  # 0-d bool: every step so far was finite; read after a turn

    def __post_init__(self):
        self.module = torch.compile(self.eager) if self.spec.compile else self.eager
        self.acc = Accelerator(cpu=self.spec.device == "cpu", mixed_precision=self.spec.precision)


# ----- building, as the Trainer does -----
def run_config(spec: Spec) -> RunConfig:
    """The recipe's run config with this model, depth and batch (parsed like its command line)."""
    defaults = dict(get_objective(spec.objective).recipe_defaults)
    backbone = MODELS[spec.model]
    defaults.update(backbone)
    if backbone["img_size"] >= 224:
        defaults.update(PAPER_SETTINGS.get(spec.objective, {}))
    defaults.update(batch_size=spec.batch_size, precision=spec.precision)
    if spec.depth is not None:
        defaults["depth"] = spec.depth
    try:
        return parse_run_config(spec.objective, get_objective(spec.objective).Config, defaults, argv=[])
    except (SystemExit, ConfigError) as err:  # argparse's and the configs' ways of refusing settings
        raise ValueError(f"recipes/{spec.objective}.py's settings do not parse: {err}") from None


def build_trainee(spec: Spec) -> Trainee:
    device = torch.device(spec.device)
    run = run_config(spec)
    cls = get_objective(spec.objective)
    info = DataInfo("synthetic", NUM_CLASSES, None, MEAN, STD, run.backbone.img_size)
    channels_last = spec.channels_last and PRESETS[run.backbone.model].hybrid
    batch = example_batch(cls.train_transform(run.train, run.objective_config, info), spec.batch_size,
                          run.backbone.img_size, device, NUM_CLASSES,
                          torch.channels_last if channels_last else torch.contiguous_format)
    if spec.impl == OURS:
        objective = cls(build_backbone(run.backbone), run.objective_config, info).to(device)
        if channels_last:
            objective.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(objective, run.train, fused=spec.fused and run.train.optimizer in FUSED)
        return Trainee(spec, objective, lambda m, b: m(b)[0], batch, optimizer, run.train.clip_grad,
                       run.train.clip_grad_mode,
                       start_step=lambda i: objective.start_step(i, optimizer),
                       before_optimizer_step=objective.before_optimizer_step, end_step=objective.end_step)
    builder = dict(REFERENCES.get(spec.objective, []))[spec.impl]
    with torch.device("meta"):  # our backbone's geometry, without allocating its weights
        geometry = Geometry.of(build_backbone(run.backbone))
    ref = builder(run, geometry, NUM_CLASSES)
    ref.model.to(device)
    optimizer = build_optimizer(ref.model, run.train, fused=spec.fused and run.train.optimizer in FUSED)
    return Trainee(spec, ref.model, ref.loss, batch, optimizer, run.train.clip_grad, run.train.clip_grad_mode,
                   start_step=lambda i: None,
                   before_optimizer_step=lambda i: ref.before_optimizer_step(i.step),
                   end_step=lambda i: ref.end_step(i.step), note=ref.note)


# ----- one step, the same for every implementation -----
def train_step(t: Trainee, step: int, audit: Optional[SyncAudit] = None, eager: bool = False) -> None:
    """The trainer's own optimizer step (``ssl_vit.train.step.optimizer_step``: forward and backward,
    the hooks, clipping, the finite check, the update) on the trainee's batch. ``eager``: run the
    uncompiled module (what the FLOP counter and the sync audit can see). Its finite flag is kept on
    the device, as the trainer keeps it; ``check_finite`` reads it."""
    info = dataclasses.replace(STEP_HORIZON, step=step)
    module = t.eager if eager else t.module
    hooks = SimpleNamespace(start_step=lambda i, _: t.start_step(i), before_optimizer_step=t.before_optimizer_step,
                            end_step=t.end_step)
    result = optimizer_step(t.acc, t.eager, hooks, t.optimizer, [dict(t.batch)], info, t.clip_grad, t.clip_mode,
                            forward=lambda batch: (t.loss(module, batch), {}),
                            host_sync=audit.ignoring if audit else nullcontext)  # its syncs are the loop's own
    t.finite = result.finite if t.finite is None else t.finite & result.finite


def check_finite(t: Trainee) -> None:
    """Raise if a step since the trainee was built had a non-finite loss or gradient (a host sync)."""
    if t.finite is not None and not t.finite:
        raise FloatingPointError(f"{t.spec.label}: a non-finite loss or gradient")


# ----- measurements -----
def warm_up(t: Trainee, steps: int) -> dict:
    """The first step uncompiled, counting FLOPs and host syncs; then plain (compiling) steps."""
    with FlopCounterMode(display=False) as flops, SyncAudit() as audit:
        train_step(t, 0, audit, eager=True)
    out = {"flops_per_image": flops.get_total_flops() / t.spec.batch_size, "syncs": dict(audit.ops)}
    for step in range(1, max(steps, 2 if t.spec.compile else 1)):
        train_step(t, step)
    synchronize(torch.device(t.spec.device))
    check_finite(t)
    return out


def time_interleaved(trainees: list[Trainee], rounds: int, steps: int, min_seconds: float, first_step: int
                     ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """(images/s of each trainee per round, errors of those that failed). A turn is ``steps`` steps,
    or more until it lasted ``min_seconds``; the order rotates each round."""
    rates: dict[str, list[float]] = {t.spec.label: [] for t in trainees}
    failed: dict[str, str] = {}
    next_step = {t.spec.label: first_step for t in trainees}
    for r in range(rounds):
        k = r % max(len(trainees), 1)
        order = trainees[k:] + trainees[:k]
        for t in order:
            if t.spec.label in failed:
                continue
            device = torch.device(t.spec.device)
            try:
                synchronize(device)
                t0, done = time.perf_counter(), 0
                while done < steps or time.perf_counter() - t0 < min_seconds:
                    train_step(t, next_step[t.spec.label] + done)
                    done += 1
                    if done >= steps and min_seconds:
                        synchronize(device)
                synchronize(device)
                check_finite(t)
            except Exception as err:  # e.g. out of memory at a later step: record it
                failed[t.spec.label] = _describe(err)
                continue
            rates[t.spec.label].append(t.spec.batch_size * done / (time.perf_counter() - t0))
            next_step[t.spec.label] += done
    return rates, failed


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]


def _memory_probe(spec: Spec, steps: int, threads: int) -> int:
    """Runs in a fresh process: build and train ``steps`` steps; returns the peak bytes."""
    torch.set_num_threads(threads)

    def build_and_train():
        t = build_trainee(spec)
        for step in range(steps):
            train_step(t, step)
        check_finite(t)

    return peak_training_memory(torch.device(spec.device), build_and_train)


def measure_memory(specs: list[Spec], steps: int) -> dict[str, object]:
    """spec.label -> peak bytes, or the error string; one fresh process per spec."""
    out: dict[str, object] = {}
    ctx = multiprocessing.get_context("spawn")
    for spec in specs:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            try:
                out[spec.label] = pool.submit(_memory_probe, spec, steps, torch.get_num_threads()).result()
            except Exception as err:
                out[spec.label] = _describe(err)
    return out


def time_data_pipeline(objective: str, model: str, batch_size: int, batches: int, source: DataSource,
                       device: torch.device) -> dict:
    """Decoded, augmented images/s of the recipe's loader (its workers and augmentation) on ``source``."""
    spec = Spec(objective, model, OURS, batch_size, None, str(device), "no")
    run = run_config(spec)
    cls = get_objective(objective)
    info = DataInfo(source.name, source.num_classes, source.class_names, MEAN, STD, run.backbone.img_size)
    transform = cls.train_transform(run.train, run.objective_config, info, uint8=True)  # as the trainer sends them
    label = source.label_column if cls.needs_labels else None
    workers = resolve_workers(run.train.num_workers)
    shard = Shard(micro_batch=batch_size, pin_memory=device.type == "cuda", workers=workers)
    loader, _ = split_loader(source.train, source, label, transform, run, shard, train=True)  # the trainer's
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)  # worker start-up and the first batch
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - t0)
    del it
    return {"objective": objective, "model": model, "workers": workers, "batch_size": batch_size,
            "images_per_s": rate, "first_batch_s": first}


# ----- one objective on one model -----
def _prepare(spec: Spec, row: dict, args) -> Optional[Trainee]:
    """Build and warm up one implementation; a crash goes into ``row`` and gives None."""
    try:
        t = build_trainee(spec)
        row["note"] = t.note
        row.update(warm_up(t, args.warmup))
        return t
    except Exception as err:
        row["error"] = _describe(err)
        if args.verbose:
            traceback.print_exc()
        return None


def run_group(objective: str, model: str, args, device: torch.device) -> list[dict]:
    """Build ours and the references, warm up, time them interleaved, measure memory: table rows."""
    batch = args.batch_size or DEFAULT_BATCH.get(model, 256)
    common = dict(objective=objective, model=model, batch_size=batch, depth=args.depth, device=str(device),
                  precision=args.precision, fused=args.fused)
    specs = []
    if args.compile in ("off", "both"):
        specs.append(Spec(impl=OURS, channels_last=args.channels_last, **common))
    if args.compile in ("on", "both"):
        specs.append(Spec(impl=OURS, compile=True, channels_last=args.channels_last, **common))
    if args.references and not PRESETS[MODELS[model]["model"]].hybrid:  # theirs have no CNN stem
        specs += [Spec(impl=name, compile=args.compile == "on", **common) for name, _ in REFERENCES.get(objective, [])]

    rows = {s.label: {"objective": objective, "model": model, "impl": s.label, "batch_size": batch,
                      "depth": args.depth, "precision": args.precision} for s in specs}
    trainees = [t for t in (_prepare(s, rows[s.label], args) for s in specs) if t is not None]
    rates, failed = time_interleaved(trainees, args.rounds, args.steps, args.round_seconds, args.warmup)
    for label, samples in rates.items():
        rows[label]["images_per_s_rounds"] = samples
        rows[label]["images_per_s"] = median_rate(samples)
    for label, err in failed.items():
        rows[label]["error"] = err
    trainees.clear()  # free the device for the memory probes
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.memory:
        ran = [s for s in specs if "error" not in rows[s.label]]
        for label, value in measure_memory(ran, max(2, args.warmup)).items():
            rows[label]["peak_memory" if isinstance(value, int) else "memory_error"] = value
    peak = args.peak_tflops or bf16_peak_tflops(device)
    for row in rows.values():
        if "flops_per_image" in row and "images_per_s" in row:
            row["tflops"] = row["flops_per_image"] * row["images_per_s"] / 1e12
            if peak and device.type == "cuda":
                row["mfu"] = row["tflops"] / peak
    _add_ratios(list(rows.values()), compiled=args.compile == "on")
    return list(rows.values())


def _add_ratios(rows: list[dict], compiled: bool) -> None:
    """ours / theirs, eager against eager (compiled against compiled with --compile on)."""
    ours = next((r for r in rows if r["impl"] == OURS + ("+compile" if compiled else "")), None)
    if ours is None or "images_per_s" not in ours:
        return
    for row in rows:
        if row["impl"].startswith(OURS) or "images_per_s" not in row or "error" in row:
            continue
        # paired by round (the two ran next to each other), so a slow spell of the machine cancels
        pairs = zip(ours["images_per_s_rounds"], row["images_per_s_rounds"])
        row["ratio_images_per_s"] = median_rate([a / b for a, b in pairs])
        if "peak_memory" in ours and row.get("peak_memory"):
            row["ratio_memory"] = ours["peak_memory"] / row["peak_memory"]


# ----- output -----
def _fmt(value, spec: str = ".1f", empty: str = "-") -> str:
    return empty if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict], gpu: bool) -> str:
    head = ["objective", "model", "impl", "batch", "img/s", "peak MiB", "GFLOP/img", "TFLOP/s"]
    head += ["MFU"] if gpu else []
    head += ["ours/theirs img/s", "ours/theirs mem", "note"]
    lines = []
    for r in rows:
        mem = r.get("peak_memory")
        cells = [r["objective"], r["model"], r["impl"], str(r["batch_size"]), _fmt(r.get("images_per_s")),
                 _fmt(mem / 2**20 if mem else None, ".0f"), _fmt(r.get("flops_per_image", 0) / 1e9 or None, ".2f"),
                 _fmt(r.get("tflops"), ".3f")]
        cells += [_fmt(100 * r["mfu"] if "mfu" in r else None, ".1f") + ("%" if "mfu" in r else "")] if gpu else []
        cells += [_fmt(r.get("ratio_images_per_s"), ".2f"), _fmt(r.get("ratio_memory"), ".2f")]
        cells.append("CRASH " + r["error"] if "error" in r else r.get("note", ""))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt_row(head), fmt_row(["-" * w for w in widths])] + [fmt_row(c) for c in lines])


def sync_report(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["impl"] == OURS and "syncs" in r:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(r["syncs"].items())) or "none"
            lines.append(f"  {r['objective']:<13} {r['model']:<17} {ops}")
    return lines


def min_ratio(rows: list[dict]) -> Optional[float]:
    ratios = [r["ratio_images_per_s"] for r in rows if "ratio_images_per_s" in r]
    return min(ratios) if ratios else None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("timm", "lightly", "vit-pytorch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def save(record: dict, slug: str, path: Optional[Path] = None) -> Path:
    """Append this run to ``path`` (default ``results/<device>-<date>.json``)."""
    path = path or RESULTS_DIR / f"{slug}-{record['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text()) if path.exists() else {"device": slug, "runs": []}
    doc["runs"].append(record)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def update_readme() -> None:
    """Replace the table between the README's markers with every saved run's rows."""
    head = ("| device | torch | command | objective | model | impl | batch | img/s | peak MiB | TFLOP/s | MFU "
            "| ours/theirs img/s | ours/theirs mem |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for path in sorted(RESULTS_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        for run in doc["runs"]:
            for r in run["rows"]:
                mem = r.get("peak_memory")
                ips = "crash: " + r["error"].replace("|", "/") if "error" in r else _fmt(r.get("images_per_s"))
                lines.append("| " + " | ".join([
                    doc["device"], run["versions"]["torch"], f"`{run['command']}`", r["objective"], r["model"],
                    r["impl"], str(r["batch_size"]), ips, _fmt(mem / 2**20 if mem else None, ".0f"),
                    _fmt(r.get("tflops"), ".3f"), _fmt(100 * r["mfu"] if "mfu" in r else None, ".1f"),
                    _fmt(r.get("ratio_images_per_s"), ".2f"), _fmt(r.get("ratio_memory"), ".2f")]) + " |")
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{README_START}\n{README_END}\n"
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    README.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[end:])


# ----- command line -----
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ViT-Ti/4 at 32 px, batch 32, few steps: a CPU run")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all (--quick: vit_tiny/4@32)")
    p.add_argument("--batch-size", type=int, help=f"default: 256, or {DEFAULT_BATCH} (--quick: 32)")
    p.add_argument("--depth", type=int, help="fewer layers than the preset's (the same for every implementation)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation (>= 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation per round (at least)")
    p.add_argument("--round-seconds", type=float, default=0.0,
                   help="...and more steps until a turn lasted this long (--quick: 1.5)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --quick: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["no", "bf16"], help="default: bf16 on CUDA, no (fp32) on CPU")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="torch.compile; 'both' adds a compiled row of ours")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="fused AdamW, for every implementation alike")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last hybrid stems (default: on CUDA)")
    p.add_argument("--references", action=argparse.BooleanOptionalAction, default=True,
                   help="time lightly and vit-pytorch beside ours")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="peak memory, one fresh process per implementation")
    p.add_argument("--data", default=str(CIFAR10), help="data set for the input-pipeline timing ('' to skip)")
    p.add_argument("--data-batches", type=int, default=30)
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when not in the table")
    p.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                   help="write benchmarks/results/<device>-<date>.json")
    p.add_argument("--results-file", type=Path, help="write (append) the run's record here instead")
    p.add_argument("--update-readme", action="store_true",
                   help="rebuild the table in benchmarks/README.md from every saved result")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of crashes")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):  # not set on the command line
                setattr(args, key, value)
    args.models = args.models or list(MODELS)
    cuda = torch.device(args.device).type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "no")
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step counts FLOPs and host syncs)")
    return args


def main(argv=None) -> dict:
    """Run, print, save; returns the run's record (rows, input pipeline, versions)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"
    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, precision {args.precision}, "
          f"fused AdamW {args.fused}, compile {args.compile}")
    if not gpu:
        print("no GPU in this run: TFLOP/s is the CPU's; MFU needs a GPU")
    started = time.perf_counter()
    rows: list[dict] = []
    timed = []
    for objective in args.objectives:
        try:
            get_objective(objective)
            timed.append(objective)
        except Exception as err:  # an objective still being written: skip it, say why
            print(f"skipping {objective}: its module does not import ({_describe(err)})")
    for model in args.models:
        for objective in timed:
            print(f"timing {objective} on {model}...", flush=True)
            rows += run_group(objective, model, args, device)

    pipeline = []
    if args.data and Path(args.data).is_dir():
        print(f"timing the input pipeline on {args.data}...", flush=True)
        source = load_data(args.data)
        size_models = {MODELS[m]["img_size"]: m for m in args.models}
        for model in size_models.values():
            for objective in timed:
                batch = args.batch_size or DEFAULT_BATCH.get(model, 256)
                pipeline.append(time_data_pipeline(objective, model, batch, args.data_batches, source, device))
    elif args.data:
        print(f"input pipeline not timed: {args.data} does not exist (the project's data folder)")

    print()
    print(table(rows, gpu))
    print("\nops a CUDA step of ours would wait on (besides the loop's one finite check per step):")
    print("\n".join(sync_report(rows)) or "  (not measured)")
    if pipeline:
        print(f"\ninput pipeline on {args.data} (the recipe's augmentation and workers, decoded images/s):")
        for p in pipeline:
            step = next((r.get("images_per_s") for r in rows if r["impl"] == OURS and r["objective"] == p["objective"]
                         and r["model"] == p["model"]), None)
            verdict = "" if not step else (f"-> {'feeds' if p['images_per_s'] >= step else 'cannot feed'} the "
                                           f"training step ({step:.1f} img/s, x{p['images_per_s'] / step:.1f})")
            print(f"  {p['objective']:<13} {p['model']:<17} {p['workers']} workers: {p['images_per_s']:.0f} img/s "
                  f"(first batch {p['first_batch_s']:.1f} s) {verdict}")
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command.strip(),
              "device_name": name, "threads": torch.get_num_threads(), "versions": versions(),
              "settings": {k: v for k, v in vars(args).items()
                           if k not in ("save", "update_readme", "verbose", "results_file")},
              "rows": rows, "data_pipeline": pipeline, "seconds": time.perf_counter() - started}
    if args.save:
        print(f"\nsaved {save(record, device_slug(device), args.results_file)}")
    if args.update_readme:
        update_readme()
        print(f"rebuilt the table in {README}")
    print(f"finished in {record['seconds'] / 60:.1f} minutes")
    ratio = min_ratio(rows)
    print(f"min ratio ours/theirs: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    return record


if __name__ == "__main__":
    main()
