"""The one training loop, through the supervised recipe: runs, learns, resumes exactly, stops on NaN."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import fit, small_digits, tiny_vit
from ssl_vit.checkpoint import load_backbone, load_checkpoint, objective_state
from ssl_vit.data import MEAN, STD, EpochSampler, ImageDataset, load_data, make_loader, train_transform
from ssl_vit.config import parse_run_config
from ssl_vit.errors import ConfigError
from ssl_vit.backbone import build_backbone
from ssl_vit.objectives import DataInfo, StepInfo, get_objective, load_objective
from ssl_vit.objectives.dino import DINO
from ssl_vit.objectives.supervised import Supervised, SupervisedConfig
from ssl_vit.errors import UserError
from ssl_vit.train import NonFiniteError, run_recipe
from ssl_vit.train.optim import build_optimizer
from ssl_vit.train.step import optimizer_step

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
    records = _records(tmp_path / "run")
    assert {"step", "loss", "lr", "images_per_s"} <= set(records[0])
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["backbone"]["depth"] == 1
    assert config["train"]["precision"] == "no"  # --precision auto, resolved on a CPU (float32) and saved so
    backbone, info = load_backbone(path)
    assert backbone(torch.randn(1, 3, 16, 16)).shape == (1, 192)


def test_precision_auto_picks_bf16_on_a_gpu_and_float32_elsewhere_and_fp16_needs_a_gpu(tmp_path, monkeypatch):
    from ssl_vit.train.launch import resolve_precision, training_device

    assert resolve_precision("auto", "cpu") == "no" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("no", "cuda") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert resolve_precision("auto", "cuda") == "no" and resolve_precision("fp16", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert training_device() == "cpu"
    with pytest.raises(ConfigError, match="--precision fp16 needs a GPU"):
        _recipe(tmp_path / "run", "--steps", "1", "--precision", "fp16")
    assert not (tmp_path / "run").exists()


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
    losses, _ = fit(objective, batch, torch.optim.AdamW(objective.parameters(), lr=1e-3), 25)
    assert losses[-1] < 0.5 * losses[0]


def _state_dicts(ckpt: dict) -> dict:
    """Every trained tensor of a checkpoint: the backbone's and the objective's own."""
    return {**{f"backbone.{k}": v for k, v in ckpt["state_dict"].items()},
            **{f"objective.{k}": v for k, v in objective_state(ckpt).items()}}


def assert_same_weights(actual: dict, expected: dict, rtol: float = 0.0, atol: float = 1e-6) -> None:
    """Two checkpoints hold the same backbone and objective tensors."""
    a, e = _state_dicts(actual), _state_dicts(expected)
    assert a.keys() == e.keys()
    for k in e:
        torch.testing.assert_close(a[k], e[k], rtol=rtol, atol=atol, msg=k)


# Plain SGD updates in proportion to the gradient (AdamW's first steps barely depend on its scale,
# and clipping would equalise two runs), so the runs below differ if the gradients do.
SGD = ["--optimizer", "sgd", "--clip-grad", "0", "--weight-decay", "0", "--warmup-steps", "0", "--lr", "0.05"]


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    a = load_checkpoint(_recipe(tmp_path / "a", "--steps", "3", *SGD))
    b = load_checkpoint(_recipe(tmp_path / "b", "--steps", "3", "--grad-accum", "2", *SGD))
    assert_same_weights(b, a, rtol=1e-4)




@pytest.mark.parametrize("objective, tokens_decay", [("supervised", False), ("masked_patch", False),
                                                     ("mae", True), ("dino", True)])
def test_each_objective_decays_the_class_token_as_its_reference_does(objective, tokens_decay):
    """DINO (``get_params_groups``) and MAE (``add_weight_decay``) decay every parameter with more
    than one dimension, the class token included; supervised and masked patch follow timm, which
    spares it. Biases never decay."""
    cls = get_objective(objective)
    run = parse_run_config(objective, cls.Config, cls.recipe_defaults, argv=[*TINY, "--out-dim", "8"]
                           if objective == "dino" else TINY)
    model = cls(build_backbone(run.backbone), run.objective_config, DataInfo("x", 10, None, MEAN, STD, 16))
    decay = {id(p): group["weight_decay"] for group in build_optimizer(model, run.train).param_groups
             for p in group["params"]}
    vit = model.backbone.vit
    assert (decay[id(vit.cls_token)] > 0) == tokens_decay
    assert decay[id(vit.blocks[0].attn.qkv.bias)] == 0 and decay[id(vit.blocks[0].attn.qkv.weight)] > 0


@pytest.mark.parametrize("objective", ["supervised", "masked_patch", "mae", "dino"])
def test_a_run_through_the_trainer_changes_the_weights(tmp_path, objective):
    extra = ["--out-dim", "32", "--hidden-dim", "32", "--bottleneck-dim", "16", "--local-crops-number", "2",
             "--local-crop-size", "8", "--momentum-teacher", "0.9"] if objective == "dino" else []

    def run(out: str, steps: int) -> str:
        return run_recipe(objective, {}, argv=[*TINY, *extra, "--steps", str(steps), "--out", str(tmp_path / out)])

    start, path = _state_dicts(load_checkpoint(run("init", 0))), run("trained", 3)
    trained = _state_dicts(load_checkpoint(path))
    assert start.keys() == trained.keys()
    assert all(torch.isfinite(v).all() for v in trained.values())
    changed = [k for k in start if not torch.equal(start[k], trained[k])]
    assert any(k.startswith("backbone.blocks.0.") for k in changed), changed
    rebuilt = load_objective(path)  # the whole objective comes back from ckpt.pt
    assert all(torch.equal(v, trained[f"objective.{k}"]) for k, v in rebuilt.objective_state().items())


def test_learning_rate_warms_up_then_follows_a_cosine(tmp_path):
    _recipe(tmp_path / "run", "--steps", "10", "--warmup-steps", "3", "--lr", "0.01", "--min-lr", "0.001",
            "--log-every", "1")
    # step t (1-based) trains at lr * t / 3 up to the peak at t = 3, then half a cosine over the
    # remaining steps towards min_lr (reached one step after the last)
    expected = [0.01 * t / 3 if t <= 3 else 0.001 + 0.009 * (1 + math.cos(math.pi * (t - 3) / 8)) / 2
                for t in range(1, 11)]
    steps, lrs = zip(*[(r["step"], r["lr"]) for r in _records(tmp_path / "run") if "lr" in r])
    assert steps == tuple(range(1, 11))
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_gradient_clipping_bounds_the_update(tmp_path):
    """One SGD step (timm's: Nesterov momentum 0.9, so the first update is lr x 1.9 x gradient)
    with the global gradient norm clipped to 0.01 moves the weights by exactly lr x 1.9 x 0.01."""
    clip = 0.01
    start = _state_dicts(load_checkpoint(_recipe(tmp_path / "init", "--steps", "0")))
    sgd = list(SGD)
    sgd[sgd.index("--clip-grad") + 1] = str(clip)
    after = _state_dicts(load_checkpoint(_recipe(tmp_path / "run", "--steps", "1", "--log-every", "1", *sgd)))
    (record,) = [r for r in _records(tmp_path / "run") if "grad_norm" in r]
    assert record["grad_norm"] > 10 * clip  # the gradient was clipped
    moved = torch.stack([(after[k] - start[k]).norm() for k in start]).norm().item()
    assert moved == pytest.approx(record["lr"] * 1.9 * clip, rel=1e-3)


def test_per_parameter_clipping_leaves_small_gradients_and_clips_large_ones():
    """DINO's mode: a gradient of norm 1.7 is untouched, one of norm 8 scaled to 3.0 (the global
    mode would scale both, by 3 / 8.2)."""
    small, large = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, 4))
    model = torch.nn.ParameterList([small, large])
    hooks = SimpleNamespace(start_step=lambda *_: None, before_optimizer_step=lambda _: None,
                            end_step=lambda _: None)
    loss = lambda batch: ((small * 1.0).sum() + (large * 2.0).sum(), {})  # gradients 1 (norm 1.7) and 2 (norm 8)
    optimizer_step(Accelerator(cpu=True), model, hooks, torch.optim.SGD(model.parameters(), lr=1.0),
                   [{"image": torch.zeros(1)}], StepInfo(0, 1, 0, 1), 3.0, "per_param", forward=loss)
    assert torch.allclose(small.detach(), torch.full((3,), -1.0))
    assert large.detach().norm().item() == pytest.approx(3.0, rel=1e-5)
    assert parse_run_config("dino", DINO.Config, DINO.recipe_defaults, argv=[]).train.clip_grad_mode == "per_param"


def test_changed_settings_refuse_to_resume(tmp_path):
    _recipe(tmp_path / "run", "--steps", "0")
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.5"):
        _recipe(tmp_path / "run", "--steps", "0", "--lr", "0.5")


def test_a_run_folder_from_before_a_setting_existed_resumes_at_the_value_it_ran_with(tmp_path):
    _recipe(tmp_path / "run", "--steps", "2", "--stop-at", "1")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    for added in ("clip_grad_mode", "random_erasing"):  # as written before these settings existed
        del config["train"][added]
    del config["objective_config"]["head_init_std"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"clip_grad_mode: 'norm' -> 'per_param'"):
        _recipe(tmp_path / "run", "--steps", "2", "--clip-grad-mode", "per_param")
    assert load_checkpoint(_recipe(tmp_path / "run", "--steps", "2"))["step"] == 2


def _poison_call(monkeypatch, call: int) -> None:
    """Make the supervised loss NaN on the given forward call (1-based)."""
    forward, calls = Supervised.forward, {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss, metrics = forward(self, batch)
        return (loss * float("nan") if calls["n"] == call else loss), metrics

    monkeypatch.setattr(Supervised, "forward", poisoned)


def _saved_state(run) -> tuple[int, dict]:
    """(step, model weights) of a run folder's latest saved training state."""
    latest = run / "state" / (run / "state" / "latest").read_text().strip()
    return json.loads((latest / "progress.json").read_text())["step"], load_file(str(latest / "model.safetensors"))


