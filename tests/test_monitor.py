"""Online monitors during pretraining (``--monitor``): logged at their steps, the numbers of the
``eval`` commands, label-free RankMe, a clear refusal without labels, measured once under two processes
(a sharded objective's monitors: ``fsdp_run.py``)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import launch_processes, tiny_vit
from eval import knn as knn_cli
from ssl_vit.checkpoint import load_checkpoint
from ssl_vit.config import TrainConfig
from ssl_vit.data import MEAN, STD, load_data
from ssl_vit.errors import ConfigError
from ssl_vit.evaluation import monitor as monitor_mod
from ssl_vit.evaluation.monitor import MonitorImages, Monitors
from ssl_vit.evaluation.rankme import rankme
from ssl_vit.objectives import DataInfo
from ssl_vit.train import run_recipe
from ssl_vit.viz.curves import curve_keys, plot_curves

TINY = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "16",
        "--num-workers", "0", "--log-every", "2", "--report-to", "none"]
SUBSETS = ["--monitor-max-train", "200", "--monitor-max-test", "100"]


def _records(run) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def _monitored(records) -> list[dict]:
    return [r for r in records if any(k.startswith("monitor_") for k in r)]


def test_a_monitored_run_logs_its_keys_at_their_steps_with_eval_knns_number_and_the_same_weights(tmp_path, capsys):
    argv = [*TINY, "--steps", "5", "--monitor-every", "2", *SUBSETS]
    path = run_recipe("supervised", {}, argv=[*argv, "--monitor", "knn,rankme", "--out", str(tmp_path / "mon")])
    monitored = _monitored(_records(tmp_path / "mon"))
    assert [r["step"] for r in monitored] == [2, 4, 5]  # every 2 steps and the last
    assert all(set(r) == {"step", "monitor_knn_top1", "monitor_rankme"} for r in monitored)
    assert all(0 <= r["monitor_knn_top1"] <= 1 and 1 <= r["monitor_rankme"] <= 192 for r in monitored)
    # the last measurement is eval.knn's k = 20 on ckpt.pt with the same subsets
    (record,) = knn_cli.main([path, "--k", "20", "--max-train", "200", "--max-test", "100", "--num-workers", "0",
                              "--cache-dir", str(tmp_path / "cache")])
    assert monitored[-1]["monitor_knn_top1"] == record["accuracy"]
    # the curves PNG shows them by default
    assert {"loss", "monitor_knn_top1", "monitor_rankme"} <= set(curve_keys(_records(tmp_path / "mon")))
    assert plot_curves([str(tmp_path / "mon")], str(tmp_path / "curves.png")).endswith("curves.png")
    # monitoring reads the weights and never changes them (nor the random numbers the training draws)
    plain = run_recipe("supervised", {}, argv=[*argv, "--out", str(tmp_path / "plain")])
    assert not _monitored(_records(tmp_path / "plain"))
    a, b = load_checkpoint(path)["state_dict"], load_checkpoint(plain)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_monitored_run_decodes_with_the_runs_resolved_workers(tmp_path):
    """--num-workers auto (the default) reaches the monitor's decoding as a count."""
    argv = [*TINY, "--num-workers", "auto", "--steps", "1", "--monitor", "rankme", *SUBSETS]
    run_recipe("supervised", {}, argv=[*argv, "--out", str(tmp_path / "run")])
    assert [r["step"] for r in _monitored(_records(tmp_path / "run"))] == [1]


def test_a_resumed_run_may_switch_the_monitors_on(tmp_path, capsys):
    argv = [*TINY, "--steps", "4", "--out", str(tmp_path / "run")]
    run_recipe("supervised", {}, argv=[*argv, "--stop-at", "2"])
    run_recipe("supervised", {}, argv=[*argv, "--monitor", "rankme", "--monitor-every", "2", *SUBSETS])
    assert "resuming" in capsys.readouterr().out
    assert [r["step"] for r in _monitored(_records(tmp_path / "run"))] == [4]


def test_rankme_of_known_matrices():
    q, _ = torch.linalg.qr(torch.randn(50, 8, dtype=torch.float64))  # orthonormal columns: full rank, 8
    assert rankme(q) == pytest.approx(8.0, rel=1e-5)
    assert rankme(torch.randn(50, 1) @ torch.randn(1, 8)) == pytest.approx(1.0, abs=1e-4)  # rank one
    # singular values 3 and 1: p = (3/4, 1/4) (+1e-7), exp(entropy) by hand
    p = [0.75 + 1e-7, 0.25 + 1e-7]
    assert rankme(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))


