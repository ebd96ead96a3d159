"""Evaluation modules: the few-shot ridge solver, weighted kNN, the command lines, fine-tuning."""

import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from conftest import tiny_hybrid, tiny_vit
from ssl_vit.backbone import build_backbone

from ssl_vit.evaluation import features as features_mod
from eval import fewshot as fewshot_mod
from eval import finetune as finetune_mod
from eval import knn as knn_mod
from eval import linear as linear_mod
from eval.common import EvalError, run_cli
from ssl_vit.evaluation import linear as linear_lib
from ssl_vit.evaluation.features import Features
from ssl_vit.evaluation.fewshot import BIAS_CONSTANT, RidgeClassifier, fewshot
from ssl_vit.evaluation.knn import knn_predict
from ssl_vit.evaluation.knn_search import bf16_candidates, screened_topk
from ssl_vit.data import load_data
from ssl_vit.checkpoint import load_checkpoint, objective_state, save_checkpoint
from ssl_vit.objectives import load_objective

FEWSHOT_KEYS = {"checkpoint", "data", "crop_fraction", "shots", "l2", "accuracy", "accuracy_std", "seeds"}
KNN_KEYS = {"checkpoint", "data", "crop_fraction", "k", "temperature", "accuracy"}
SMALL = ["--max-train", "60", "--max-test", "30", "--num-workers", "0"]


def _save(path, backbone):
    save_checkpoint(str(path), backbone, objective="supervised", objective_config={}, train_config={},
                    step=0, data={})
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", tiny_vit())


def _features(train, train_y, test, test_y, classes):
    return Features(train, train_y, test, test_y, classes)


# ----- few-shot ridge regression -----
def _numpy_ridge(x, labels, classes, l2):
    """The textbook solution on the standardised, bias-augmented design matrix."""
    x = x.numpy().astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    x = np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)
    y = 2.0 * np.eye(classes)[labels.numpy()] - 1.0
    return np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ y)


@pytest.mark.parametrize("n", [40, 6])  # more points than dimensions (primal), fewer (dual)
def test_ridge_matches_numpy_solve_and_primal_equals_dual(n):
    g = torch.Generator().manual_seed(n)
    x, labels = torch.randn(n, 12, generator=g), torch.randint(3, (n,), generator=g)
    for l2 in (0.5, 1024.0):
        expected = _numpy_ridge(x, labels, 3, l2)
        primal = RidgeClassifier(x, labels, 3, dual=False).weights(l2).numpy()
        dual = RidgeClassifier(x, labels, 3, dual=True).weights(l2).numpy()
        np.testing.assert_allclose(primal, expected, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(dual, expected, rtol=1e-6, atol=1e-9)
    auto = RidgeClassifier(x, labels, 3)
    assert auto.dual == (n < 13)
    # the folded prediction equals argmax of the design matrix times W
    test = torch.randn(20, 12, generator=g)
    scores = auto.design(test) @ auto.weights(1024.0)
    assert torch.equal(auto.predict(test, 1024.0), scores.argmax(1))


def test_fewshot_separable_features_reach_100_percent():
    g = torch.Generator().manual_seed(0)
    classes, dim = 10, 32
    centres = 5.0 * torch.randn(classes, dim, generator=g)
    train_y, test_y = torch.arange(500) % classes, torch.arange(300) % classes
    feats = _features(centres[train_y] + 0.1 * torch.randn(500, dim, generator=g), train_y,
                      centres[test_y] + 0.1 * torch.randn(300, dim, generator=g), test_y, classes)
    for record in fewshot(feats, shots=(1, 5), seeds=2):
        assert record["accuracy"] == 1.0 and record["accuracy_std"] == 0.0
    (swept,) = fewshot(feats, shots=(5,), seeds=2, l2="sweep", val_size=100)
    assert swept["accuracy"] == 1.0 and len(swept["l2"]) == 2


def test_fewshot_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(1)
    classes = 10
    feats = _features(torch.randn(2000, 64, generator=g), torch.randint(classes, (2000,), generator=g),
                      torch.randn(3000, 64, generator=g), torch.randint(classes, (3000,), generator=g), classes)
    for record in fewshot(feats, shots=(5, 25), seeds=3):
        assert abs(record["accuracy"] - 1 / classes) < 0.03, record


def test_fewshot_more_shots_than_a_class_has():
    labels = torch.tensor([0] * 10 + [1] * 3)
    feats = _features(torch.randn(13, 4), labels, torch.randn(5, 4), torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(EvalError, match="class 1 has 3"):
        fewshot(feats, shots=(5,))


# ----- kNN -----
def _brute_force_knn(train, train_y, test, classes, k, temperature):
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    predictions = []
    for row in test:
        sims = [(float(row @ t), int(y)) for t, y in zip(train, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * classes
        for sim, label in sims[:k]:
            votes[label] += float(np.exp(sim / temperature))
        predictions.append(int(np.argmax(votes)))
    return predictions


def test_knn_matches_brute_force_loop_with_weights():
    g = torch.Generator().manual_seed(0)
    train, train_y = torch.randn(80, 6, generator=g), torch.randint(4, (80,), generator=g)
    test = torch.randn(25, 6, generator=g)
    ks = (1, 5, 20)
    got = knn_predict(train, train_y, test, 4, ks=ks, temperature=0.07, chunk_rows=7)  # several chunks
    for k in ks:
        assert got[k].tolist() == _brute_force_knn(train, train_y, test, 4, k, 0.07)
    # the votes are weighted: one very close neighbour of class 0 outvotes two distant ones of class 1
    train = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.5, -1.0]])
    votes = knn_predict(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05]]), 2, ks=(3,), temperature=0.07)
    assert votes[3].tolist() == [0]
    flat = knn_predict(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05]]), 2, ks=(3,), temperature=1e3)
    assert flat[3].tolist() == [1]  # a huge T makes every vote equal: majority wins