def test_nonfinite_loss_stops_before_anything_is_saved(tmp_path, monkeypatch):
    """The host reads the finite flags before every save, not only at log steps (here 5)."""
    _poison_call(monkeypatch, 3)
    with pytest.raises(NonFiniteError, match="step 2.*Last good state: .*step-2"):
        _recipe(tmp_path / "run", "--steps", "6", "--save-every", "2", "--log-every", "5")
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    step, weights = _saved_state(tmp_path / "run")
    assert step == 2 and all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.timeout(120)  # a skipped step that still reached the weights makes every later step NaN: a loop
def test_nonfinite_step_can_be_skipped_and_counted(tmp_path, monkeypatch, capsys):
    _poison_call(monkeypatch, 2)
    path = _recipe(tmp_path / "run", "--steps", "4", "--on-nonfinite", "skip")
    assert load_checkpoint(path)["step"] == 4
    assert "skipped 1 steps with a non-finite loss" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in _state_dicts(load_checkpoint(path)).values())
    assert all(math.isfinite(r["loss"]) for r in _records(tmp_path / "run") if "loss" in r)  # its loss left out


def _cli(out, data, steps=30, save_every=2):
    return [sys.executable, str(ROOT / "recipes" / "supervised.py"), "--model", "vit_tiny", "--depth", "2",
            "--patch-size", "4", "--img-size", "32", "--batch-size", "8", "--num-workers", "1", "--data", data,
            "--steps", str(steps), "--save-every", str(save_every), "--out", str(out)]


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = small_digits(tmp_path / "data")  # 5 steps per epoch: the resumed part crosses epochs
    subprocess.run(_cli(tmp_path / "whole", data), check=True, env=env, capture_output=True)
    killed = subprocess.Popen(_cli(tmp_path / "killed", data), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "state" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "ckpt.pt").exists(), "the run finished before it could be killed"
    done = subprocess.run(_cli(tmp_path / "killed", data), check=True, env=env, capture_output=True, text=True)
    resumed_at = int(re.search(r"resuming \S+ at step (\d+)/30", done.stdout + done.stderr).group(1))
    assert 2 <= resumed_at <= 10  # at least two epoch boundaries still ahead
    assert_same_weights(load_checkpoint(str(tmp_path / "killed" / "ckpt.pt")),
                        load_checkpoint(str(tmp_path / "whole" / "ckpt.pt")))


