"""The run folder: its resolved settings, its resumable state and its default name.

``config.json`` (a folder holding another run is refused), ``state/step-N`` written by
``accelerator.save_state`` behind a ``latest`` pointer (atomic: a crash never leaves a half state).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from accelerate import Accelerator

from ..checkpoint import atomic_write
from ..config import RunConfig
from ..errors import ConfigError
from ..names import folder_safe, short_name

CONFIG_FILE, METRICS_FILE, CKPT_FILE, STATE_DIR = "config.json", "metrics.jsonl", "ckpt.pt", "state"
# Settings that may change between a run and its resumption without changing its result.
RESUMABLE_CHANGES = {"out", "save_every", "log_every", "eval_every", "num_workers", "compile", "skip_bad_images",
                     "stop_at"}


def default_out(run: RunConfig) -> str:
    return os.path.join("runs", f"{run.objective}-{folder_safe(short_name(run.train.data))}-{run.backbone.model}")


def _flat(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v) if isinstance(v, dict) else {k: v})
    return out


def check_or_write_config(out: str, run: RunConfig) -> None:
    """Save the resolved config; refuse to resume a folder that holds a different run."""
    path = os.path.join(out, CONFIG_FILE)
    new = json.loads(json.dumps(run.to_dict()))
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        if old.get("objective") != new["objective"]:
            raise ConfigError(f"{out} holds a {old.get('objective')} run; pass a new --out")
        a, b = _flat(old), _flat(new)
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
                if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES}
        if diff:
            lines = ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in sorted(diff.items()))
            raise ConfigError(f"{out} holds a run with other settings ({lines}); pass a new --out or delete it")
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
