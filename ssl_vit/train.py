"""The one training loop, on Hugging Face Accelerate, that serves every objective.

It owns what every objective shares: devices and processes, mixed precision, gradient
accumulation and clipping, the optimizer (timm parameter groups: no weight decay on biases,
norms, tokens, position embeddings) and its warmup + cosine schedule (timm), logging (progress
bar, TensorBoard, ``metrics.jsonl``), the test metric, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import IterableDataset
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from .backbone import build_backbone
from .checkpoint import atomic_write, load_backbone, load_weights, save_checkpoint
from .config import RunConfig
from .names import folder_safe, short_name
from .data import (MEAN, STD, DataError, EpochSampler, ImageDataset, StreamingImageDataset, eval_transform,
                   load_data, make_loader)
from .objectives import DataInfo, StepInfo, get_objective

MAX_WARMUP_STEPS = 10_000  # the ViT paper's warmup
STREAM_EPOCH_STEPS = 1_000  # "epoch" length of a stream whose size is unknown (epoch-based schedules)
CONFIG_FILE, METRICS_FILE, CKPT_FILE, STATE_DIR = "config.json", "metrics.jsonl", "ckpt.pt", "state"
# Settings that may change between a run and its resumption without changing its result.
RESUMABLE_CHANGES = {"out", "save_every", "log_every", "eval_every", "num_workers", "compile", "skip_bad_images",
                     "stop_at"}


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient; raised before anything bad reaches a checkpoint."""


def default_out(run: RunConfig) -> str:
    return os.path.join("runs", f"{run.objective}-{folder_safe(short_name(run.train.data))}-{run.backbone.model}")


def _flat(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v) if isinstance(v, dict) else {k: v})
    return out


def _check_or_write_config(out: str, run: RunConfig) -> None:
    """Save the resolved config; refuse to resume a folder that holds a different run."""
    path = os.path.join(out, CONFIG_FILE)
    new = json.loads(json.dumps(run.to_dict()))
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        if old.get("objective") != new["objective"]:
            raise ValueError(f"{out} holds a {old.get('objective')} run; pass a new --out")
        a, b = _flat(old), _flat(new)
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
                if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES}
        if diff:
            lines = ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in sorted(diff.items()))
            raise ValueError(f"{out} holds a run with other settings ({lines}); pass a new --out or delete it")
    atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(new, indent=2)))


class StateFolder:
    """``out/state/step-N`` folders written by ``accelerator.save_state`` behind a ``latest`` pointer."""

    def __init__(self, out: str, accelerator: Accelerator):
        self.root, self.acc = os.path.join(out, STATE_DIR), accelerator

    def latest(self) -> Optional[str]:
        pointer = os.path.join(self.root, "latest")
        if not os.path.exists(pointer):
            return None
        with open(pointer) as fh:
            path = os.path.join(self.root, fh.read().strip())
        return path if os.path.isdir(path) else None

    def save(self, step: int) -> None:
        name = f"step-{step}"
        tmp, final = os.path.join(self.root, f".{name}.tmp"), os.path.join(self.root, name)
        if self.acc.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        self.acc.wait_for_everyone()
        self.acc.save_state(tmp)  # model, optimizer, scaler, every process's RNG
        if self.acc.is_main_process:
            with open(os.path.join(tmp, "progress.json"), "w") as fh:
                json.dump({"step": step}, fh)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(os.path.join(self.root, "latest"), lambda p: open(p, "w").write(name))
            for old in os.listdir(self.root):
                if old.startswith("step-") and old != name:
                    shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        self.acc.wait_for_everyone()

    def load(self) -> int:
        path = self.latest()
        if path is None:
            return 0
        self.acc.load_state(path)
        with open(os.path.join(path, "progress.json")) as fh:
            return int(json.load(fh)["step"])


def _to_device(batch: dict, device: torch.device) -> dict:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, list):
            return [move(x) for x in v]
        return v
    return {k: move(v) for k, v in batch.items()}


