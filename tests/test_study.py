"""Studies: the file is checked before anything runs, a FLOP budget buys each objective its own
number of steps, a tiny study writes every output, and a killed study finishes with the same results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, small_digits

from ssl_vit.errors import ConfigError
from ssl_vit.study.__main__ import run_study
from ssl_vit.study.budget import allot, steps_for
from ssl_vit.study.spec import parse_study
from ssl_vit.train.flops import step_flops

ROOT = Path(__file__).resolve().parents[1]
TINY = """
objectives = ["supervised", "mae"]
seeds = [0, 1]
budget = { flops = 2e9 }
data = "DATA"
[common]
model = "vit_tiny"
depth = 1
patch_size = 4
img_size = 16
batch_size = 8
num_workers = 0
report_to = "none"
[objective.mae]
mask_ratio = 0.75
decoder_depth = 1
[[eval]]
kind = "knn"
k = [5]
[[eval]]
kind = "fewshot"
shots = [2]
seeds = 1
"""


def _write(tmp_path, text=TINY) -> str:
    """The study file, on a small digits folder (80 train, 40 test images) in ``tmp_path``."""
    data = tmp_path / "data"
    if not data.exists():
        small_digits(data, n_train=80, n_test=40)
    path = tmp_path / "study.toml"
    path.write_text(text.replace("DATA", str(data)))
    return str(path)


@pytest.mark.parametrize("change, named", [
    (('"mae"]', '"maee"]'), ["'maee'", "supervised, masked_patch, mae"]),
    (("mask_ratio", "mask_ration"), ["'mask_ration'", "mask_ratio"]),
    (('kind = "knn"', 'kind = "knnn"'), ["'knnn'", "knn, fewshot, linear, finetune"]),
    (("k = [5]", "neighbours = [5]"), ["'neighbours'", "valid: k, temperature"]),
    (("flops = 2e9", "flop = 2e9"), ["'flop'", "steps, epochs, images, flops"]),
    (("depth = 1", 'depth = "1"'), ["depth", "whole number"]),
    (("depth = 1", "steps = 5"), ["steps is set by the study"]),
])
def test_a_wrong_study_file_is_refused_naming_the_entry_and_the_valid_ones(tmp_path, change, named):
    with pytest.raises(ConfigError) as err:
        run_study(_write(tmp_path, TINY.replace(*change)), str(tmp_path / "out"))
    assert all(n in str(err.value) for n in named), str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_flop_budget_buys_each_objective_the_steps_its_own_step_costs():
    study = parse_study(TINY)
    allotments = allot(study, train_size=1000, num_classes=10)
    for objective, a in allotments.items():
        per_step = step_flops(study.run_config(objective, 0, 1, "unused"))
        assert a.flops_per_step == per_step
        assert a.steps == int(2e9 // per_step) and a.flops <= 2e9 < a.flops + per_step
    assert allotments["mae"].steps > allotments["supervised"].steps  # MAE encodes a quarter of the patches
    assert steps_for("images", 1000, 64, 1.0, 5000) == 15 and steps_for("epochs", 2, 64, 1.0, 640) == 20


FINETUNE = TINY[:TINY.index("[objective.mae]")].replace('"supervised", "mae"', '"supervised"').replace(
    "seeds = [0, 1]", "seeds = [0]").replace("flops = 2e9", "steps = 1") + """
