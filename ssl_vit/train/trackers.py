"""Experiment trackers (``--report-to``): TensorBoard, Weights & Biases and MLflow, through Accelerate's
tracker classes, which start on the main process only.

Each run folder is one tracker run, named after the folder: TensorBoard writes in ``out/<name>/``
as it always did, W&B in ``out/wandb/`` (project ``ssl_vit``, or ``WANDB_PROJECT``; run name
``WANDB_NAME``), MLflow wherever ``MLFLOW_TRACKING_URI`` points, else in a file store inside the run
folder (``out/mlruns``), under the experiment ``ssl_vit`` (or ``MLFLOW_EXPERIMENT_NAME``). The W&B
and MLflow run ids are kept in ``out/trackers.json``, so a resumed run continues the same tracker
runs.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from ..checkpoint import atomic_write_text
from ..config import RunConfig, requested_trackers
from ..errors import UserError
from .run_folder import RESUMABLE_CHANGES, TRACKERS_FILE, has_saved_state

PROJECT = "ssl_vit"  # the W&B project and the MLflow experiment, unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the pip extra that installs its package
RUN_ID = {"wandb": lambda run: run.id, "mlflow": lambda run: run.info.run_id}  # of each tracker's run object


class TrackerError(UserError):
    """A tracker that cannot be used: its package is missing, or it did not start."""


def check_installed(names: tuple[str, ...]) -> None:
    """Refuse a requested tracker whose package does not import (Accelerate would silently drop it)."""
    for name in names:
        if name in EXTRAS:
            try:
                importlib.import_module(name)
            except ImportError as err:
                raise TrackerError(f"--report-to {name} needs the {name} package ({err}): "
                                   f'pip install -e ".[{EXTRAS[name]}]"') from None


def run_name(out: str) -> str:
    return os.path.basename(os.path.normpath(out))


def kept_run_ids(out: str) -> dict[str, str]:
    """The tracker run ids a resumed run continues; none when the run starts at step 0."""
    path = os.path.join(out, TRACKERS_FILE)
    if not (has_saved_state(out) and os.path.exists(path)):
        return {}
    try:
        with open(path) as fh:
            return dict(json.load(fh))
    except ValueError as err:
        raise TrackerError(f"{path} cannot be read ({err}); delete it to start new tracker runs") from None


def build_trackers(names: tuple[str, ...], out: str) -> list[GeneralTracker]:
    """Accelerate's trackers for ``names``, to pass as ``Accelerator(log_with=...)``; nothing is written
    until ``start_trackers``. A kept run id is resumed (W&B ``resume="allow"``; MLflow ``run_id``,
    which ``MLFLOW_RUN_ID`` overrides)."""
    name, ids = run_name(out), kept_run_ids(out)
    make = {
        "tensorboard": lambda: TensorBoardTracker(name, out),
        "wandb": lambda: WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), dir=out, id=ids.get("wandb"),
                                      resume="allow", name=os.environ.get("WANDB_NAME", name)),
        "mlflow": lambda: MLflowTracker(PROJECT, run_id=ids.get("mlflow"), run_name=name),
    }
    return [make[tracker]() for tracker in names]


def tracker_config(run: RunConfig) -> dict[str, Any]:
    """The settings that define the run, flat (``train.lr``, ``backbone.depth``) and as values every
    tracker takes: a tuple as its JSON list, None as "None" (TensorBoard drops None). Settings that a
    resumed run may change are left out: a resumed MLflow run refuses a parameter with a new value."""
    flat: dict[str, Any] = {}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, v in value.items():
                if key not in RESUMABLE_CHANGES:
                    add(f"{prefix}.{key}" if prefix else key, v)
        else:
            flat[prefix] = json.dumps(list(value)) if isinstance(value, (list, tuple)) else (
                "None" if value is None else value)

    add("", run.to_dict())
    return flat


def _use_mlflow_store(out: str) -> None:
    """MLflow writes to ``MLFLOW_TRACKING_URI``, else to a file store inside the run folder."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = Path(out, "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without it
    mlflow.set_tracking_uri(uri)  # every time: a URI set earlier in this process would win over the variable


def start_trackers(acc: Accelerator, run: RunConfig, out: str) -> None:
    """Start the trackers of ``Accelerator(log_with=build_trackers(...))`` with the run's settings and
    keep their run ids in ``out/trackers.json``. Main process only."""
    if not acc.is_main_process:
        return
    if "mlflow" in requested_trackers(run.train.report_to):
        _use_mlflow_store(out)
    try:
        acc.init_trackers(run_name(out), config=tracker_config(run))
    except Exception as err:  # each tracker library raises its own types (no login, a store it cannot open)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TrackerError(f"--report-to {run.train.report_to}: a tracker did not start ({type(err).__name__}: "
                           f"{detail}); fix its settings (WANDB_* or MLFLOW_* variables) or leave it out") from err
    ids = {t.name: RUN_ID[t.name](t.tracker) for t in acc.trackers if t.name in RUN_ID}
    if ids:
        text = json.dumps({**kept_run_ids(out), **ids}, indent=2)
        atomic_write_text(os.path.join(out, TRACKERS_FILE), text)
