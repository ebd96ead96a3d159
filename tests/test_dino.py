"""DINO: teacher by EMA only, view pairs, centre over processes and micro-batches, multi-crop,
collapse warning, checkpoint (teacher) and student export."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from timm.optim import create_optimizer_v2

from conftest import free_port, tiny_vit, train_step
from ssl_vit.checkpoint import (export_safetensors, load_backbone, load_checkpoint, objective_state, save_checkpoint,
                                student_weights)
from ssl_vit.data import MEAN, STD, MultiCrop, collate
from ssl_vit.objectives import DataInfo, StepInfo, load_objective
from ssl_vit.errors import ConfigError
from ssl_vit.objectives.dino import DINO, DINOConfig, view_pairs

DATA = DataInfo("test", None, None, MEAN, STD, 16)
N_LOCAL = 2


def tiny_dino(**kw) -> DINO:
    """ViT-Ti 2 layers at 16 px (4x4 grid), local crops of 8 px (2x2 grid), a small head."""
    cfg = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops_number=N_LOCAL, local_crop_size=8)
    cfg.update(kw)
    return DINO(tiny_vit(), DINOConfig(**cfg), DATA)


def fake_crops(batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(N_LOCAL)]


def sgd(obj: DINO, wd: float = 0.04) -> torch.optim.Optimizer:
    decay = [p for n, p in obj.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in obj.named_parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": no_decay, "weight_decay": 0.0},
                            {"params": decay, "weight_decay": wd}], lr=0.1)


def teacher_state(obj: DINO) -> list[torch.Tensor]:
    return [p.detach().clone() for p in obj._teacher_parameters()]


# ----- teacher -----
def test_teacher_gets_no_gradient_and_moves_only_by_ema():
    torch.manual_seed(0)
    obj = tiny_dino(freeze_last_layer_epochs=0)
    opt = sgd(obj)
    info = StepInfo(step=3, total_steps=10, epoch=0, steps_per_epoch=10)
    before = teacher_state(obj)
    obj.start_step(info, opt)
    loss, _ = obj({"image": fake_crops(4)})
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj._teacher_parameters())
    opt.step()
    assert all(torch.equal(t0, t) for t0, t in zip(before, teacher_state(obj)))  # the step left it alone
    obj.end_step(info)
    m = obj.teacher_momentum(3, 10)
    students = list(obj._student_parameters())
    assert len(students) == len(before)
    changed = 0
    for t, t0, s in zip(teacher_state(obj), before, students):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s.detach(), rtol=1e-5, atol=1e-7)
        changed += not torch.equal(t, t0)
    assert changed > 0


def test_momentum_schedule_end_points():
    obj = tiny_dino(momentum_teacher=0.996)
    assert obj.teacher_momentum(0, 100) == pytest.approx(0.996)
    assert obj.teacher_momentum(50, 100) == pytest.approx(0.998)
    assert obj.teacher_momentum(100, 100) == pytest.approx(1.0)


def test_weight_decay_cosine_and_last_layer_frozen_in_first_epoch():
    obj = tiny_dino(weight_decay_end=0.4, freeze_last_layer_epochs=1)
    opt = sgd(obj, wd=0.04)
    obj.start_step(StepInfo(0, 10, 0, 5), opt)
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.0, 0.04])
    obj.start_step(StepInfo(10, 10, 2, 5), opt)
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.0, 0.4])

    last_layer = obj.head.last_layer.parametrizations.weight.original1
    for step, frozen in ((4, True), (5, False)):
        loss, _ = obj({"image": fake_crops(2)})
        loss.backward()
        obj.before_optimizer_step(StepInfo(step, 10, step // 5, 5))
        assert (last_layer.grad is None) == frozen
        assert obj.head.mlp[0].weight.grad is not None
        opt.zero_grad(set_to_none=True)


# ----- views -----
def test_view_pairs_never_pair_a_view_with_itself():
    pairs = view_pairs(2, 10)
    assert len(pairs) == 2 * 9 and len(set(pairs)) == len(pairs)
    assert all(t != s for t, s in pairs) and {t for t, _ in pairs} == {0, 1}


def test_loss_is_the_mean_over_different_views():
    obj = tiny_dino(out_dim=5)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    obj.center.copy_(torch.randn(5, generator=g))  # the teacher's outputs are centred: the centre is subtracted
    loss, entropy, batch_entropy = obj.dino_loss(student, teacher)
    p = torch.softmax((teacher - obj.center) / obj.cfg.teacher_temp, -1)
    logq = torch.log_softmax(student / obj.cfg.student_temp, -1)
    ce = -(p[:, None] * logq[None]).sum(-1).mean(-1)  # [teacher view, student view]
    off_diagonal = ce.sum() - ce[0, 0] - ce[1, 1]
    torch.testing.assert_close(loss, off_diagonal / 6)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1).mean())
    mean = p.mean((0, 1))
    torch.testing.assert_close(batch_entropy, -(mean * mean.log()).sum())


def test_teacher_sees_only_global_crops_and_student_all():
    obj = tiny_dino()
    seen = {"teacher": [], "student": []}
    obj.teacher.register_forward_hook(lambda m, args, out: seen["teacher"].append(tuple(args[0].shape)))
    obj.backbone.register_forward_hook(lambda m, args, out: seen["student"].append(tuple(args[0].shape)))
    obj({"image": fake_crops(3)})
    assert seen["teacher"] == [(6, 3, 16, 16)]  # the 2 global crops of 3 images, in one pass
    assert seen["student"] == [(6, 3, 16, 16), (3 * N_LOCAL, 3, 8, 8)]
    with pytest.raises(ValueError, match="DINO needs 2 global \\+ 2 local crops per image .*, got 3 views"):
        obj({"image": fake_crops(3)[:3]})


# ----- centre: once per step, over processes and micro-batches -----
def test_centre_is_an_ema_of_the_teacher_outputs():
    torch.manual_seed(0)
    obj = tiny_dino(center_momentum=0.9)
    old = torch.randn(64)
    obj.center.copy_(old)
    crops = fake_crops(4)
    with torch.no_grad():  # the teacher's raw outputs on the 2 global crops: [8, K]
        teacher_out = obj.teacher_head(obj.teacher(torch.cat(crops[:2])))
    obj({"image": crops})
    obj.end_step(StepInfo(0, 10, 0, 10))
    torch.testing.assert_close(obj.center, 0.9 * old + 0.1 * teacher_out.mean(0), rtol=1e-5, atol=1e-6)


def _centre_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    obj = tiny_dino()
    crops = [c[rank * 2:(rank + 1) * 2] for c in fake_crops(4)]
    obj({"image": crops})
    obj.end_step(StepInfo(0, 10, 0, 10))
    torch.save(obj.center, f"{out}/centre{rank}.pt")
    dist.destroy_process_group()


def test_centre_all_reduced_over_two_processes_equals_one_process(tmp_path):
    port = int(free_port())
    # fork: the children inherit the imported modules (spawn re-imports torch and timm: slow)
    mp.start_processes(_centre_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    torch.manual_seed(0)
    obj = tiny_dino()
    obj({"image": fake_crops(4)})
    obj.end_step(StepInfo(0, 10, 0, 10))
    assert obj.center.abs().sum() > 0
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"centre{rank}.pt"), obj.center, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_updates_centre_and_teacher_once_per_step():
    torch.manual_seed(0)
    whole = tiny_dino(momentum_teacher=0.9, freeze_last_layer_epochs=0)
    accum = copy.deepcopy(whole)
    opt_whole, opt_accum = sgd(whole), sgd(accum)
    for step in range(2):
        crops = fake_crops(4, seed=step)
        info = StepInfo(step, 4, 0, 4)
        train_step(whole, [crops], opt_whole, info)
        train_step(accum, [[c[:2] for c in crops], [c[2:] for c in crops]], opt_accum, info)
    assert whole.center.abs().sum() > 0
    torch.testing.assert_close(accum.center, whole.center, rtol=1e-4, atol=1e-6)
    for t_accum, t_whole in zip(teacher_state(accum), teacher_state(whole)):
        torch.testing.assert_close(t_accum, t_whole, rtol=1e-4, atol=1e-6)


# ----- data -----
def test_multicrop_shapes_and_counts():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    transform = MultiCrop(global_size=32, local_size=16, local_crops_number=3)
    crops = transform(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    batch = collate([{"image": transform(image), "index": i} for i in range(4)])
    assert [tuple(b.shape) for b in batch["image"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    paper = DINO.train_transform(None, DINOConfig(), DataInfo("x", None, None, MEAN, STD, 224))(image)
    assert [c.shape[-1] for c in paper] == [224] * 2 + [96] * 8
    with pytest.raises(ValueError, match=r"local crop scale \(0.5, 0.2\) must satisfy 0 < min <= max <= 1"):
        MultiCrop(local_scale=(0.5, 0.2))


def test_crop_size_must_fit_the_patch_size():
    with pytest.raises(ValueError, match="image size 10 is not divisible by the patch size 4; use a multiple of 4"):
        tiny_dino(local_crop_size=10)


# ----- training and collapse watch -----
def test_a_few_steps_on_a_fixed_batch_lower_the_loss_without_collapse():
    torch.manual_seed(0)
    obj = tiny_dino(freeze_last_layer_epochs=0)  # (momentum 0.9 collapses this tiny setup: the teacher chases)
    opt = create_optimizer_v2(obj, opt="adamw", lr=1e-3, weight_decay=0.04)
    crops = fake_crops(8)
    losses = [train_step(obj, [crops], opt, StepInfo(i, 8, 0, 8)).item() for i in range(8)]
    assert losses[-1] < losses[0]
    lines = obj.summary()
    assert lines[0].startswith("DINO end state") and not any("WARNING" in line for line in lines)


@pytest.mark.parametrize("kind", ["uniform", "one prototype"])
def test_forced_collapse_triggers_the_warning(kind):
    torch.manual_seed(0)
    if kind == "uniform":  # a huge teacher temperature: every output uniform, entropy ln K
        obj, same_image = tiny_dino(teacher_temp=1e3, warmup_teacher_temp=1e3), False
    else:  # no centring, extreme sharpening, one image repeated: every output on the same prototype
        obj, same_image = tiny_dino(teacher_temp=1e-4, warmup_teacher_temp=1e-4, center_momentum=1.0), True
    opt = sgd(obj)
    for i in range(6):
        crops = fake_crops(4, seed=i)
        crops = [c[:1].expand_as(c) for c in crops] if same_image else crops
        train_step(obj, [crops], opt, StepInfo(i, 6, 0, 6))
    warning = " ".join(obj.summary())
    assert "WARNING: DINO looks collapsed" in warning
    assert ("near ln K" in warning) == (kind == "uniform") and ("one prototype" in warning) == (kind != "uniform")
    assert "--teacher-temp" in warning and "--momentum-teacher" in warning and "--batch-size" in warning


# ----- the recipe and its checkpoint -----
TINY_RECIPE = ["--batch-size", "8", "--depth", "1", "--out-dim", "32", "--hidden-dim", "32", "--bottleneck-dim", "16",
               "--local-crops-number", "2", "--num-workers", "0", "--lr", "1e-2"]


def test_recipe_checkpoint_holds_the_teacher_and_exports_the_student(tmp_path):
    from ssl_vit.train import run_recipe

    path = run_recipe("dino", argv=[*TINY_RECIPE, "--steps", "2", "--out", str(tmp_path / "run")])
    ckpt = load_checkpoint(path)
    assert ckpt["objective"] == "dino" and ckpt["arch"]["drop_path_rate"] == 0.0  # the teacher's
    teacher, student = ckpt["state_dict"], student_weights(ckpt, path)
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    export_safetensors(path, str(tmp_path / "student.safetensors"), student=True)
    exported, _ = load_backbone(str(tmp_path / "student.safetensors"))
    for k, v in exported.vit.state_dict().items():
        assert torch.equal(v, student[k])


def test_trainer_updates_centre_and_teacher_once_per_step_under_accumulation(tmp_path):
    """Through the training loop: 2 micro-batches of 4 give the teacher and student of batches of 8."""
    from ssl_vit.train import run_recipe

    # no drop-path (its random draws depend on the micro-batch size); a fast teacher, so that an extra
    # EMA update would move it measurably. SGD, not the recipe's AdamW: AdamW normalises each element's
    # update, so where a gradient is rounding noise (the key biases', whose exact gradient is 0; MLP
    # units that GELU switched off) the two runs' different noise became steps of the full lr (up to
    # 1e-3 apart); with SGD the runs agree to ~1e-7.
    argv = [*TINY_RECIPE, "--steps", "3", "--drop-path-rate", "0", "--lr-ref-batch", "8", "--momentum-teacher", "0.9",
            "--freeze-last-layer-epochs", "0", "--optimizer", "sgd"]
    whole = load_checkpoint(run_recipe("dino", argv=[*argv, "--out", str(tmp_path / "a")]))
    accum = load_checkpoint(run_recipe("dino", argv=[*argv, "--grad-accum", "2", "--out", str(tmp_path / "b")]))
    for name, value in whole["state_dict"].items():  # the teacher
        torch.testing.assert_close(accum["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    accum_state = objective_state(accum)
    for name, value in objective_state(whole).items():  # the student, the heads, the centre
        torch.testing.assert_close(accum_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_teacher_temperature_warms_up_per_epoch_as_main_dino():
    """linspace(0.04, 0.07, 3) over the first 3 epochs, one value per epoch; then 0.07."""
    dino = tiny_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    per_step = [dino.teacher_temperature(step, steps_per_epoch=5) for step in range(20)]
    assert per_step == pytest.approx([0.04] * 5 + [0.055] * 5 + [0.07] * 10)
    with pytest.raises(ConfigError, match="--warmup-teacher-temp-epochs 0.5: .*whole number"):
        DINOConfig(warmup_teacher_temp_epochs=0.5)


def _dino_interpolate_pos_encoding(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` (vision_transformer.py) for a square table, as written there."""
    n, dim = table.shape[1], table.shape[2]
    h0, w0 = h + 0.1, w + 0.1
    grid = table.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim)


