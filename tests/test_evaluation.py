"""The evaluators as library code (``ssl_vit.evaluation``): the same numbers as the command lines."""

import json

import pytest
import torch

from conftest import tiny_vit
from eval import fewshot as fewshot_cli
from eval import knn as knn_cli
from eval import linear as linear_cli
from eval.common import run_cli
from ssl_vit.checkpoint import load_backbone, save_checkpoint
from ssl_vit.evaluation.features import backbone_features
from ssl_vit.evaluation.fewshot import fewshot
from ssl_vit.evaluation.knn import knn
from ssl_vit.evaluation.linear import ProbeSettings, linear_probe

SUBSET = dict(max_train=60, max_test=30)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    save_checkpoint(path, tiny_vit(), objective="supervised", objective_config={}, train_config={}, step=0, data={})
    return path


def _cli(module, ckpt, tmp_path, *flags):
    out = tmp_path / f"{module.__name__}.json"
    run_cli(module.main, [ckpt, "--data", "default", "--cache-dir", str(tmp_path / "cache"), "--max-train", "60",
                          "--max-test", "30", "--num-workers", "0", "--json", str(out), *flags])
    return json.loads(out.read_text())


def test_library_evaluators_give_the_command_lines_numbers(tiny_ckpt, tmp_path, capsys):
    backbone, info = load_backbone(tiny_ckpt)
    backbone.train()  # as a backbone is during training: the evaluation must switch to eval mode and back
    feats = backbone_features(backbone, "default", data_stats=info.get("data"), num_workers=0, **SUBSET)
    assert backbone.training
    knn_lib = knn(feats, ks=(1, 5))
    knn_cmd = _cli(knn_cli, tiny_ckpt, tmp_path, "--k", "1", "5")
    assert [r["accuracy"] for r in knn_lib] == [r["accuracy"] for r in knn_cmd]
    few_lib = fewshot(feats, shots=(1, 2), seeds=2)
    few_cmd = _cli(fewshot_cli, tiny_ckpt, tmp_path, "--shots", "1", "2", "--seeds", "2")
    assert [(r["accuracy"], r["accuracy_std"]) for r in few_lib] == [(r["accuracy"], r["accuracy_std"])
                                                                      for r in few_cmd]
    lin_lib = linear_probe(feats, ProbeSettings(epochs=3))
    (lin_cmd,) = _cli(linear_cli, tiny_ckpt, tmp_path, "--epochs", "3")
    assert lin_lib["accuracy"] == lin_cmd["accuracy"]