[[eval]]
kind = "finetune"
steps = 2
batch_size = 8
num_workers = 0
"""


def test_a_study_fine_tunes_every_run_in_its_own_folder(tmp_path):
    records = run_study(_write(tmp_path, FINETUNE), str(tmp_path / "out"))
    assert sorted((r["objective"], r["eval"], r["metric"]) for r in records) == [
        ("baseline", "finetune", "top1"), ("supervised", "finetune", "top1")]
    assert all(0.0 <= r["value"] <= 1.0 for r in records)
    tuned = sorted(str(p.parent.relative_to(tmp_path / "out")) for p in (tmp_path / "out").glob("finetune/*/*/ckpt.pt"))
    assert tuned == [f"finetune/{run}/finetune-paper-{run.replace('-', '_')}-data-steps_2-batch_8"
                     for run in ("baseline-seed0", "supervised-seed0")]  # each run's own folder, with the settings
    with pytest.raises(ConfigError) as err:
        run_study(_write(tmp_path, FINETUNE.replace("steps = 2", "step = 2")), str(tmp_path / "refused"))
    assert "'step'" in str(err.value) and "valid: protocol, steps, batch_size" in str(err.value)
    assert "max_train" not in str(err.value)  # no features are extracted for fine-tuning
    with pytest.raises(ConfigError, match="protocol 'maee': use one of paper, mae"):
        run_study(_write(tmp_path, FINETUNE + 'protocol = "maee"\n'), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    path = _write(folder)
    return folder, path, run_study(path, str(folder / "out"))


def test_a_tiny_study_writes_the_table_records_and_figures(tiny_study):
    folder, _, records = tiny_study
    out = folder / "out"
    assert {r["objective"] for r in records} == {"baseline", "supervised", "mae"}
    assert {(r["eval"], r["metric"]) for r in records} == {("knn", "k5_top1"), ("fewshot", "2shot")}
    assert all({"seed", "data", "value", "steps", "images", "flops"} <= set(r) for r in records)
    assert json.loads((out / "results.json").read_text()) == records
    table = (out / "results.md").read_text()
    assert "| baseline | 2 | 0 |" in table and "**" in table
    assert (out / "results.csv").read_text().count("\n") == len(records) + 1
    assert (out / "final_metrics.png").stat().st_size > 0
    mae = next(r for r in records if r["objective"] == "mae")
    sup = next(r for r in records if r["objective"] == "supervised")
    assert mae["steps"] > sup["steps"] and mae["images"] == 8 * mae["steps"]


def test_a_changed_study_is_refused_naming_the_difference(tiny_study, tmp_path):
    folder, _, _ = tiny_study
    changed = _write(tmp_path, TINY.replace("mask_ratio = 0.75", "mask_ratio = 0.5"))
    with pytest.raises(ConfigError, match=r"objective\.mae\.mask_ratio: 0\.75 -> 0\.5"):
        run_study(changed, str(folder / "out"))


def test_a_killed_study_finishes_with_the_same_results(tiny_study, tmp_path):
    _, path, records = tiny_study
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    study = subprocess.Popen([sys.executable, "-m", "ssl_vit.study", path, "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "runs" / "supervised-seed0" / "config.json"  # the second run has begun
    deadline = time.time() + 120
    while not second.exists() and study.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    study.send_signal(signal.SIGKILL)
    study.wait()
    assert not (out / "results.json").exists(), "the study finished before it could be killed"
    again = run_study(path, str(out))
    key = lambda r: (r["objective"], r["seed"], r["eval"], r["metric"])  # noqa: E731
    assert sorted((key(r), r["value"]) for r in again) == sorted((key(r), r["value"]) for r in records)


def test_rerunning_a_finished_study_trains_and_evaluates_nothing_again(tiny_study):
    folder, path, records = tiny_study
    out = folder / "out"
    done = sorted(out.glob("runs/*/ckpt.pt")) + sorted(out.glob("evals/*/*.json"))
    before = {p: p.stat().st_mtime_ns for p in done}
    assert len(done) == 6 + 6 * 2  # 2 seeds x (baseline + 2 objectives); each x 2 evaluations
    assert run_study(path, str(out)) == records
    assert {p: p.stat().st_mtime_ns for p in done} == before


def test_a_study_under_two_processes_trains_every_run_on_both(tmp_path):
    """Each run goes through the one loop on all processes, one after another (the process group lives
    until the study ends), and the evaluations run once."""
    path = _write(tmp_path, TINY.replace("seeds = [0, 1]", "seeds = [0]").split("[[eval]]")[0]
                  + '[[eval]]\nkind = "knn"\nk = [5]\n')
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", free_port(), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "ssl_vit.study", path, "--out", str(tmp_path / "out")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "3 runs on 2 process(es)" in done.stdout
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["objective"], r["metric"]) for r in records] == [("baseline", "k5_top1"), ("supervised", "k5_top1"),
                                                               ("mae", "k5_top1")]
