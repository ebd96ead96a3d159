"""FSDP2 on 2 real CPU processes (gloo): wrapping, the EMA on shards, the gathered checkpoint and the
evaluation of every objective (``fsdp_run.py``). A GPU launch with Accelerate's FSDP plugin is
untested here: Accelerate runs FSDP only on an accelerator."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port
from fsdp_run import SETTINGS


def test_every_objective_shards_trains_and_saves_and_evaluates_as_unsharded():
    script = Path(__file__).parent / "fsdp_run.py"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", free_port(), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), str(script.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for rank in range(2):
        for name in SETTINGS:
            assert f"rank {rank} of 2: {name} ok" in done.stdout, done.stdout[-2000:]