def _records(run) -> list[dict]:
    """A run folder's metrics.jsonl records, in the order written."""
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def test_stop_at_writes_a_checkpoint_and_the_run_continues_the_same(tmp_path, capsys):
    small = ["--data", small_digits(tmp_path / "data"), "--batch-size", "8", "--steps", "12"]
    early = load_checkpoint(_recipe(tmp_path / "run", *small, "--stop-at", "7"))  # inside epoch 1
    assert early["step"] == 7
    capsys.readouterr()
    resumed = load_checkpoint(_recipe(tmp_path / "run", *small))
    assert f"resuming {tmp_path / 'run'} at step 7/12" in capsys.readouterr().out
    whole = load_checkpoint(_recipe(tmp_path / "whole", *small))
    steps = [(r["step"], r["epoch"]) for r in _records(tmp_path / "run") if "loss" in r]
    assert [s for s, _ in steps] == [2, 4, 6, 7, 8, 10, 12]  # each step once
    assert {e for s, e in steps if s > 7} == {1, 2}  # resumed inside epoch 1, crossed into epoch 2
    assert_same_weights(resumed, whole)


def test_curves_png_from_metrics_and_clear_error_for_unknown_metric(tmp_path):
    from ssl_vit.viz.curves import plot_curves

    run = tmp_path / "dino-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"objective": "dino", "objective_config": {"out_dim": 64}}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "epoch": 0, "loss": 4.0 - s / 10, "teacher_entropy": 3.9}) + "\n" for s in (10, 20, 30)))
    out = plot_curves([str(run)], str(tmp_path / "curves.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="no run logged \\['accuracy'\\]"):
        plot_curves([str(run)], str(tmp_path / "x.png"), keys=["accuracy"])
    with pytest.raises(UserError, match=f"{tmp_path / 'missing'}.* does not exist: pass a run folder"):
        plot_curves([str(tmp_path / "missing")], str(tmp_path / "x.png"))


def test_a_compiled_run_resumes_without_compile_and_mixup_stays_eager(tmp_path, monkeypatch):
    """The saved state has plain names (no ``_orig_mod.``): a --compile run resumes without it and ends
    as a run never compiled; Mixup's random draws run outside the compiled graph."""
    import functools

    from torch._dynamo.eval_frame import innermost_fn

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # no C++ build here
    mixup = ["--mixup", "0.8", "--steps", "2"]
    _recipe(tmp_path / "run", *mixup, "--compile", "--stop-at", "1")
    assert not any(k.startswith("_orig_mod") for k in _saved_state(tmp_path / "run")[1])
    resumed = load_checkpoint(_recipe(tmp_path / "run", *mixup))
    assert resumed["step"] == 2
    assert_same_weights(resumed, load_checkpoint(_recipe(tmp_path / "plain", *mixup)))
    assert innermost_fn(Supervised.mix) is not Supervised.mix  # torch.compiler.disable wrapped it
