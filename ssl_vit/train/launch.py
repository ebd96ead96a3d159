"""Launches that cannot train correctly, refused before anything runs; workers that end with their
launcher; the precision the device will train in."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env

from ..errors import ConfigError

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def check_launch(acc: Accelerator) -> None:
    """Refuse processes that a launcher started as several (WORLD_SIZE > 1) but that Accelerate runs
    as one each (``torchrun`` on CPUs): each would train alone and all would write into the same run
    folder. (``accelerate launch --cpu --num_processes N`` starts one process and sets no WORLD_SIZE:
    it trains correctly, on one process.)"""
    check_fsdp(acc)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes == 1:
        raise ConfigError(
            f"this process was launched as one of {world} (WORLD_SIZE={world}) but Accelerate runs it alone, "
            f"so each process would train on its own: launch with accelerate launch --multi_gpu --num_processes "
            f"{world} (on CPUs: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {world})")


def check_fsdp(acc: Accelerator) -> None:
    """Refuse an FSDP launch that would not shard: on CPUs Accelerate runs it unsharded, without a
    word (its FSDP needs an accelerator), and FSDP1 cannot hold the frozen and trained parameters
    that every objective mixes in one unit (ssl_vit shards with FSDP2: ``sharding``)."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and acc.distributed_type != DistributedType.FSDP:
        raise ConfigError("an FSDP launch without a GPU: Accelerate would train unsharded; on CPUs launch DDP "
                          "(ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N)")
    if acc.distributed_type == DistributedType.FSDP and acc.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(f"fsdp_version {acc.state.fsdp_plugin.fsdp_version}: ssl_vit shards with FSDP2 only "
                          "(FSDP1 cannot hold frozen and trained parameters in one unit); set fsdp_version: 2 in the "
                          "accelerate config, as configs/accelerate/fsdp2.yaml does")


def die_with_launcher() -> None:
    """A worker started by a launcher (``LOCAL_RANK`` set) gets SIGTERM when its launcher dies, so a
    killed ``torchrun`` or ``accelerate launch`` leaves no process writing into the run folder
    (Linux only: ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing is done)."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def training_device() -> str:
    """"cuda" where Accelerate will train on a GPU, else "cpu" (known before the Accelerator exists)."""
    return "cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu"


def resolve_precision(requested: str, device: str) -> str:
    """--precision auto -> bf16 on a GPU that computes in it, float32 ("no") elsewhere. fp16 on a CPU
    is refused: Accelerate would run it in float32 without a word."""
    if requested == "fp16" and device != "cuda":
        raise ConfigError("--precision fp16 needs a GPU (on a CPU Accelerate silently trains in float32): "
                          "use --precision bf16 or no, or auto")
    if requested != "auto":
        return requested
    return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
