"""FSDP2 on 2 real CPU processes (gloo): wrapping, the EMA on shards, the gathered checkpoint and the
evaluation of every objective (``fsdp_run.py``). A GPU launch with Accelerate's FSDP plugin is
untested here: Accelerate runs FSDP only on an accelerator."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from conftest import free_port
from fsdp_run import SETTINGS
from ssl_vit.errors import ConfigError
from ssl_vit.train.launch import check_launch


def test_every_objective_shards_trains_and_saves_and_evaluates_as_unsharded():
    script = Path(__file__).parent / "fsdp_run.py"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", free_port(), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), str(script.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)  # ~20 s on 2 idle cores
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for rank in range(2):
        assert f"rank {rank} of 2: finite flag agreed" in done.stdout, done.stdout[-2000:]
        assert f"rank {rank} of 2: first updates ok" in done.stdout, done.stdout[-2000:]
        for name in SETTINGS:
            assert f"rank {rank} of 2: {name} ok" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize("launch", ["cpu", "fsdp1"])
def test_fsdp_launches_that_would_not_shard_are_refused(launch, monkeypatch):
    """On CPUs Accelerate would silently train unsharded; FSDP1 cannot mix frozen and trained parameters."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    kind = DistributedType.NO if launch == "cpu" else DistributedType.FSDP
    acc = SimpleNamespace(num_processes=1, distributed_type=kind,
                          state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ConfigError, match="without a GPU" if launch == "cpu" else "fsdp_version 1"):
        check_launch(acc)