def test_knn_k_larger_than_train_set():
    with pytest.raises(EvalError, match="k = 200"):
        knn_predict(torch.randn(10, 3), torch.zeros(10, dtype=torch.long), torch.randn(2, 3), 1)


# ----- the command lines -----
def _run(module, argv, capsys):
    run_cli(module.main, argv)
    return capsys.readouterr().out


def test_cli_records_cache_and_linear(tiny_ckpt, tmp_path, capsys, monkeypatch):
    cache, out = str(tmp_path / "cache"), tmp_path / "fewshot.json"
    args = [tiny_ckpt, "--data", "default", "--cache-dir", cache, *SMALL]
    table = _run(fewshot_mod, args + ["--shots", "1", "2", "--seeds", "2", "--json", str(out)], capsys)
    assert "shots=1" in table and "shots=2" in table
    records = json.loads(out.read_text())
    assert [set(r) for r in records] == [FEWSHOT_KEYS] * 2
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["seeds"] == 2 and r["l2"] == 1024.0 for r in records)

    # a second call reads the cached features: extraction must not run again
    def no_extraction(*a, **kw):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(features_mod, "extract", no_extraction)
    out = tmp_path / "knn.json"
    _run(knn_mod, args + ["--k", "1", "5", "--json", str(out)], capsys)
    records = json.loads(out.read_text())
    assert [set(r) for r in records] == [KNN_KEYS] * 2 and [r["k"] for r in records] == [1, 5]

    out = tmp_path / "linear.json"
    _run(linear_mod, args + ["--epochs", "3", "--bn", "--json", str(out)], capsys)
    (record,) = json.loads(out.read_text())
    assert {"checkpoint", "data", "accuracy", "epochs"} <= set(record) and record["bn"] is True
    assert record["protocol"] == "cached" and record["crop_fraction"] == 1.0  # 16 px: the exact-size resize
    assert record["epochs"] == 3 and 0.0 <= record["accuracy"] <= 1.0


