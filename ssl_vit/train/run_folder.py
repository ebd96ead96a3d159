"""The run folder: its resolved settings, its resumable state, its lock and its default name.

``config.json`` (a folder whose saved state belongs to another run is refused), ``state/step-N``
written by ``accelerator.save_state`` behind a ``latest`` pointer (atomic: a crash never leaves a
half state), ``.lock``, held by the one process that trains in the folder, ``trackers.json``
(the tracker run ids: ``trackers``) and ``.shared``, which every process must see (``check_shared``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from typing import Optional

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from ..checkpoint import (ADDED_OBJECTIVE_SETTINGS, CheckpointError, DiskFullError, atomic_write, atomic_write_text,
                          disk_full)
from ..config import RunConfig
from ..errors import ConfigError
from ..names import folder_safe

CONFIG_FILE, METRICS_FILE, CKPT_FILE, STATE_DIR = "config.json", "metrics.jsonl", "ckpt.pt", "state"
TRACKERS_FILE = "trackers.json"  # the W&B and MLflow run ids that a resumed run continues
SHARED_FILE, SHARED_WAIT_S = ".shared", 3.0  # a token the main process writes; how long others look for it
# Settings that may change between a run and its resumption without changing its result.
RESUMABLE_CHANGES = {"out", "save_every", "log_every", "eval_every", "num_workers", "compile", "skip_bad_images",
                     "stop_at", "max_skipped_steps", "report_to", "monitor", "monitor_every", "monitor_data",
                     "monitor_max_train", "monitor_max_test"}  # monitors read the weights, never change them


def default_out(run: RunConfig) -> str:
    """``runs/<objective>-<data folder or file name>-<model>`` (a file's suffix kept, as it always was)."""
    data = folder_safe(os.path.basename(os.path.normpath(run.train.data)))
    return os.path.join("runs", f"{run.objective}-{data}-{run.backbone.model}")


# Loop settings added after run folders were written -> the value those runs trained with.
ADDED_TRAIN_SETTINGS = {"clip_grad_mode": "norm", "random_erasing": 0.0, "label_fraction": 1.0}
ADDED_BACKBONE_SETTINGS = {"distillation_token": False}


def with_added_settings(config: dict) -> dict:
    """An older config.json, completed with the settings added since at the values it ran with."""
    added = ADDED_OBJECTIVE_SETTINGS.get(config.get("objective"), {})
    return {**config, "train": {**ADDED_TRAIN_SETTINGS, **config.get("train", {})},
            "backbone": {**ADDED_BACKBONE_SETTINGS, **config.get("backbone", {})},
            "objective_config": {**added, **config.get("objective_config", {})}}


def _flat(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v) if isinstance(v, dict) else {k: v})
    return out


def has_saved_state(out: str) -> bool:
    """Whether a run in ``out`` saved a state to resume from (else a run there starts at step 0)."""
    return os.path.exists(os.path.join(out, STATE_DIR, "latest"))


def check_config(out: str, run: RunConfig) -> None:
    """Refuse a folder whose saved state belongs to a run with other settings. A folder with no
    saved state (a start that failed, say) takes the new settings."""
    path = os.path.join(out, CONFIG_FILE)
    new = json.loads(json.dumps(run.to_dict()))
    if os.path.exists(path) and has_saved_state(out):
        with open(path) as fh:
            old = json.load(fh)
        if old.get("objective") != new["objective"]:
            raise ConfigError(f"{out} holds a {old.get('objective')} run; pass a new --out")
        a, b = _flat(with_added_settings(old)), _flat(new)
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
                if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES}
        if diff:
            lines = ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in sorted(diff.items()))
            raise ConfigError(f"{out} holds a run with other settings ({lines}); pass a new --out or delete it")


def write_config(out: str, run: RunConfig) -> None:
    """Save the resolved settings (after every check has passed: nothing is written before)."""
    text = json.dumps(run.to_dict(), indent=2)
    atomic_write_text(os.path.join(out, CONFIG_FILE), text)


class RunLock:
    """One run per folder: an exclusive lock on ``out/.lock`` while a run trains there. The operating
    system releases it when the process ends, a crash or a kill included, so it never goes stale.

    A POSIX record lock (``lockf``), not ``flock``: it belongs to this process alone, so forked
    data-loader workers, which outlive a SIGKILLed parent by up to 5 s, never keep the folder
    locked against the rerun. Two locks taken in one process do not exclude each other."""

    def __init__(self, out: str):
        self.path, self.fd = os.path.join(out, ".lock"), None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"another run is training in {os.path.dirname(self.path)} (process {holder}); "
                              "wait for it to finish, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing frees a POSIX lock
            self.fd = None