class Trainer:
    """Builds everything from a ``RunConfig`` and runs it; ``run()`` returns the ckpt.pt path."""

    def __init__(self, run: RunConfig):
        self.run_cfg, tc = run, run.train
        self.out = tc.out or default_out(run)
        self.acc = Accelerator(mixed_precision=tc.precision, log_with="tensorboard", project_dir=self.out)
        acc = self.acc
        world = acc.num_processes
        if tc.batch_size % (world * tc.grad_accum):
            raise ValueError(
                f"--batch-size {tc.batch_size} must be divisible by processes x --grad-accum = {world * tc.grad_accum}"
            )
        self.micro_batch = tc.batch_size // (world * tc.grad_accum)
        set_seed(tc.seed)
        if acc.is_main_process:
            os.makedirs(self.out, exist_ok=True)
            _check_or_write_config(self.out, run)
        acc.wait_for_everyone()

        source = load_data(tc.data, tc.image_column, tc.label_column, tc.streaming)
        objective_cls = get_objective(run.objective)
        if objective_cls.needs_labels and not source.has_labels:
            raise DataError(f"the {run.objective} objective needs labels and {tc.data} has no label column; "
                            "name it with --label-column, or use a self-supervised recipe")
        self.source = source
        self.data_info = DataInfo(tc.data, source.num_classes, source.class_names, MEAN, STD, run.backbone.img_size)

        backbone = build_backbone(run.backbone)
        if tc.init:
            source_backbone, _ = load_backbone(tc.init)
            load_weights(backbone, source_backbone.vit.state_dict(), tc.init)
        self.objective = objective_cls(backbone, run.objective_config, self.data_info)

        transform = objective_cls.train_transform(tc, run.objective_config, self.data_info)
        label_col = source.label_column if objective_cls.needs_labels else None
        rank, pin = acc.process_index, acc.device.type == "cuda"
        self.streaming = isinstance(source.train, IterableDataset)
        if self.streaming:
            train_ds = StreamingImageDataset(source.train, source.image_column, label_col, transform, tc.seed,
                                             tc.skip_bad_images, "train", rank, world)
            self.loader = make_loader(train_ds, None, 0, pin, self.micro_batch)
            n = _num_examples(source.train)
            self.steps_per_epoch = max(1, n // tc.batch_size) if n else STREAM_EPOCH_STEPS
        else:
            train_ds = ImageDataset(source.train, source.image_column, label_col, transform, tc.seed,
                                    tc.skip_bad_images)
            self.sampler = EpochSampler(len(train_ds), self.micro_batch, tc.seed, True, rank, world, True,
                                        tc.grad_accum)
            self.loader = make_loader(train_ds, self.sampler, tc.num_workers, pin, persistent=True)
            self.steps_per_epoch = self.sampler.batches_per_epoch // tc.grad_accum
        self.train_ds = train_ds
        self.test_loader = None
        if source.test is not None and source.has_labels and objective_cls.has_test_metric:
            args = (source.image_column, source.label_column, eval_transform(run.backbone.img_size), tc.seed,
                    tc.skip_bad_images, "test")
            if isinstance(source.test, IterableDataset):
                test_ds = StreamingImageDataset(source.test, *args, rank=rank, world_size=world, repeat=False)
                self.test_loader = make_loader(test_ds, None, 0, pin, self.micro_batch, False)
            else:
                test_ds = ImageDataset(source.test, *args)
                test_sampler = EpochSampler(len(test_ds), self.micro_batch, tc.seed, False, rank, world, False)
                self.test_loader = make_loader(test_ds, test_sampler, tc.num_workers, pin)

        self.lr = _scaled_lr(tc)
        opt_kwargs = {"betas": tuple(tc.betas)} if any(k in tc.optimizer for k in ("adam", "lamb")) else {}
        if tc.optimizer in ("adam", "adamw"):
            opt_kwargs["fused"] = True  # one kernel for all parameters (CPU and CUDA): ~3x faster optimizer step for ViT-Ti on CPU
        optimizer = create_optimizer_v2(self.objective, opt=tc.optimizer, lr=self.lr,
                                        weight_decay=tc.weight_decay, layer_decay=tc.layer_decay, **opt_kwargs)
        warmup = tc.warmup_steps if tc.warmup_steps is not None else min(MAX_WARMUP_STEPS, tc.steps // 10)
        # Step t = 1..steps: linear warmup to the peak at t = warmup, then cosine towards min_lr.
        self.scheduler = CosineLRScheduler(optimizer, t_initial=max(1, tc.steps - warmup + 1), lr_min=tc.min_lr,
                                           warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True,
                                           t_in_epochs=False)
        model = torch.compile(self.objective) if tc.compile else self.objective
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.state = StateFolder(self.out, acc)
        self.skipped_steps = 0
        self.skipped_images = 0

    # ----- pieces of a step -----
    def _micro_batches(self, start_step: int):
        """Yield (epoch, list of grad_accum micro-batches) for each step from ``start_step`` on."""
        accum = self.run_cfg.train.grad_accum
        if self.streaming:  # an endless stream: skip what this process already used
            self.train_ds.set_start(start_step * accum * self.micro_batch)
            group, step = [], start_step
            for batch in self.loader:
                group.append(batch)
                if len(group) == accum:
                    yield step // self.steps_per_epoch, group
                    group, step = [], step + 1
            return
        epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
        while True:
            self.sampler.set_epoch(epoch, start_batch=step_in_epoch * accum)
            group = []
            for batch in self.loader:
                group.append(batch)
                if len(group) == accum:
                    yield epoch, group
                    group = []
            epoch, step_in_epoch = epoch + 1, 0

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(os.path.join(self.out, METRICS_FILE), "a") as fh:
                fh.write(json.dumps(record) + "\n")
        self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """The objective's test metric (e.g. supervised accuracy), summed over all processes."""
        if self.test_loader is None:
            return None
        objective = self.acc.unwrap_model(self.model)
        objective.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in tqdm(self.test_loader, desc="test", leave=False, disable=not self.acc.is_local_main_process):
            if "image" not in batch:
                continue
            with self.acc.autocast():
                part = objective.evaluate_batch(_to_device(batch, self.acc.device))
            for k, v in part.items():
                sums[k] = sums.get(k, 0) + v
        objective.train()
        return objective.test_metrics({k: self.acc.reduce(v, reduction="sum") for k, v in sums.items()})

    def _write_checkpoint(self, step: int, results: Optional[dict]) -> str:
        path = os.path.join(self.out, CKPT_FILE)
        if self.acc.is_main_process:
            objective = self.acc.unwrap_model(self.model)
            objective = getattr(objective, "_orig_mod", objective)
            run = self.run_cfg.to_dict()
            save_checkpoint(
                path, objective.export_backbone(), objective=self.run_cfg.objective,
                objective_config=run["objective_config"], train_config=run["train"], step=step,
                data={**dataclasses.asdict(self.data_info), "image_column": self.source.image_column},
                objective_state=objective.objective_state(), extra={"results": results or {}},
            )
        self.acc.wait_for_everyone()
        return path

    # ----- the loop -----
    def run(self) -> str:
        tc, acc = self.run_cfg.train, self.acc
        step = self.state.load()
        if step:
            acc.print(f"resuming {self.out} at step {step}/{tc.steps}")
        end = min(tc.steps, tc.stop_at) if tc.stop_at is not None else tc.steps
        acc.init_trackers(os.path.basename(os.path.normpath(self.out)))
        objective = acc.unwrap_model(self.model)
        objective = getattr(objective, "_orig_mod", objective)
        bar = tqdm(total=end, initial=min(step, end), desc=self.run_cfg.objective, disable=not acc.is_local_main_process)
        sums: dict[str, torch.Tensor] = {}
        images, t0 = 0, time.perf_counter()
        results = None
        batches = self._micro_batches(step) if step < end else iter(())
        self.model.train()
        for epoch, group in batches:
            info = StepInfo(step, tc.steps, epoch, self.steps_per_epoch)
            self.scheduler.step_update(step + 1)  # lr of this step: warmup from lr/warmup, cosine to min_lr
            objective.start_step(info, self.optimizer)
            loss_sum = torch.zeros((), device=acc.device)
            for i, batch in enumerate(group):
                self.skipped_images += batch.pop("skipped", 0)
                batch = _to_device(batch, acc.device)
                sync = nullcontext() if i == len(group) - 1 else acc.no_sync(self.model)
                with sync:
                    loss, metrics = self.model(batch)
                    acc.backward(loss / len(group))
                loss_sum += loss.detach() / len(group)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() / len(group)
                images += _batch_len(batch["image"])
            objective.before_optimizer_step(info)
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), tc.clip_grad if tc.clip_grad > 0 else math.inf)
            # One host sync per step: never let a non-finite loss or gradient reach the weights.
            check = loss_sum if tc.precision == "fp16" else loss_sum + grad_norm  # fp16: the scaler skips inf grads
            if not torch.isfinite(check).item():
                if tc.on_nonfinite == "stop":
                    last = self.state.latest()
                    raise NonFiniteError(
                        f"non-finite loss or gradient at step {step} (loss {loss_sum.item()}, grad norm "
                        f"{float(grad_norm)}); nothing was saved from it. Last good state: {last or 'none'}. "
                        "Lower --lr, use --precision bf16 instead of fp16, or pass --on-nonfinite skip"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                acc.print(f"step {step}: non-finite loss or gradient, step skipped ({self.skipped_steps} so far)")
                continue
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            objective.end_step(info)
            sums["loss"] = sums.get("loss", 0) + loss_sum
            sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach().float()
            step += 1
            bar.update(1)

            if step % tc.log_every == 0 or step == end:
                n = (step - 1) % tc.log_every + 1
                dt = time.perf_counter() - t0
                record = {"step": step, "epoch": epoch, "lr": max(g["lr"] for g in self.optimizer.param_groups),
                          "images_per_s": images * acc.num_processes / max(dt, 1e-9)}
                record.update({k: acc.reduce(v / n, reduction="mean").item() for k, v in sums.items()})
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                img_s=f"{record['images_per_s']:.0f}")
                sums, images, t0 = {}, 0, time.perf_counter()
            if tc.eval_every and step % tc.eval_every == 0 and step < end:
                results = self.evaluate()
                if results:
                    self._log({"step": step, **results})
                    acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
            if (tc.save_every and step % tc.save_every == 0) or step == end:
                self.state.save(step)
            if step >= end:
                break
        bar.close()
        if tc.steps == 0 and self.state.latest() is None:
            self.state.save(0)
        results = self.evaluate()
        if results:
            self._log({"step": step, **results})
            acc.print(", ".join(f"{k} {v:.4f}" for k, v in results.items()) + f" at step {step}")
        if self.skipped_images:
            acc.print(f"skipped {self.skipped_images} unreadable images (--skip-bad-images)")
        if self.skipped_steps:
            acc.print(f"skipped {self.skipped_steps} steps with a non-finite loss or gradient")
        for line in objective.summary():
            acc.print(line)
        path = self._write_checkpoint(step, results)
        acc.end_training()
        acc.print(f"checkpoint: {path}")
        return path


def _scaled_lr(tc) -> float:
    """--lr at --lr-ref-batch, scaled to --batch-size linearly or by the square root."""
    if not tc.lr_ref_batch:
        return tc.lr
    ratio = tc.batch_size / tc.lr_ref_batch
    return tc.lr * (math.sqrt(ratio) if tc.lr_scaling == "sqrt" else ratio)


def _num_examples(ds) -> Optional[int]:
    """Size of a streamed split when its metadata says it, else None."""
    try:
        return ds.info.splits["train"].num_examples
    except (AttributeError, KeyError, TypeError):
        return None


def _batch_len(images) -> int:
    return len(images[0]) if isinstance(images, list) else len(images)


def train(run: RunConfig) -> str:
    return Trainer(run).run()


def run_recipe(objective: str, defaults: Optional[dict] = None, argv: Optional[list[str]] = None,
               description: str = "") -> str:
    """Parse the command line over ``defaults`` (None: the objective's ``recipe_defaults``) and
    train; the body of every recipe script."""
    from .config import parse_run_config

    cls = get_objective(objective)
    run = parse_run_config(objective, cls.Config, cls.recipe_defaults if defaults is None else defaults, argv,
                           description)
    return train(run)
