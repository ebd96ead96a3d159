"""The lines a run ends with: the objective's own metric against its trivial baseline, the checkpoint,
and evaluation commands that run as printed."""

import json
import shlex

import pytest
import torch

from conftest import tiny_vit
from eval import knn as knn_mod
from ssl_vit.checkpoint import load_checkpoint
from ssl_vit.data import MEAN, STD
from ssl_vit.objectives import DataInfo
from ssl_vit.objectives.mae import MAE, MAEConfig
from ssl_vit.train import run_recipe

TINY = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "8",
        "--num-workers", "0", "--steps", "2", "--log-every", "1"]


def _last_record(run) -> dict:
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return [r for r in lines if "loss" in r][-1]


def test_masked_patch_run_ends_with_its_colour_accuracy_the_checkpoint_and_a_knn_command_that_runs(tmp_path, capsys):
    path = run_recipe("masked_patch", argv=[*TINY, "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out.splitlines()
    last = _last_record(tmp_path / "run")
    assert (f"masked patch: colour accuracy {last['color_accuracy']:.3f} on the corrupted patches against "
            f"{last['baseline_accuracy']:.3f} for guessing each batch's most frequent colour") in out[-4]
    assert out[-3] == f"checkpoint: {path}"
    command = shlex.split(out[-2].removeprefix("next: ").split("   (")[0])
    assert command[:3] == ["python", "-m", "eval.knn"] and command[3] == path
    records = knn_mod.main([*command[3:], "--cache-dir", str(tmp_path / "c"), "--max-train", "40", "--max-test", "20",
                            "--k", "5"])
    assert records[0]["checkpoint"] == path and records[0]["data"] == "default"


def test_supervised_run_ends_with_test_accuracy_against_chance(tmp_path, capsys):
    path = run_recipe("supervised", argv=[*TINY, "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    accuracy = load_checkpoint(path)["results"]["test_accuracy"]
    assert f"supervised: test accuracy {accuracy:.3f} against 0.100 for guessing among 10 classes" in out


def test_unlabelled_data_points_the_knn_command_at_labelled_data(tmp_path, capsys):
    from PIL import Image

    for i in range(12):
        Image.new("RGB", (12, 12), (20 * i, 3 * i, 100)).save(tmp_path / f"{i}.png")
    path = run_recipe("mae", argv=[*TINY, "--data", str(tmp_path), "--decoder-dim", "32", "--decoder-depth", "1",
                                   "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert f"python -m eval.knn {path} --data LABELLED_DATA   ({tmp_path} has no labels" in out
    last = _last_record(tmp_path / "run")
    assert f"MAE: reconstruction loss {last['loss']:.4f} on the masked patches against {last['patch_mean_loss']:.4f}" in out


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_patch_mean_loss_is_the_loss_of_filling_each_patch_with_its_mean(norm_pix_loss):
    """c +- a as a checkerboard in every 4x4 patch: each patch's biased variance is a^2 (n = 48 values
    per patch), so predicting the mean costs a^2, or (n - 1) / n with per-patch normalised targets."""
    backbone = tiny_vit()
    mae = MAE(backbone, MAEConfig(norm_pix_loss=norm_pix_loss), DataInfo("t", None, None, MEAN, STD, 16))
    c, a, size = 0.3, 0.7, backbone.cfg.img_size
    board = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 * 2.0 - 1.0  # +-1, half of each per patch
    images = (c + a * board).expand(2, 3, size, size).clone()
    _, metrics = mae({"image": images})
    expected = 47 / 48 if norm_pix_loss else a * a
    assert metrics["patch_mean_loss"].item() == pytest.approx(expected, rel=1e-4)
