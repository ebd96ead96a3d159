"""Run a recipe under ``accelerate launch`` and refuse to run with a world size other than expected.

    accelerate launch ... tests/distributed_run.py EXPECTED_WORLD_SIZE OBJECTIVE [--recipe-defaults] [recipe flags]

``--recipe-defaults``: start from the objective's recipe defaults (else from the configs' own).
``PRINT_FIRST_MASK=1``: each process prints a digest of the first random masking it draws.
``RANK1_CWD=DIR``: process 1 runs in DIR, so a relative ``--out`` is another folder there (a second
machine with its own disk).

Used by ``conftest.launch_processes``: ``accelerate launch --cpu --num_processes 2`` silently
starts ONE process, so a multi-process test must check inside the run how many there are.
"""

import hashlib
import os
import sys

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ssl_vit.objectives import masked_patch, mae
from ssl_vit.train import run_recipe


def print_first_mask(rank: int) -> None:
    """Wrap the masked objectives' ``random_masking`` to print ``rank R mask DIGEST`` on its first call."""
    draw, printed = masked_patch.random_masking, []

    def recorded(*args, **kwargs):
        masking = draw(*args, **kwargs)
        if not printed:
            printed.append(True)
            print(f"rank {rank} mask {hashlib.sha1(masking.mask.cpu().numpy().tobytes()).hexdigest()}", flush=True)
        return masking

    masked_patch.random_masking = mae.random_masking = recorded

if __name__ == "__main__":
    expected, objective, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    recipe = argv[:1] == ["--recipe-defaults"]
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as the trainer's Accelerator will
    if state.num_processes != expected:
        sys.exit(f"world size {state.num_processes}, expected {expected}: the launcher did not start the processes")
    print(f"rank {state.process_index} of {state.num_processes}", flush=True)
    if os.environ.get("RANK1_CWD") and state.process_index == 1:
        os.chdir(os.environ["RANK1_CWD"])
    if os.environ.get("PRINT_FIRST_MASK"):
        print_first_mask(state.process_index)
    run_recipe(objective, None if recipe else {}, argv=argv[1:] if recipe else argv)