def test_timm_and_hybrid_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    hybrid = _save(tmp_path / "hybrid.pt", tiny_hybrid())
    out = tmp_path / "knn.json"
    _run(knn_mod, ["timm:test_vit", hybrid, "--data", "default", "--cache-dir", str(tmp_path / "c"),
                   "--k", "3", "--json", str(out), "--max-train", "40", "--max-test", "20", "--num-workers", "0"],
         capsys)
    records = json.loads(out.read_text())
    assert [r["checkpoint"] for r in records] == ["timm:test_vit", hybrid]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)


def test_finetune_at_higher_resolution(tiny_ckpt, tmp_path, capsys):
    """With lr 0 the run keeps what --init loaded: the source's blocks, its position embeddings
    resampled by timm from the 4x4 grid to 8x8, and a zero head (so every prediction is class 0)."""
    out = tmp_path / "ft.json"
    _run(finetune_mod, [tiny_ckpt, "--data", "default", "--img-size", "32", "--steps", "2", "--batch-size", "8",
                        "--lr", "0", "--num-workers", "0", "--out", str(tmp_path / "runs"), "--json", str(out)], capsys)
    (record,) = json.loads(out.read_text())
    assert {"checkpoint", "data", "accuracy", "epochs"} <= set(record)
    assert record["img_size"] == 32 and record["protocol"] == "paper" and record["crop_fraction"] == 1.0
    ckpt = load_checkpoint(f"{record['run']}/ckpt.pt")
    assert ckpt["arch"]["img_size"] == 32 and ckpt["train_config"]["optimizer"] == "momentum"
    source = load_checkpoint(tiny_ckpt)["state_dict"]
    tuned = ckpt["state_dict"]
    expected_pos = resample_abs_pos_embed(source["pos_embed"], new_size=(8, 8), old_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(tuned["pos_embed"], expected_pos, rtol=0, atol=1e-6)
    for k in source:
        if k != "pos_embed":
            assert torch.equal(tuned[k], source[k]), k
    assert all(not v.any() for v in objective_state(ckpt).values())  # the zero-initialised head
    test_labels = torch.tensor(load_data("default").test["label"])
    assert record["accuracy"] == pytest.approx((test_labels == 0).float().mean().item())
    assert load_objective(ckpt).logits(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_mae_finetune_trains_the_sincos_position_embeddings_and_pools_as_mae(tmp_path, capsys):
    """--protocol mae on a checkpoint with fixed sin-cos positions: they load into a trainable
    pos_embed that moves (it got a gradient); patch tokens are averaged then normalised by a fresh
    fc_norm with no final per-token norm (models_vit.py, global_pool); the settings are recorded."""
    torch.manual_seed(0)
    mae = _save(tmp_path / "mae.pt", tiny_vit(pos_embed="sincos"))
    out = tmp_path / "ft.json"
    _run(finetune_mod, [mae, "--data", "default", "--protocol", "mae", "--steps", "2", "--batch-size", "8",
                        "--num-workers", "0", "--out", str(tmp_path / "runs"), "--json", str(out)], capsys)
    (record,) = json.loads(out.read_text())
    assert {k: record[k] for k in ("lr", "lr_ref_batch", "weight_decay", "min_lr", "layer_decay", "drop_path_rate",
                                   "label_smoothing", "mixup", "cutmix", "random_erasing", "head_init_std",
                                   "global_pool", "fc_norm", "pos_embed", "clip_grad")} == {
        "lr": 5e-4, "lr_ref_batch": 256, "weight_decay": 0.05, "min_lr": 1e-6, "layer_decay": 0.65,
        "drop_path_rate": 0.1, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25,
        "head_init_std": 2e-5, "global_pool": "avg", "fc_norm": True, "pos_embed": "learned", "clip_grad": 0.0}
    ckpt = load_checkpoint(f"{record['run']}/ckpt.pt")
    assert ckpt["arch"]["pos_embed"] == "learned" and ckpt["arch"]["fc_norm"] and ckpt["arch"]["global_pool"] == "avg"
    source, tuned = load_checkpoint(mae)["state_dict"], ckpt["state_dict"]
    assert not torch.equal(tuned["pos_embed"][:, 1:], source["pos_embed"][:, 1:])  # trained, from the sin-cos table
    assert (tuned["pos_embed"] - source["pos_embed"]).abs().max() < 1e-3  # ...which it started from
    assert "fc_norm.weight" in tuned and not any(k.startswith("norm.") for k in tuned)


def test_mae_protocol_schedule_and_layer_decay_drop_path_by_width(tiny_ckpt):
    """MAE FINETUNE.md: warmup 5 of 100 epochs (5% of the steps) to blr x batch / 256, cosine to 1e-6;
    layer decay / drop-path 0.65 / 0.1 for ViT-B (and Ti, S), 0.75 / 0.2 for L, 0.75 / 0.3 for H; flags win."""
    from ssl_vit.objectives import DataInfo, get_objective
    from ssl_vit.train.optim import build_optimizer, build_schedule

    def run(spec, *flags):
        args = finetune_mod.build_parser().parse_args([spec, "--protocol", "mae", "--steps", "100", *flags])
        return finetune_mod.build_run(spec, "default", args)

    tc = run(tiny_ckpt, "--batch-size", "512").train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4 * 512 / 256)
    schedule = build_schedule(optimizer, tc)
    lrs = []
    for t in range(1, tc.steps + 2):
        schedule.step_update(t)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:5] == pytest.approx([1e-3 * t / 5 for t in range(1, 6)])  # the peak at 5% of the steps
    assert lrs[-1] == pytest.approx(1e-6) and min(lrs[5:]) == pytest.approx(1e-6)
    sizes = {tiny_ckpt: (0.65, 0.1), "timm:vit_base_patch16_224": (0.65, 0.1),
             "timm:vit_large_patch16_224": (0.75, 0.2), "timm:vit_huge_patch14_224": (0.75, 0.3)}
    for spec, expected in sizes.items():
        r = run(spec)
        assert (r.train.layer_decay, r.backbone.drop_path_rate) == expected, spec
    r = run(tiny_ckpt, "--layer-decay", "0.9", "--drop-path-rate", "0.05")
    assert (r.train.layer_decay, r.backbone.drop_path_rate) == (0.9, 0.05)
    # the decay reaches the optimizer: position embeddings (layer 0 of depth 2) at 0.65^3, the head at 1
    r = run(tiny_ckpt)
    objective = get_objective("supervised")(build_backbone(r.backbone), r.objective_config,
                                            DataInfo("default", 10, None, (0.5,) * 3, (0.5,) * 3, 16))
    scales = {id(p): g["lr_scale"] for g in build_optimizer(objective, r.train, fused=False).param_groups
              for p in g["params"]}
    assert scales[id(objective.backbone.vit.pos_embed)] == pytest.approx(0.65 ** 3)
    assert scales[id(objective.head[-1].weight)] == 1.0


