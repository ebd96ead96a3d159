"""What the trainer does on hardware this machine lacks, tested by faking it: a TPU (no fused
optimizer, the loader wrapped as torch_xla expects) and machines with their own disks (refused)."""

import subprocess
import sys
import types

import torch
from torch.utils.data import DataLoader

from conftest import launch_command
from ssl_vit.config import TrainConfig
from ssl_vit.train.optim import fused_by_default
from ssl_vit.train.pipeline import device_loader

TINY = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "8",
        "--num-workers", "0", "--steps", "1", "--report-to", "none"]


def test_adamw_is_fused_except_on_a_tpu():
    tc = TrainConfig(optimizer="adamw")
    assert fused_by_default(tc, torch.device("cpu")) and fused_by_default(tc, torch.device("cuda"))
    assert not fused_by_default(tc, torch.device("xla"))
    assert not fused_by_default(TrainConfig(optimizer="sgd"), torch.device("cpu"))


def test_on_a_tpu_the_loader_is_wrapped_in_torch_xlas_device_loader(monkeypatch):
    class MpDeviceLoader:  # torch_xla.distributed.parallel_loader's, faked: torch_xla is not installed here
        def __init__(self, loader, device):
            self.loader, self.device = loader, device

    module = types.ModuleType("torch_xla.distributed.parallel_loader")
    module.MpDeviceLoader = MpDeviceLoader
    for name in ("torch_xla", "torch_xla.distributed"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    loader = DataLoader(range(4))
    wrapped = device_loader(loader, torch.device("xla"))
    assert isinstance(wrapped, MpDeviceLoader) and wrapped.loader is loader and wrapped.device.type == "xla"
    assert device_loader(loader, torch.device("cpu")) is loader


def test_processes_that_do_not_see_the_run_folder_are_refused(tmp_path):
    """Process 1 runs in another directory, so the relative --out is another folder there: a second
    machine with its own disk. Every process stops with the same line, before training."""
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    cmd, env = launch_command(2, [{"objective": "supervised", "argv": [*TINY, "--out", "run"]}])
    done = subprocess.run(cmd, env={**env, "RANK1_CWD": str(tmp_path / "node1")}, cwd=str(tmp_path / "node0"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "process 1 does not see the run folder" in out and "a filesystem every machine mounts" in out, out[-3000:]
    assert not (tmp_path / "node0" / "run" / "state").exists()