def test_the_monitor_measures_the_exported_backbone_in_eval_mode_and_gives_it_back_in_train_mode(monkeypatch):
    teacher, student = tiny_vit(), tiny_vit()
    teacher.train()
    objective = SimpleNamespace(backbone=student, export_backbone=lambda: teacher)  # as DINO: ckpt.pt holds the teacher
    seen, embed = [], monitor_mod.embed
    monkeypatch.setattr(monitor_mod, "embed", lambda b, x, f: seen.append((b, b.training)) or embed(b, x, f))
    images = MonitorImages(torch.randn(30, 3, 16, 16), torch.arange(30) % 3, torch.randn(9, 3, 16, 16),
                           torch.arange(9) % 3, 3)
    acc = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    results = Monitors(("knn", "rankme"), 2, acc, images)(2, 10, objective)
    assert set(results) == {"monitor_knn_top1", "monitor_rankme"}
    assert seen == [(teacher, False), (teacher, False)] and teacher.training
    assert Monitors(("knn",), 2, acc, images)(3, 10, objective) is None  # not due: step 3 of 10


def test_unlabelled_data_gets_rankme_and_a_clear_refusal_for_knn(tmp_path):
    src = load_data("default")
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    src.train.select(range(64)).remove_columns([src.label_column]).to_parquet(str(folder / "train.parquet"))
    argv = [*TINY, "--data", str(folder), "--steps", "2", "--monitor-every", "2", *SUBSETS]
    with pytest.raises(ConfigError, match="--monitor knn needs labels and .* has none; pass --monitor-data"):
        run_recipe("masked_patch", {}, argv=[*argv, "--monitor", "knn,rankme", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    run_recipe("masked_patch", {}, argv=[*argv, "--monitor", "rankme", "--out", str(tmp_path / "run")])
    (record,) = _monitored(_records(tmp_path / "run"))
    assert record["step"] == 2 and set(record) == {"step", "monitor_rankme"}


def test_unknown_monitors_and_too_small_subsets_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="--monitor knn,top5: unknown monitor 'top5'; use one of knn, fewshot"):
        run_recipe("supervised", {}, argv=[*TINY, "--monitor", "knn,top5", "--out", str(tmp_path / "a")])
    with pytest.raises(ConfigError, match="10 shots need 10 training images per class .* raise --monitor-max-train"):
        run_recipe("supervised", {}, argv=[*TINY, "--monitor", "fewshot", "--monitor-max-train", "30",
                                           "--out", str(tmp_path / "b")])


def test_under_fsdp_every_process_decodes_the_monitor_images_and_under_ddp_the_main_one():
    from accelerate.utils import DistributedType

    tc, info = TrainConfig(monitor="rankme", monitor_max_train=24), DataInfo("default", 10, None, MEAN, STD, 16)
    for kind, main, decoded in [(DistributedType.FSDP, False, True), (DistributedType.MULTI_CPU, False, False),
                                (DistributedType.MULTI_CPU, True, True)]:
        acc = SimpleNamespace(distributed_type=kind, is_main_process=main)
        images = Monitors.build(tc, load_data("default"), info, acc).images
        assert (images is not None) == decoded, (kind, main)
    assert images.train.shape == (24, 3, 16, 16)


def test_two_processes_log_each_monitor_once_with_one_processs_numbers(tmp_path):
    argv = [*TINY, "--steps", "2", "--monitor", "knn,rankme", "--monitor-every", "2", *SUBSETS, "--optimizer", "sgd",
            "--lr", "0.05"]
    launch_processes(2, [{"objective": "supervised", "argv": [*argv, "--out", str(tmp_path / "two")]}])
    run_recipe("supervised", None, argv=[*argv, "--out", str(tmp_path / "one")])  # the recipe's defaults, as there
    (two,), (one,) = _monitored(_records(tmp_path / "two")), _monitored(_records(tmp_path / "one"))
    assert two["step"] == 2 and two.keys() == one.keys()
    assert two["monitor_rankme"] == pytest.approx(one["monitor_rankme"], rel=1e-3)
