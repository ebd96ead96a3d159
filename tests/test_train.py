"""The one training loop, through the supervised recipe: runs, learns, resumes exactly, stops on NaN."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_vit
from ssl_vit.checkpoint import load_backbone, load_checkpoint
from ssl_vit.data import MEAN, STD, EpochSampler, ImageDataset, load_data, make_loader, train_transform
from ssl_vit.objectives import DataInfo
from ssl_vit.objectives.supervised import Supervised, SupervisedConfig
from ssl_vit.train import NonFiniteError, run_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "16",
        "--num-workers", "0", "--log-every", "2"]


def _recipe(out, *extra):
    return run_recipe("supervised", {}, argv=[*TINY, "--out", str(out), *extra])


def test_recipe_end_to_end(tmp_path):
    path = _recipe(tmp_path / "run", "--steps", "4", "--save-every", "0")  # 0: state at the end only
    assert (tmp_path / "run" / "state" / "latest").exists()
    ckpt = torch.load(path, weights_only=True)  # plain tensors and values only
    assert ckpt["step"] == 4 and ckpt["objective"] == "supervised"
    assert 0.0 <= ckpt["results"]["test_accuracy"] <= 1.0
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert {"step", "loss", "lr", "images_per_s"} <= set(records[0])
    assert json.load(open(tmp_path / "run" / "config.json"))["backbone"]["depth"] == 1
    backbone, info = load_backbone(path)
    assert backbone(torch.randn(1, 3, 16, 16)).shape == (1, 192)


@pytest.mark.parametrize("bad, name", [(["--log-every", "0"], "--log-every"), (["--save-every", "-1"], "--save-every"),
                                       (["--lr-scaling", "cube"], "--lr-scaling")])
def test_bad_loop_settings_are_refused_by_name(tmp_path, bad, name):
    with pytest.raises(ValueError, match=name):
        _recipe(tmp_path / "run", "--steps", "1", *bad)


def test_steps_zero_writes_the_random_init_checkpoint(tmp_path):
    path = _recipe(tmp_path / "run", "--steps", "0")
    assert load_checkpoint(path)["step"] == 0


def test_loss_goes_down_on_a_fixed_batch():
    torch.manual_seed(0)
    src = load_data("default")
    ds = ImageDataset(src.train, src.image_column, src.label_column, train_transform(16))
    batch = next(iter(make_loader(ds, EpochSampler(len(ds), 32), 0, False)))
    objective = Supervised(tiny_vit(), SupervisedConfig(), DataInfo("default", 10, None, MEAN, STD, 16))
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss, _ = objective(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    a = load_checkpoint(_recipe(tmp_path / "a", "--steps", "2"))["state_dict"]
    b = load_checkpoint(_recipe(tmp_path / "b", "--steps", "2", "--grad-accum", "2"))["state_dict"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_changed_settings_refuse_to_resume(tmp_path):
    _recipe(tmp_path / "run", "--steps", "0")
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.5"):
        _recipe(tmp_path / "run", "--steps", "0", "--lr", "0.5")


def _poison_call(monkeypatch, call: int) -> None:
    """Make the supervised loss NaN on the given forward call (1-based)."""
    forward, calls = Supervised.forward, {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss, metrics = forward(self, batch)
        return (loss * float("nan") if calls["n"] == call else loss), metrics

    monkeypatch.setattr(Supervised, "forward", poisoned)


def test_nonfinite_loss_stops_before_anything_is_saved(tmp_path, monkeypatch):
    _poison_call(monkeypatch, 3)
    with pytest.raises(NonFiniteError, match="step 2.*Last good state: .*step-2"):
        _recipe(tmp_path / "run", "--steps", "6", "--save-every", "2")
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_nonfinite_step_can_be_skipped_and_counted(tmp_path, monkeypatch, capsys):
    _poison_call(monkeypatch, 2)
    path = _recipe(tmp_path / "run", "--steps", "4", "--on-nonfinite", "skip")
    assert load_checkpoint(path)["step"] == 4
    assert "skipped 1 steps with a non-finite loss" in capsys.readouterr().out


def _cli(out, steps=40, save_every=5):
    return [sys.executable, str(ROOT / "recipes" / "supervised.py"), "--model", "vit_tiny", "--depth", "2",
            "--patch-size", "4", "--img-size", "32", "--batch-size", "32", "--num-workers", "1",
            "--steps", str(steps), "--save-every", str(save_every), "--out", str(out)]


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(tmp_path / "whole"), check=True, env=env, capture_output=True)
    killed = subprocess.Popen(_cli(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "state" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "ckpt.pt").exists(), "the run finished before it could be killed"
    done = subprocess.run(_cli(tmp_path / "killed"), check=True, env=env, capture_output=True, text=True)
    assert "resuming" in done.stdout + done.stderr
    a = load_checkpoint(str(tmp_path / "whole" / "ckpt.pt"))["state_dict"]
    b = load_checkpoint(str(tmp_path / "killed" / "ckpt.pt"))["state_dict"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_two_process_cpu_run_writes_one_checkpoint(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--cpu", str(ROOT / "recipes" / "supervised.py"), *TINY,
           "--steps", "3", "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))["step"] == 3
    assert result.stdout.count("checkpoint:") == 1


def test_stop_at_writes_a_checkpoint_and_the_run_continues_the_same(tmp_path):
    early = load_checkpoint(_recipe(tmp_path / "run", "--steps", "6", "--stop-at", "2"))
    assert early["step"] == 2
    resumed = load_checkpoint(_recipe(tmp_path / "run", "--steps", "6"))["state_dict"]
    whole = load_checkpoint(_recipe(tmp_path / "whole", "--steps", "6"))["state_dict"]
    for k in whole:
        assert torch.allclose(whole[k], resumed[k], atol=1e-6), k


def test_curves_png_from_metrics_and_clear_error_for_unknown_metric(tmp_path):
    from ssl_vit.viz.curves import plot_curves

    run = tmp_path / "dino-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"objective": "dino", "objective_config": {"out_dim": 64}}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "epoch": 0, "loss": 4.0 - s / 10, "teacher_entropy": 3.9}) + "\n" for s in (10, 20, 30)))
    out = plot_curves([str(run)], str(tmp_path / "curves.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no run logged \\['accuracy'\\]"):
        plot_curves([str(run)], str(tmp_path / "x.png"), keys=["accuracy"])
    with pytest.raises(SystemExit, match="does not exist"):
        plot_curves([str(tmp_path / "missing")], str(tmp_path / "x.png"))
