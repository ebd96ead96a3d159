"""Run a recipe under ``accelerate launch`` and refuse to run with a world size other than expected.

    accelerate launch ... tests/distributed_run.py EXPECTED_WORLD_SIZE OBJECTIVE [--recipe-defaults] [recipe flags]

``--recipe-defaults``: start from the objective's recipe defaults (else from the configs' own).

Used by ``conftest.launch_processes``: ``accelerate launch --cpu --num_processes 2`` silently
starts ONE process, so a multi-process test must check inside the run how many there are.
"""

import sys

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ssl_vit.train import run_recipe

if __name__ == "__main__":
    expected, objective, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    recipe = argv[:1] == ["--recipe-defaults"]
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as the trainer's Accelerator will
    if state.num_processes != expected:
        sys.exit(f"world size {state.num_processes}, expected {expected}: the launcher did not start the processes")
    print(f"rank {state.process_index} of {state.num_processes}", flush=True)
    run_recipe(objective, None if recipe else {}, argv=argv[1:] if recipe else argv)
