"""The one training loop, on Hugging Face Accelerate, that serves every objective.

It owns what every objective shares: devices and processes, mixed precision, gradient
accumulation and clipping, the optimizer and schedule, logging, the test metric, atomic
checkpoints and exact resume. ``Trainer`` assembles pieces that each work alone:
``pipeline`` (loaders and the micro-batches of each step), ``optim`` (optimizer and schedule),
``step`` (one optimizer step), ``metrics_log`` (metrics.jsonl and the trackers), ``trackers``
(TensorBoard, W&B, MLflow: ``--report-to``), ``run_folder`` (config.json, the resumable state, the
lock), ``launch`` (launches that cannot train correctly), ``sharding`` (FSDP2) and ``evaluation``
(the test metric, in step over processes).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..backbone import build_backbone
from ..checkpoint import init_weights, load_backbone, load_weights, save_checkpoint
from ..config import RunConfig, requested_trackers
from ..data import MEAN, STD, DataError, DataSource, load_data, resolve_workers
from ..data.subsets import labelled_fraction
from ..errors import ConfigError
from ..evaluation.monitor import Monitors
from ..objectives import DataInfo, Objective, StepInfo, get_objective
from .evaluation import evaluate
from .metrics_log import MetricLog
from .nonfinite import NonFiniteError, NonFiniteSteps
from .optim import build_optimizer, build_schedule, fused_by_default
from .launch import check_launch, die_with_launcher, resolve_precision, training_device
from .pipeline import DataPipeline, Shard
from .run_folder import CKPT_FILE, RunLock, StateFolder, check_config, check_shared, default_out, write_config
from .sharding import full_state_dict, init_optimizer_state, shard_with_plugin
from .step import optimizer_step
from .summary import run_summary
from .trackers import build_trackers, check_installed, start_trackers

__all__ = ["NonFiniteError", "Trainer", "default_out", "end_processes", "run_recipe", "train"]


def plain(model: torch.nn.Module, acc: Accelerator) -> Objective:
    """The objective inside what ``accelerator.prepare`` and ``torch.compile`` wrapped around it."""
    return acc.unwrap_model(model, keep_torch_compile=False)


class Trainer:
    """Builds everything from a ``RunConfig`` and runs it; ``run()`` returns the ckpt.pt path."""

    def __init__(self, run: RunConfig):
        device = training_device()
        run = dataclasses.replace(run, train=dataclasses.replace(
            run.train, precision=resolve_precision(run.train.precision, device)))  # saved resolved: resumes compare it
        self.run_cfg, tc = run, run.train
        self.out = tc.out or default_out(run)
        die_with_launcher()
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # float32 matmuls in TF32
        trackers = requested_trackers(tc.report_to)
        check_installed(trackers)
        self.acc = Accelerator(mixed_precision=tc.precision, log_with=build_trackers(trackers, self.out) or None,
                               project_dir=self.out)
        check_launch(self.acc)
        shard = self._shard()
        set_seed(tc.seed)
        if self.acc.is_main_process:
            check_config(self.out, run)  # reads only: nothing is written before every check has passed
        objective_cls = get_objective(run.objective)
        self.source = self._source(objective_cls)
        self.data_info = DataInfo(tc.data, self.source.num_classes, self.source.class_names, MEAN, STD,
                                  run.backbone.img_size)
        self.monitors = Monitors.build(tc, self.source, self.data_info, self.acc, shard.workers)  # checked first
        self.objective = objective_cls(self._backbone(objective_cls), run.objective_config, self.data_info)
        self.objective.prepare_training()
        transform = objective_cls.train_transform(tc, run.objective_config, self.data_info, uint8=True)
        self.data = DataPipeline(run, self.source, objective_cls, transform, shard)
        self.steps_per_epoch = self.data.steps_per_epoch
        shard_with_plugin(self.acc, self.objective)  # FSDP: before the optimizer takes the parameters
        optimizer = build_optimizer(self.objective, tc, fused_by_default(tc, self.acc.device))
        self.scheduler = build_schedule(optimizer, tc)
        self.model, self.optimizer = self.acc.prepare(self.objective, optimizer)
        init_optimizer_state(self.model, optimizer)  # FSDP: so that state/ loads whatever had been updated
        # The model was built from the same seed everywhere; from here each process draws its own masks,
        # drop-path and Mixup (seed + rank), restored exactly on resume with each process's saved RNG.
        set_seed(tc.seed, device_specific=True)
        if tc.compile:  # after DDP wraps it (its gradient all-reduce stays overlapped, as timm does), and the
            self.model = torch.compile(self.model)  # state Accelerate saves keeps plain names: resumes either way
        self.state, self.log = StateFolder(self.out, self.acc), MetricLog(self.acc, self.out)
        self.lock = RunLock(self.out)
        self.nonfinite, self.skipped_images = NonFiniteSteps(tc.on_nonfinite, tc.max_skipped_steps), 0
        self.extra_batches = 0  # batches used beyond the steps (a state saved before skipped steps counted)
        if self.acc.is_main_process:  # every setting, the data and --init checked: the folder is written
            os.makedirs(self.out, exist_ok=True)
            self.lock.acquire()  # held until run() ends
            try:
                write_config(self.out, run)
            except BaseException:
                self.lock.release()
                raise
        self.acc.wait_for_everyone()
        try:
            check_shared(self.out, self.acc)
        except BaseException:
            self.lock.release()
            raise

    def _shard(self) -> Shard:
        tc, acc = self.run_cfg.train, self.acc
        per_step = acc.num_processes * tc.grad_accum
        if tc.batch_size % per_step:
            raise ConfigError(f"--batch-size {tc.batch_size} must be divisible by processes x --grad-accum = {per_step}")
        here = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))  # training processes on this machine
        return Shard(acc.process_index, acc.num_processes, tc.batch_size // per_step, acc.device.type == "cuda",
                     resolve_workers(tc.num_workers, here), str(acc.device), here)

    def _source(self, objective_cls) -> DataSource:
        """The run's data, checked against what the objective needs; cut to --label-fraction."""
        run, tc = self.run_cfg, self.run_cfg.train
        source = load_data(tc.data, tc.image_column, tc.label_column, tc.streaming)
        if objective_cls.needs_labels and not source.has_labels:
            raise DataError(f"the {run.objective} objective needs labels and {tc.data} has no label column; "
                            "name it with --label-column, or use a self-supervised recipe")
        if tc.label_fraction < 1.0 and not objective_cls.needs_labels:
            raise ConfigError(f"--label-fraction {tc.label_fraction}: the {run.objective} objective trains without "
                              "labels, on every image; the fraction is for supervised training and fine-tuning")
        return labelled_fraction(source, tc.label_fraction, tc.seed)

    def _backbone(self, objective_cls):
        """The configured backbone, initialised from --init when given (position embeddings resampled; a
        norm after averaging starts fresh where the source had a final norm: ``init_weights``), else
        as the objective's reference initialises it."""
        backbone = build_backbone(self.run_cfg.backbone)
        if self.run_cfg.train.init:
            source, _ = load_backbone(self.run_cfg.train.init)
            load_weights(backbone, init_weights(backbone, source), self.run_cfg.train.init)
        else:
            objective_cls.initialise(backbone)
        return backbone

    def evaluate(self) -> Optional[dict]:
        """The objective's test metrics (e.g. supervised accuracy), from sums over all processes."""
        if self.data.test_loader is None:
            return None
        return evaluate(plain(self.model, self.acc), self.data.test_loader, self.acc, self.data_info.img_size,
                        self.data.test_on_device)

    def _write_checkpoint(self, step: int, results: Optional[dict]) -> str:
        path = os.path.join(self.out, CKPT_FILE)
        objective = plain(self.model, self.acc)
        state = full_state_dict(objective)  # on every process: FSDP gathers the shards together
        if self.acc.is_main_process:
            run = self.run_cfg.to_dict()
            save_checkpoint(
                path, objective.export_backbone(), objective=self.run_cfg.objective,
                objective_config=run["objective_config"], train_config=run["train"], step=step,
                data={**dataclasses.asdict(self.data_info), "image_column": self.source.image_column},
                objective_state=objective.objective_state(state), extra={"results": results or {}},
                backbone_state=objective.exported_state(state),
            )
        self.acc.wait_for_everyone()
        return path

    # ----- the loop -----
    def _check_nonfinite(self) -> None:
        """--on-nonfinite on the steps since the last check (the host's one read of their flags)."""
        bad = self.nonfinite.check(self.state.latest)
        for n, step in enumerate(bad, self.nonfinite.skipped - len(bad) + 1):
            self.acc.print(f"step {step}: non-finite loss or gradient, update skipped ({n} so far)")

    def _after_step(self, step: int, end: int, epoch: int, bar) -> None:
        """Log, evaluate and save as due after optimizer step ``step`` (1-based); the non-finite
        steps since the last of these are handled first, so none reaches a save."""
        tc = self.run_cfg.train
        log = step % tc.log_every == 0 or step == end
        evaluate = tc.eval_every and step % tc.eval_every == 0 and step < end
        save = (tc.save_every and step % tc.save_every == 0) or step == end
        if log or evaluate or save:
            self._check_nonfinite()
        if log:
            record = self.log.record(step, epoch, max(g["lr"] for g in self.optimizer.param_groups))
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            img_s=f"{record['images_per_s']:.0f}")
        if self.monitors.due(step, end):
            self._report(self.monitors(step, end, plain(self.model, self.acc)), step, f"step {step}: ")
        if evaluate:
            self._report(self.evaluate(), step, f"step {step}: ")
        if save:
            self.state.save(step, self.nonfinite.skipped, self.extra_batches)

    def _report(self, results: Optional[dict], step: int, prefix: str = "", suffix: str = "") -> None:
        if results:
            self.log.write({"step": step, **results})
            self.acc.print(prefix + ", ".join(f"{k} {v:.4f}" for k, v in results.items()) + suffix)

    def _train(self, step: int, end: int) -> int:
        """Optimizer steps from ``step`` to ``end``; returns the step reached."""
        tc, objective = self.run_cfg.train, plain(self.model, self.acc)
        bar = tqdm(total=end, initial=min(step, end), desc=self.run_cfg.objective,
                   disable=not self.acc.is_local_main_process)
        self.model.train()
        for epoch, group in self.data.micro_batches(step + self.extra_batches) if step < end else ():
            info = StepInfo(step, tc.steps, epoch, self.steps_per_epoch)
            self.scheduler.step_update(step + 1)  # lr of this step: warmup from lr/warmup, cosine to min_lr
            result = optimizer_step(self.acc, self.model, objective, self.optimizer, group, info, tc.clip_grad,
                                    tc.clip_grad_mode, on_device=self.data.on_device)
            self.skipped_images += result.skipped_images
            self.nonfinite.add(step, result)
            self.log.add(result)
            step += 1
            bar.update(1)
            self._after_step(step, end, epoch, bar)
            if step >= end:
                break
        bar.close()
        return step

    def run(self) -> str:
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> str:
        tc, acc = self.run_cfg.train, self.acc
        step, self.nonfinite.skipped, self.extra_batches = self.state.load()
        if step:
            acc.print(f"resuming {self.out} at step {step}/{tc.steps}")
        self.log.truncate_after(step)  # records of steps after the saved state were re-run (or never saved)
        start_trackers(acc, self.run_cfg, self.out)
        step = self._train(step, min(tc.steps, tc.stop_at) if tc.stop_at is not None else tc.steps)
        if tc.steps == 0 and self.state.latest() is None:
            self.state.save(0)
        results = self.evaluate()
        self._report(results, step, suffix=f" at step {step}")
        if self.skipped_images:
            acc.print(f"skipped {self.skipped_images} unreadable images (--skip-bad-images)")
        if self.nonfinite.skipped:
            acc.print(f"skipped {self.nonfinite.skipped} steps with a non-finite loss or gradient")
        for line in plain(self.model, acc).summary():
            acc.print(line)
        path = self._write_checkpoint(step, results)
        for tracker in acc.trackers:  # end_training's tracker part: its destroy_process_group would stop
            tracker.finish()  # this process training again (a study's next run): see end_processes
        if acc.is_main_process:
            for line in run_summary(plain(self.model, acc), self.log.last_record(), results, path, tc.data,
                                    self.source.has_labels):
                print(line)
        return path


def train(run: RunConfig) -> str:
    return Trainer(run).run()


def end_processes() -> None:
    """Destroy the process group (what ``Accelerator.end_training`` would), once a command has run all
    its trainings: a study or a fine-tuning of several checkpoints trains again in the same processes."""
    PartialState().destroy_process_group()


def run_recipe(objective: str, defaults: Optional[dict] = None, argv: Optional[list[str]] = None,
               description: str = "") -> str:
    """Parse the command line over ``defaults`` (None: the objective's ``recipe_defaults``) and
    train; the body of every recipe script."""
    from ..config import parse_run_config

    cls = get_objective(objective)
    run = parse_run_config(objective, cls.Config, cls.recipe_defaults if defaults is None else defaults, argv,
                           description)
    path = train(run)
    end_processes()
    return path