def test_local_crops_get_dinos_position_interpolation_and_old_runs_keep_timms(tmp_path):
    """The student's 2x2 local-crop positions come from its 4x4 table as DINO interpolates them
    (bicubic, scale (n + 0.1) / N, no antialiasing), not by timm's antialiased resampling; the table's
    own grid is used as it is; runs from before the setting keep timm's."""
    from timm.layers import resample_abs_pos_embed

    dino = tiny_dino()
    for backbone in (dino.backbone, dino.teacher):
        table = backbone.vit.pos_embed[:, 1:]
        assert torch.equal(backbone.position_embedding((4, 4))[1], table)
        got = backbone.position_embedding((2, 2))[1]
        assert torch.allclose(got, _dino_interpolate_pos_encoding(table, 2, 2), atol=1e-6)
        assert not torch.allclose(got, resample_abs_pos_embed(table, new_size=(2, 2), num_prefix_tokens=0), atol=1e-3)
    timm_way = tiny_dino(pos_interpolation="timm").backbone
    assert torch.allclose(timm_way.position_embedding((2, 2))[1],
                          resample_abs_pos_embed(timm_way.vit.pos_embed[:, 1:], new_size=(2, 2), num_prefix_tokens=0))
    with pytest.raises(ConfigError, match="--pos-interpolation 'nearest': use 'dino' or 'timm'"):
        DINOConfig(pos_interpolation="nearest")
    config = {k: v for k, v in vars(dino.cfg).items() if k != "pos_interpolation"}  # as saved before the setting
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, dino.teacher, objective="dino", objective_config=config, train_config={}, step=1,
                    data=vars(DATA), objective_state=dino.objective_state())
    assert load_objective(path).backbone.pos_interpolation == "timm"


