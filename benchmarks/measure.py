"""Measuring a training step: host syncs it would cause on a GPU, FLOPs, peak memory, device peaks.

Kept apart from the harness so each measurement is a small named function.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets (no sparsity), matched
# against torch.cuda.get_device_name(); longer names first so "H100 PCIe" wins over "H100".
BF16_PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM (HBM3)
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}

# aten ops that wait for the GPU (the host needs a value or a data-dependent size).
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique_consecutive",
             "_unique2", "unique_dim", "repeat_interleave", "equal", "is_nonzero"}


def bf16_peak_tflops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak, or None for a CPU or a GPU missing from the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: ``cpu-2core`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
    return f"cpu-{os.cpu_count()}core"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncAudit(TorchDispatchMode):
    """Records the aten ops of a step that would make the host wait for a GPU.

    Runs on any device (the check is on the op, not on a clock), so a CPU run already shows
    which ``.item()``, boolean indexing or data-dependent shapes a CUDA step would stall on.
    """

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self._ignoring = False

    @contextmanager
    def ignoring(self):
        """Ops inside are not recorded (the training loop's one deliberate check per step)."""
        self._ignoring = True
        try:
            yield
        finally:
            self._ignoring = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._ignoring:
            name = func.overloadpacket.__name__.rstrip("_")
            if name in _SYNC_OPS and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
                self.ops[name] += 1
            elif name in ("index", "index_put") and _has_bool_index(args[1]):
                self.ops[f"{name} (boolean mask)"] += 1
        return func(*args, **kwargs)


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def median_rate(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; no extra dependency)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (VmHWM). Not ``ru_maxrss``: that
    one survives exec, so a spawned child starts with its parent's peak."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def peak_training_memory(device: torch.device, run_steps: Callable[[], None]) -> int:
    """Bytes a fresh process needs to build a model and train it for a few steps.

    CUDA: ``torch.cuda.max_memory_allocated`` (weights, gradients, optimizer state, activations).
    CPU: growth of the peak RSS over the RSS before building (the same things, plus allocator
    slack). Call it in a fresh process: the peak RSS never goes down.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        run_steps()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    before = rss_bytes()
    run_steps()
    return max(0, peak_rss_bytes() - before)
