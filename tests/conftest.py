"""Shared test helpers: tiny backbones and the real data folder (skipped where it is absent)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from ssl_vit.backbone import BackboneConfig, build_backbone

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_vit(**kw):
    """ViT-Ti with 2 layers on 16 px images and 4 px patches: a 4x4 grid, fast on a CPU."""
    cfg = dict(model="vit_tiny", patch_size=4, img_size=16, depth=2)
    cfg.update(kw)
    return build_backbone(BackboneConfig(**cfg))


def tiny_hybrid(**kw):
    """R+ViT-Ti (ResNet root, stride 16) with 2 layers on 64 px images: a 4x4 grid."""
    cfg = dict(model="r_vit_tiny", img_size=64, depth=2)
    cfg.update(kw)
    return build_backbone(BackboneConfig(**cfg))


def fit(objective, batch: dict, optimizer, steps: int) -> tuple[list[float], dict]:
    """``steps`` updates of plain backpropagation on one fixed batch: each step's loss and the last metrics."""
    losses, metrics = [], {}
    for _ in range(steps):
        loss, metrics = objective(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, metrics


def train_step(objective, micro_batches: list[list[torch.Tensor]], opt, info) -> torch.Tensor:
    """One optimizer step of a multi-view objective (DINO, MSN) the way the training loop runs it: its
    hooks, each micro-batch's views, the update; returns the mean loss."""
    objective.start_step(info, opt)
    total = 0.0
    for views in micro_batches:
        loss, _ = objective({"image": views})
        (loss / len(micro_batches)).backward()
        total += loss.detach() / len(micro_batches)
    objective.before_optimizer_step(info)
    opt.step()
    opt.zero_grad(set_to_none=True)
    objective.end_step(info)
    return total


def free_port() -> str:
    """A TCP port on localhost that nothing listens on now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch_command(num_processes: int, runs: list[dict]) -> tuple[list[str], dict]:
    """The command and environment that run the recipes of ``runs`` one after another in
    ``num_processes`` real CPU processes (gloo): ``distributed_run.py`` describes ``runs``.

    ``accelerate launch --cpu --num_processes N`` silently starts one process; ``--multi_gpu`` with
    ``ACCELERATE_USE_CPU`` starts N. ``distributed_run.py`` exits with an error, inside the run,
    unless the world size is ``num_processes``, and prints ``rank R of N`` from each process.
    """
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
           "--main_process_port", free_port(), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(Path(__file__).parent / "distributed_run.py"), str(num_processes), json.dumps(runs)]
    return cmd, {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def launch_processes(num_processes: int, runs: list[dict], timeout: float = 300) -> str:
    """Run ``runs`` (``launch_command``) to the end; returns what the processes printed."""
    cmd, env = launch_command(num_processes, runs)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # the processes print at once: their lines can run together, so match the words, not lines
    ranks = sorted(re.findall(r"rank (\d+) of (\d+)", done.stdout))
    assert ranks == [(str(r), str(num_processes)) for r in range(num_processes)], done.stdout[-2000:]
    return done.stdout


def kill_processes(num_processes: int, runs: list[dict], when: Callable[[], bool], timeout: float = 300) -> None:
    """Start ``runs`` (``launch_command``) and, once ``when()`` holds, SIGKILL the launcher and every
    process it started at once (their process group); fails if the launch ends first."""
    cmd, env = launch_command(num_processes, runs)
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the processes
        launched = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not when() and launched.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        alive = launched.poll() is None
        if alive:
            os.killpg(launched.pid, signal.SIGKILL)
        launched.wait()
        log.seek(0)
        assert alive, f"the launch ended before it could be killed: {log.read()[-3000:]}"


def small_digits(folder, n_train: int = 40, n_test: int = 20) -> str:
    """A Parquet data folder of the first digits: at batch 8, 5 steps per epoch."""
    from ssl_vit.data import load_data

    src = load_data("default")
    folder.mkdir()
    src.train.select(range(n_train)).to_parquet(str(folder / "digits-train.parquet"))
    src.test.select(range(n_test)).to_parquet(str(folder / "digits-test.parquet"))
    return str(folder)


@pytest.fixture
def cifar10_dir():
    path = SHARED_DATA / "cifar10"
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (only on the project's machines)")
    return str(path)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """Tests never reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