def test_loss_is_computed_in_float32_under_bf16_autocast():
    """Under autocast the einsum would run in bf16 and round the loss to a few bits."""
    dino = tiny_dino()
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 3, 64, generator=g) * 3, torch.randn(2, 3, 64, generator=g) * 3
    expected = dino.dino_loss(student, teacher)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dino.dino_loss(student.bfloat16(), teacher.bfloat16())[0]
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(dino.dino_loss(student.bfloat16().float(), teacher.bfloat16().float())[0].item(),
                                       abs=1e-5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-2)


# ----- the recorded results: refactors of the shared teacher pieces keep them -----
def checksum(tensors) -> float:
    """One number that moves with every element of every tensor (in order): sum_i (i + 1) <t_i, cos(0..n-1)>."""
    total = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(tensors):
        flat = t.detach().double().flatten()
        total += (i + 1) * (flat * torch.cos(torch.arange(flat.numel(), dtype=torch.float64))).sum()
    return total.item()


# Recorded at commit c982f6d (before the EMA teacher, heads, schedules and collapse watch moved out of
# dino.py). A deliberate change of DINO's results updates them; rel 1e-5 leaves room for another CPU's
# float rounding only (on the recording machine they are equal to the last bit).
RECORDED_STEPS = {"losses": [2.656291961669922, 0.05964336171746254, 0.03335878252983093],
                  "teacher": 465.64108955207394, "student": 1982.39153838698, "center": -0.5316463389630357,
                  "objective_state": 2576.5022030671307}
