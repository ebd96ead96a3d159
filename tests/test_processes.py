"""Every objective under two real processes (DDP over gloo, through ``accelerate launch``): it trains
as one process does at the same global batch, resumes after a SIGKILL to the weights of a run never
interrupted, writes one checkpoint, and each process draws its masks and drop-path from its own seed.

Starting two processes costs ~10 s of imports on 2 CPUs, so the module launches twice and each launch
runs every objective's recipe in turn (``distributed_run.py``): the first is killed, the second resumes
it and runs everything else.
"""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import kill_processes, launch_processes, small_digits
from distributed_run import MASKED, digest, global_batch_masking
from ssl_vit.checkpoint import load_checkpoint
from ssl_vit.masking import random_masking
from ssl_vit.objectives import OBJECTIVES
from ssl_vit.train import run_recipe
from test_train import SGD, assert_same_weights

TINY = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "8",
        "--num-workers", "0", "--log-every", "1", "--report-to", "none"]
# each objective's tiny heads and views; distill's --teacher is added by ``_argv``
SETTINGS = {
    "supervised": [],
    "masked_patch": [],
    "mae": ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"],
    "dino": ["--out-dim", "32", "--hidden-dim", "32", "--bottleneck-dim", "16", "--local-crops-number", "2",
             "--local-crop-size", "8", "--freeze-last-layer-epochs", "0"],
    "msn": ["--focal-size", "8", "--focal-views", "2", "--num-prototypes", "16", "--hidden-dim", "32",
            "--output-dim", "16"],
    "distill": [],
}
# Two processes equal one: SGD (AdamW turns the rounding noise of near-zero gradients into whole steps,
# and DINO's and MSN's recipes move their learning rate with the batch and their weight decay over the
# run), a teacher that moves fast enough to show an extra EMA update, and nothing a process cannot draw
# for its share of the batch alone: the masks are drawn for the whole global batch (``shared_draws``),
# drop-path is off, Mixup is off (it mixes images within a process's batch), masked patch prediction's
# random patches (from another image of the process's batch) are [mask] embeddings, and MSN's heads have
# no BatchNorm (its statistics are per process on CPUs).
SAME = [*SGD, "--lr-ref-batch", "8", "--drop-path-rate", "0", "--steps", "3"]
SAME_SETTINGS = {
    "supervised": [],
    "masked_patch": ["--mask-fraction", "1", "--random-fraction", "0", "--unchanged-fraction", "0"],
    "mae": [],
    "dino": ["--weight-decay-end", "0", "--momentum-teacher", "0.9"],
    "msn": ["--weight-decay-end", "0", "--momentum-teacher", "0.9", "--no-head-bn"],
    "distill": ["--mixup", "0", "--cutmix", "0", "--random-erasing", "0"],  # erasing: drawn per process's batch
}
# Resume: each recipe as it is, with drop-path in supervised too, and 2 layers where it drops paths (timm's
# rates rise from 0 at the first layer), so that every run draws per process; 6 steps cross an epoch of
# the 40 images (5 steps); state every 2 steps.
RESUME = ["--steps", "6", "--save-every", "2"]
DROP_PATH = ["--drop-path-rate", "0.1", "--depth", "2"]
# distill without its random erasing, which draws on the device before drop-path does
PER_PROCESS = {"supervised": DROP_PATH, "dino": DROP_PATH, "distill": [*DROP_PATH, "--random-erasing", "0"]}
KILLED = "dino"  # killed mid-run; the others stop at step 3 (--stop-at) in the same launch first
STOP_AT = 3