def _sees(path: str, token: str, wait_s: float) -> bool:
    """Whether ``path`` holds ``token`` within ``wait_s`` (a network filesystem may show it late)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as fh:
                if fh.read() == token:
                    return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def check_shared(out: str, acc: Accelerator, wait_s: float = SHARED_WAIT_S) -> None:
    """Several processes share one run folder: the main process writes config.json, the state and
    ckpt.pt, and every process reads the state back on resume. Refuse when some process does not
    see ``out`` (machines each with their own disk) instead of resuming them from different steps:
    the main process writes a fresh token there and every process must read it. Call after the main
    process created ``out``; raises the same ``ConfigError`` on every process."""
    if acc.num_processes == 1:
        return
    token = broadcast_object_list([uuid.uuid4().hex if acc.is_main_process else None])[0]
    path = os.path.join(out, SHARED_FILE)
    if acc.is_main_process:
        atomic_write_text(path, token)
    acc.wait_for_everyone()
    blind = [rank for rank, seen in enumerate(gather_object([_sees(path, token, wait_s)])) if not seen]
    if blind:
        raise ConfigError(f"process {', '.join(map(str, blind))} does not see the run folder "
                          f"{os.path.abspath(out)} that process 0 writes (each machine has its own disk?): "
                          "training on several machines needs --out on a filesystem every machine mounts "
                          "(NFS, Lustre, a shared cloud volume)")


def check_random_states(state: str, rank: int) -> None:
    """Accelerate skips random states it cannot read and resumes with others, silently; refuse
    instead, since the resumed run would not be the interrupted one. Read as Accelerate reads them
    (weights only: a malicious pickle never runs)."""
    from accelerate.utils import RNG_STATE_NAME
    from accelerate.utils.other import load

    path = os.path.join(state, f"{RNG_STATE_NAME}_{rank}.pkl")
    try:
        states = load(path)
        missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states)
    except Exception as err:  # torch's unpickler raises many types for a damaged or foreign file
        missing = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    if missing:
        raise CheckpointError(f"{path} cannot be used ({missing}): the run would resume with other random "
                              f"numbers than it stopped with; restore the file, or delete {os.path.dirname(state)} "
                              "to train from step 0")


class StateFolder:
    """``out/state/step-N`` folders written by ``accelerator.save_state`` behind a ``latest`` pointer."""

    def __init__(self, out: str, accelerator: Accelerator):
        self.root, self.acc = os.path.join(out, STATE_DIR), accelerator

    def latest(self) -> Optional[str]:
        pointer = os.path.join(self.root, "latest")
        if not os.path.exists(pointer):
            return None
        with open(pointer) as fh:
            name = fh.read().strip()
        path = os.path.join(self.root, name)
        if not os.path.isdir(path):
            raise CheckpointError(f"{pointer} names {name}, which is missing: restore it, or delete {self.root} "
                                  "to train from step 0")
        return path

    def save(self, step: int, skipped_steps: int = 0, extra_batches: int = 0) -> None:
        """The state after optimizer step ``step``; ``skipped_steps``: the steps whose non-finite update
        was dropped so far; ``extra_batches``: batches used beyond the steps (the data position is
        ``step + extra_batches``; only states saved before skipped steps counted as steps have any)."""
        name = f"step-{step}"
        tmp, final = os.path.join(self.root, f".{name}.tmp"), os.path.join(self.root, name)
        if self.acc.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        self.acc.wait_for_everyone()
        try:
            self.acc.save_state(tmp)  # model, optimizer, scaler, every process's RNG
        except Exception as err:  # safetensors' own error types too
            if not disk_full(err):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFullError(tmp, f"; the last good state is kept ({self.latest() or 'none yet'})") from err
        self.acc.wait_for_everyone()  # every process's random state is in tmp before it is renamed
        if self.acc.is_main_process:
            with open(os.path.join(tmp, "progress.json"), "w") as fh:
                json.dump({"step": step, "nonfinite_steps": skipped_steps, "extra_batches": extra_batches}, fh)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(os.path.join(self.root, "latest"), lambda p: open(p, "w").write(name))
            for old in os.listdir(self.root):
                if old.startswith("step-") and old != name:
                    shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        self.acc.wait_for_everyone()

    def load(self) -> tuple[int, int, int]:
        """(step, skipped steps, extra batches) of the latest saved state, loaded into the accelerator;
        (0, 0, 0) if none. An older state's ``skipped_steps`` is both: its skipped steps were retried
        on the next batches."""
        path = self.latest()
        if path is None:
            return 0, 0, 0
        check_random_states(path, self.acc.process_index)
        self.acc.load_state(path)
        with open(os.path.join(path, "progress.json")) as fh:
            progress = json.load(fh)
        old = progress.get("skipped_steps", 0)
        return (int(progress["step"]), int(progress.get("nonfinite_steps", old)),
                int(progress.get("extra_batches", old)))