def test_mae_head_starts_with_tiny_random_weights_and_zero_bias():
    """main_finetune.py: trunc_normal_(head.weight, std=2e-5); the bias stays at timm's 0."""
    from ssl_vit.objectives import DataInfo
    from ssl_vit.objectives.supervised import Supervised, SupervisedConfig

    torch.manual_seed(0)
    head = Supervised(tiny_vit(), SupervisedConfig(head_init_std=2e-5),
                      DataInfo("default", 10, None, (0.5,) * 3, (0.5,) * 3, 16)).head[-1]
    assert not head.bias.any() and head.weight.std().item() == pytest.approx(2e-5, rel=0.1)


def test_linear_probe_learns_separable_features():
    g = torch.Generator().manual_seed(1)  # not the probe's seed 0: its initial head would equal 0.01 x the centres
    classes, dim = 4, 16
    centres = torch.randn(classes, dim, generator=g)
    train_y, test_y = torch.arange(400) % classes, torch.arange(200) % classes
    feats = _features(centres[train_y] + 0.3 * torch.randn(400, dim, generator=g), train_y,
                      centres[test_y] + 0.3 * torch.randn(200, dim, generator=g), test_y, classes)
    for bn in (False, True):
        assert linear_lib.linear_probe(feats, linear_lib.ProbeSettings(epochs=10, bn=bn))["accuracy"] > 0.95