assert SETTINGS.keys() == SAME_SETTINGS.keys() == OBJECTIVES.keys(), "every registered objective is tested here"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return small_digits(tmp_path_factory.mktemp("digits") / "data")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data) -> str:
    """distill's teacher: a few supervised steps."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    return run_recipe("supervised", None, argv=[*TINY, "--data", data, "--steps", "2", "--out", str(out)])


def _argv(objective: str, out, data: str, teacher: str, *extra: str) -> list[str]:
    distill = ["--teacher", teacher] if objective == "distill" else []
    return [*TINY, *SETTINGS[objective], *distill, "--data", data, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, data, teacher):
    """Launch 1, killed: every objective's resume run, the others stopped at STOP_AT, KILLED once it
    saved a state. Launch 2: those runs again (they resume), the same runs never interrupted, and the
    runs that equal one process. Returns the run folders and what the processes printed."""
    root = tmp_path_factory.mktemp("processes")

    def argv(kind: str, name: str, *extra: str) -> list[str]:
        return _argv(name, root / kind / name, data, teacher, *extra)

    per_process = {name: argv("resumed", name, *RESUME, *PER_PROCESS.get(name, [])) for name in OBJECTIVES}
    order = [name for name in OBJECTIVES if name != KILLED] + [KILLED]
    first = [{"objective": name, "argv": [*per_process[name], *([] if name == KILLED else ["--stop-at", str(STOP_AT)])]}
             for name in order]
    kill_processes(2, first, when=lambda: (root / "resumed" / KILLED / "state" / "latest").exists())
    assert not (root / "resumed" / KILLED / "ckpt.pt").exists()
    whole = [{"objective": n, "argv": argv("whole", n, *RESUME, *PER_PROCESS.get(n, []))} for n in OBJECTIVES]
    same = [{"objective": n, "argv": argv("same", n, *SAME, *SAME_SETTINGS[n]), "shared_draws": True,
             "slow_saves": True} for n in OBJECTIVES]
    resumed = [{"objective": n, "argv": per_process[n]} for n in order]
    plan = [*resumed, *whole, *same]
    stdout = launch_processes(2, plan)
    label = {(_out(run).parent.name, run["objective"]): i for i, run in enumerate(plan)}  # ("whole", "mae") -> 7
    return SimpleNamespace(root=root, plan=plan, label=label, stdout=stdout, argv=argv)


def _out(run: dict) -> Path:
    return Path(run["argv"][run["argv"].index("--out") + 1])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_processes_train_as_one_at_the_same_global_batch(launched, objective, monkeypatch):
    """Each process trains on its half of every batch; gradients are averaged over both (and DINO's centre,
    MSN's me-max and Sinkhorn over the batch of both); the EMA teachers move once per step."""
    for module in MASKED:
        monkeypatch.setattr(module, "random_masking", global_batch_masking(random_masking, 0, 1))
    one = run_recipe(objective, None, argv=launched.argv("one", objective, *SAME, *SAME_SETTINGS[objective]))
    two = load_checkpoint(str(launched.root / "same" / objective / "ckpt.pt"))
    assert two["step"] == 3
    assert_same_weights(two, load_checkpoint(one), rtol=1e-4)


def _steps_logged(run) -> list[int]:
    return [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_killed_run_resumes_to_the_weights_of_one_never_interrupted(launched, objective):
    """Every process's random numbers (masks, drop-path, Mixup) resume with it; each step is logged once."""
    resumed, whole = launched.root / "resumed" / objective, launched.root / "whole" / objective
    at = re.search(rf"resuming {re.escape(str(resumed))} at step (\d+)/6", launched.stdout)
    assert at, f"{objective} did not resume"
    assert int(at.group(1)) == STOP_AT if objective != KILLED else int(at.group(1)) in (2, 4)
    assert_same_weights(load_checkpoint(str(resumed / "ckpt.pt")), load_checkpoint(str(whole / "ckpt.pt")))
    assert _steps_logged(resumed) == _steps_logged(whole) == list(range(1, 7))


def test_each_run_writes_one_checkpoint_from_the_main_process(launched):
    """One ckpt.pt, written by process 0; one saved state, with the random numbers of both processes (also
    when process 1 saves late: the "same" runs)."""
    saves = re.findall(r"rank (\d+) run (\d+) saved (\S+)", launched.stdout)
    for label, run in enumerate(launched.plan):
        out = _out(run)
        assert [(r, path) for r, i, path in saves if int(i) == label] == [("0", str(out / "ckpt.pt"))], out
        step = load_checkpoint(str(out / "ckpt.pt"))["step"]
        assert [p.name for p in (out / "state").glob("step-*")] == [f"step-{step}"]
        assert {p.name for p in (out / "state" / f"step-{step}").glob("random_states_*")} == {
            "random_states_0.pkl", "random_states_1.pkl"}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_process_draws_its_masks_and_drop_path_from_its_own_seed(launched, objective):
    """Process r's first mask or drop-path draw comes from seed + r (then each draws on from there):
    one seed on both made a step draw only batch / 2 distinct masks."""
    label = launched.label["whole", objective]
    drawn = dict(re.findall(rf"rank (\d+) run {label} first draw ([0-9a-f]{{40}})", launched.stdout))
    assert drawn == {str(r): digest(torch.Generator().manual_seed(r).get_state()) for r in range(2)}  # seed 0