RECORDED_RUN = {"losses": [2.610884666442871, 1.8595181703567505, 1.6911190748214722],
                "teacher": -30.87711673130198, "objective_state": -228.2332963354906}
RECORDED_CROPS = 1794.4525192176832  # 8 draws of MultiCrop(32, 16, 2) on a colour-noise image, seed 0


def test_multicrop_gives_the_recorded_crops():
    """DINO's augmentation as it was: the recipe runs on greyscale digits, where saturation and hue do nothing."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    transform = MultiCrop(32, 16, 2)
    assert checksum([crop for _ in range(8) for crop in transform(image)]) == pytest.approx(RECORDED_CROPS, rel=1e-5)


def test_three_steps_give_the_recorded_losses_teacher_and_centre():
    """The schedules (teacher temperature warm-up, momentum, weight decay, last layer frozen for half an
    epoch) and the EMA updates of three optimizer steps."""
    torch.manual_seed(0)
    obj = tiny_dino(freeze_last_layer_epochs=0.5, warmup_teacher_temp_epochs=2, warmup_teacher_temp=0.02,
                    momentum_teacher=0.9)
    opt = sgd(obj)
    losses = [train_step(obj, [fake_crops(4, seed=i)], opt, StepInfo(i, 3, i // 2, 2)).item() for i in range(3)]
    assert losses == pytest.approx(RECORDED_STEPS["losses"], rel=1e-5)
    assert checksum(obj._teacher_parameters()) == pytest.approx(RECORDED_STEPS["teacher"], rel=1e-5)
    assert checksum(obj._student_parameters()) == pytest.approx(RECORDED_STEPS["student"], rel=1e-5)
    assert checksum([obj.center]) == pytest.approx(RECORDED_STEPS["center"], rel=1e-5)
    assert checksum(obj.objective_state().values()) == pytest.approx(RECORDED_STEPS["objective_state"], rel=1e-5)


def test_a_recipe_run_gives_the_recorded_losses_and_checkpoint(tmp_path):
    """Through the trainer: multi-crop, AdamW groups, per-parameter clipping, the checkpoint's names."""
    from ssl_vit.train import run_recipe

    path = run_recipe("dino", argv=[*TINY_RECIPE, "--steps", "3", "--log-every", "1", "--freeze-last-layer-epochs",
                                    "0.1", "--out", str(tmp_path / "run")])
    ckpt = load_checkpoint(path)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert losses == pytest.approx(RECORDED_RUN["losses"], rel=1e-5)
    assert checksum(ckpt["state_dict"].values()) == pytest.approx(RECORDED_RUN["teacher"], rel=1e-5)
    assert checksum(objective_state(ckpt).values()) == pytest.approx(RECORDED_RUN["objective_state"], rel=1e-5)