# ----- bad input -----
def _error(module, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, argv)
    err = capsys.readouterr().err  # progress bars, then the message
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(r"(^|\n)error: ", err)
    return err


def test_bad_inputs(tiny_ckpt, tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path / "c"), *SMALL]
    assert f"{tmp_path / 'missing.pt'} does not exist" in _error(knn_mod, [str(tmp_path / "missing.pt"), *cache], capsys)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert f"{text} is not a readable ssl_vit checkpoint" in _error(fewshot_mod, [str(text), *cache], capsys)
    err = _error(fewshot_mod, [tiny_ckpt, "--shots", "20", *cache], capsys)  # 60 images of 10 classes
    assert re.search(r"20-shot needs 20 training images per class, but class \d+ has \d+", err)

    import datasets
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    rows = {"image": [{"bytes": buf.getvalue(), "path": None}] * 4}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "unlabelled.parquet"))
    unlabelled = [tiny_ckpt, "--data", str(tmp_path / "unlabelled.parquet")]
    assert "evaluation needs labels" in _error(knn_mod, unlabelled + cache, capsys)
    assert "evaluation needs labels" in _error(finetune_mod, unlabelled + ["--out", str(tmp_path)], capsys)


@pytest.mark.parametrize("flags, message", [
    (["--warmup-fraction", "1.5"], "--warmup-fraction 1.5: use a fraction of the steps in [0, 1)"),
    (["--layer-decay", "0"], "--layer-decay 0.0: use a value in (0, 1]"),
    (["--random-erasing", "2"], "--random-erasing 2.0: use a probability in [0, 1]"),
    (["--head-init-std", "-1"], "--head-init-std -1.0: must be >= 0"),
    (["--global-pool", "max"], "--global-pool 'max': use 'token' or 'avg'"),
])
def test_bad_finetune_settings_are_one_line(tiny_ckpt, tmp_path, capsys, flags, message):
    err = _error(finetune_mod, [tiny_ckpt, "--protocol", "mae", *flags, "--out", str(tmp_path)], capsys)
    assert message in err and not any(tmp_path.iterdir())  # refused before any folder is written


@pytest.mark.parametrize("margin", [16, 0])  # 0: no row can be proven, every row takes the float32 path
def test_screened_topk_equals_float32_search(margin):
    g = torch.Generator().manual_seed(margin)
    centres = torch.randn(5, 48, generator=g)
    train = F.normalize(centres[torch.randint(5, (3000,), generator=g)] + torch.randn(3000, 48, generator=g), dim=1)
    test = F.normalize(torch.randn(40, 48, generator=g), dim=1)
    train_bf16 = train.bfloat16()
    lo = (train - train_bf16.float()).norm(dim=1).max().item()
    values, indices = screened_topk(test, train, train_bf16, lo, 10, margin)
    expected_values, expected_indices = (test @ train.T).topk(10, dim=1)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-6)
    assert torch.equal(indices.sort(1).values, expected_indices.sort(1).values)
    labels = torch.randint(5, (3000,), generator=g)
    screened = knn_predict(train, labels, test, 5, ks=(5, 10), screen=True)
    plain = knn_predict(train, labels, test, 5, ks=(5, 10), screen=False)
    assert all(torch.equal(screened[k], plain[k]) for k in (5, 10))


def test_bf16_candidates_are_the_largest_entries_or_flagged():
    g = torch.Generator().manual_seed(0)
    approx = torch.randn(30, 5000, generator=g).bfloat16()
    approx[:10] = -approx[:10].abs()  # rows of negative similarities only: int16 order is not float order
    approx[10, :7] = 0.5  # fewer than c non-negative entries: cannot be certain
    approx[10, 7:] = -approx[10, 7:].abs()
    values, indices, certain = bf16_candidates(approx, 12)
    assert certain.tolist() == [False] * 11 + [True] * 19
    expected = approx.topk(12, dim=1).values
    assert torch.equal(values[certain], expected[certain])
    assert torch.equal(approx.gather(1, indices)[certain], expected[certain])
