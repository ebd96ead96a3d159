"""Run recipes under ``accelerate launch``, one after another in the same processes, and refuse to run
with a world size other than expected.

    accelerate launch ... tests/distributed_run.py EXPECTED_WORLD_SIZE PLAN

``PLAN``: JSON, a list of runs ``{"objective": NAME, "argv": [recipe flags], "shared_draws": BOOL,
"slow_saves": BOOL}``, each from its objective's recipe defaults. ``shared_draws``: masks are drawn as one process drawing the
whole global batch would (``global_batch_masking``), so the run can equal a one-process run;
``slow_saves``: processes other than the main one start saving the training state 0.3 s late.
``RANK1_CWD=DIR``: process 1 runs in DIR, so a relative ``--out`` is another folder there (a second
machine with its own disk).

Each process prints ``rank R of N`` once, and for run I of the plan:
``rank R run I first draw DIGEST`` (the torch RNG state at its first mask or drop-path draw) and
``rank R run I saved PATH`` for each checkpoint it writes.

Used by ``conftest.launch_processes``: ``accelerate launch --cpu --num_processes 2`` silently starts
ONE process, so a multi-process test must check inside the run how many there are. Starting
processes costs seconds of imports, so one launch runs many recipes.
"""

import hashlib
import itertools
import json
import os
import sys
import time
from contextlib import ExitStack
from unittest.mock import patch

import timm.layers.drop
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env

import ssl_vit.train
from ssl_vit.masking import Masking
from ssl_vit.objectives import mae, masked_patch, msn
from ssl_vit.train import run_recipe

MASKED = (masked_patch, mae, msn)  # the objectives that draw ssl_vit.masking.random_masking


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def global_batch_masking(draw, rank: int, world: int):
    """``random_masking`` as one process drawing the masks of the whole global batch would: each call
    draws world x B rows from a generator seeded by the call's number and keeps this process's rows.
    The sampler deals the global batch out in turn (its image i goes to process i % world, row
    i // world), so those are rows ``rank::world``."""
    calls = itertools.count()

    def shared(batch, num_tokens, ratio, device, generator=None):
        g = torch.Generator(device=device).manual_seed(next(calls))
        return Masking(*(t[rank::world] for t in draw(batch * world, num_tokens, ratio, device, generator=g)))
    return shared


def print_first_draw(label: str, rank: int):
    """Wrap the masks' and timm's drop-path draws to print the torch RNG state at the first of them."""
    printed = []

    def recorded(draw, is_random=lambda *a, **k: True):
        def call(*args, **kwargs):
            if not printed and is_random(*args, **kwargs):
                printed.append(True)
                print(f"rank {rank} run {label} first draw {digest(torch.get_rng_state())}", flush=True)
            return draw(*args, **kwargs)
        return call
    return recorded


def late(save_state):
    """``Accelerator.save_state`` that starts 0.3 s late on every process but the main one."""
    def call(self, *args, **kwargs):
        if not self.is_main_process:
            time.sleep(0.3)
        return save_state(self, *args, **kwargs)
    return call


def run_plan(runs: list[dict], state: PartialState) -> None:
    rank, world = state.process_index, state.num_processes
    save = ssl_vit.train.save_checkpoint

    def saved(path, *args, **kwargs):
        print(f"rank {rank} run {label} saved {path}", flush=True)
        return save(path, *args, **kwargs)

    for label, run in enumerate(runs):
        recorded = print_first_draw(str(label), rank)
        masking = masked_patch.random_masking
        if run.get("shared_draws"):
            masking = global_batch_masking(masking, rank, world)
        with ExitStack() as patches:
            for module in MASKED:
                patches.enter_context(patch.object(module, "random_masking", recorded(masking)))
            patches.enter_context(patch.object(timm.layers.drop, "drop_path", recorded(
                timm.layers.drop.drop_path, lambda x, p=0.0, training=False, *a, **k: p > 0 and training)))
            patches.enter_context(patch.object(ssl_vit.train, "save_checkpoint", saved))
            if run.get("slow_saves"):
                patches.enter_context(patch.object(Accelerator, "save_state", late(Accelerator.save_state)))
            # one process group serves every run: a second init_process_group under the launcher's store
            # reads the first one's addresses (gloo: "connection refused"), so end_training keeps it
            patches.enter_context(patch.object(PartialState, "destroy_process_group", lambda self, group=None: None))
            run_recipe(run["objective"], None, argv=run["argv"])
    state.destroy_process_group()


if __name__ == "__main__":
    expected, plan = int(sys.argv[1]), json.loads(sys.argv[2])
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as the trainer's Accelerator will
    if state.num_processes != expected:
        sys.exit(f"world size {state.num_processes}, expected {expected}: the launcher did not start the processes")
    print(f"rank {state.process_index} of {state.num_processes}", flush=True)
    if os.environ.get("RANK1_CWD") and state.process_index == 1:
        os.chdir(os.environ["RANK1_CWD"])
    run_plan(plan, state)
