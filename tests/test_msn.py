"""MSN: views, patch drop (kept tokens only; hybrids blank before the stem), the loss against the
official formula, the teacher by EMA only, schedules, collapse warning, resume, checkpoint, and two
processes training as one."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.optim import create_optimizer_v2
from torchvision.transforms import v2

from conftest import tiny_hybrid, tiny_vit, train_step
from ssl_vit.backbone import Backbone, BackboneConfig
from ssl_vit.checkpoint import export_safetensors, load_backbone, load_checkpoint, objective_state, student_weights
from ssl_vit.config import parse_run_config
from ssl_vit.data import MEAN, STD
from ssl_vit.errors import ConfigError
from ssl_vit.masking import random_masking
from ssl_vit.objectives import DataInfo, StepInfo, get_objective, load_objective
from ssl_vit.objectives.msn import MSN, MSNConfig, default_patch_drop, sinkhorn
from ssl_vit.train import run_recipe
from ssl_vit.train.optim import build_optimizer
from test_train import assert_same_weights

DATA = DataInfo("test", None, None, MEAN, STD, 16)
N_FOCAL = 2
TINY = dict(num_prototypes=8, hidden_dim=32, output_dim=16, focal_views=N_FOCAL, focal_size=8)


def tiny_msn(backbone=None, **kw) -> MSN:
    """ViT-Ti with 1 layer at 16 px (4x4 grid), focal views of 8 px (2x2), 8 prototypes, a small head."""
    return MSN(backbone or tiny_vit(depth=1), MSNConfig(**{**TINY, **kw}), DATA)


def fake_views(batch: int, seed: int = 0, size: int = 16) -> list[torch.Tensor]:
    """[target, random anchor, focal 1..N] as the loader batches them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)] + \
           [torch.randn(batch, 3, size // 2, size // 2, generator=g) for _ in range(N_FOCAL)]


def sgd(obj: MSN, wd: float = 0.04) -> torch.optim.Optimizer:
    params = [p for p in obj.parameters() if p.requires_grad]
    return torch.optim.SGD([{"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
                            {"params": [p for p in params if p.ndim > 1], "weight_decay": wd}], lr=0.1)


# ----- views and shapes -----
def test_views_shapes_and_the_recipe_defaults():
    cls = get_objective("msn")
    assert cls is MSN
    run = parse_run_config("msn", MSNConfig, MSN.recipe_defaults, argv=[])
    assert (run.backbone.img_size, run.backbone.patch_size, run.backbone.depth) == (32, 4, 6)
    cfg = run.objective_config
    assert (cfg.num_prototypes, cfg.focal_size, cfg.focal_views, cfg.temperature, cfg.start_sharpen) == (256, 16, 10, 0.1, 0.25)
    assert (run.train.lr, run.train.lr_ref_batch, run.train.weight_decay, run.train.clip_grad) == (1e-3, 1024, 0.04, 3.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    transform = MSN.train_transform(run.train, cfg, DataInfo("x", None, None, MEAN, STD, 32))
    views = transform(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 10
    # MSN's augmentation: colour jitter of strength 0.5 (saturation 0.4, unlike DINO's 0.2), blur p 0.5 on
    # every view, no solarization; scales (0.3, 1) and (0.05, 0.3)
    jitter = [t for t in transform.global_1.transforms[1].transforms if isinstance(t, v2.RandomApply)][0].transforms[0]
    assert jitter.saturation == (0.6, 1.4) and jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
    assert [view.transforms[2].p for view in (transform.global_1, transform.global_2, transform.local)] == [0.5] * 3
    assert transform.global_2.transforms[3].p == 0.0
    assert transform.global_1.transforms[0].crop.scale == (0.3, 1.0) and transform.local.transforms[0].crop.scale == (0.05, 0.3)

    obj = tiny_msn()
    batch = {"image": fake_views(3)}
    loss, metrics = obj(batch)
    assert loss.shape == () and torch.isfinite(loss)
    assert set(metrics) == {"cross_entropy", "me_max", "anchor_entropy", "target_entropy", "prototype_usage_entropy"}
    assert all(v.shape == () for v in metrics.values())
    anchors = obj.anchor_embeddings(batch["image"][1], batch["image"][2:])
    assert anchors.shape == (3 * (1 + N_FOCAL), 16) and obj.prototype_logits(anchors).shape == (9, 8)
    with pytest.raises(ValueError, match="MSN needs a target, a random anchor and 2 focal views per image .*got 3 views"):
        obj({"image": fake_views(3)[:3]})


def test_patch_drop_follows_the_model_size_and_bad_settings_are_refused():
    def backbone(model: str, patch: int) -> Backbone:
        return Backbone(BackboneConfig(model=model, patch_size=patch, img_size=32, depth=1))

    assert default_patch_drop(backbone("vit_small", 16)) == 0.15  # msn_vits16.yaml
    assert default_patch_drop(backbone("vit_base", 16)) == 0.3
    assert default_patch_drop(backbone("vit_base", 4)) == 0.7  # ViT-B/4's config
    assert tiny_msn().patch_drop == 0.15 and tiny_msn(patch_drop=0.5).patch_drop == 0.5
    for bad, flag in ((dict(patch_drop=1.0), "--patch-drop 1.0"), (dict(num_prototypes=1), "--num-prototypes 1"),
                      (dict(start_sharpen=0.0), "--start-sharpen 0.0"), (dict(memax_weight=-1.0), "--memax-weight -1.0"),
                      (dict(pos_interpolation="nearest"), "--pos-interpolation 'nearest'")):
        with pytest.raises(ConfigError, match=flag):
            MSNConfig(**bad)


def test_focal_views_get_msns_position_interpolation():
    """deit.py's interpolate_pos_encoding: bicubic at the plain size ratio sqrt(n / N), no antialiasing
    (DINO's adds 0.1), for the student and the teacher."""
    obj = tiny_msn()
    for backbone in (obj.backbone, obj.teacher):
        table = backbone.vit.pos_embed[:, 1:]  # [1, 16, D]: a 4x4 grid
        official = torch.nn.functional.interpolate(table.reshape(1, 4, 4, -1).permute(0, 3, 1, 2),
                                                   scale_factor=math.sqrt(4 / 16), mode="bicubic")
        official = official.permute(0, 2, 3, 1).reshape(1, 4, -1)
        torch.testing.assert_close(backbone.position_embedding((2, 2))[1], official)
        assert torch.equal(backbone.position_embedding((4, 4))[1], table)


# ----- patch drop -----
def test_the_anchor_encoder_sees_only_the_kept_tokens_and_the_teacher_all():
    obj = tiny_msn(patch_drop=0.5)
    seen = []
    obj.backbone.vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(("student", args[0].shape[:2])))
    obj.teacher.vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(("teacher", args[0].shape[:2])))
    obj({"image": fake_views(3)})
    # teacher: class token + 16 patches; random anchor: class token + the 8 kept; focal views: 1 + 4, unmasked
    assert seen == [("teacher", (3, 17)), ("student", (3, 9)), ("student", (3 * N_FOCAL, 5))]


@pytest.mark.parametrize("hybrid", [False, True])
def test_changing_the_pixels_of_a_dropped_patch_changes_nothing(hybrid):
    """A plain ViT never encodes a dropped token; a hybrid blanks dropped patches before its convolution
    stem, whose receptive field would otherwise carry their pixels into kept tokens."""
    torch.manual_seed(0)
    sizes = dict(rand_size=64, focal_size=32) if hybrid else {}  # the hybrid's total stride is 16
    obj = tiny_msn(tiny_hybrid(depth=1) if hybrid else None, patch_drop=0.5, **sizes).eval()
    size, p = (64, 16) if hybrid else (16, 4)
    images = torch.randn(2, 3, size, size)
    masking = random_masking(2, 16, 0.5, images.device, torch.Generator().manual_seed(0))
    dropped, kept = masking.masked[0, 0].item(), masking.keep[0, 0].item()

    def with_patch_changed(index: int) -> torch.Tensor:
        changed = images.clone()
        row, col = divmod(index, 4)
        changed[0, :, row * p:(row + 1) * p, col * p:(col + 1) * p] = torch.randn(3, p, p)
        return obj.encode_masked(changed, masking)

    out = obj.encode_masked(images, masking)
    assert out.shape == (2, 1 + 8, 192)
    assert torch.equal(with_patch_changed(dropped), out)
    assert not torch.allclose(with_patch_changed(kept)[0], out[0])


# ----- the loss -----
def official_msn_loss(anchors, targets, prototypes, tau, T, sinkhorn_on, memax_weight=1.0, ent_weight=0.0):
    """facebookresearch/msn's losses.init_msn_loss and distributed_sinkhorn as written there (one process)."""
    def snn(query, supports):
        query, supports = torch.nn.functional.normalize(query), torch.nn.functional.normalize(supports)
        return torch.softmax(query @ supports.T / tau, dim=1) @ torch.eye(len(supports))

    def sharpen(p):
        sharp_p = p ** (1. / T)
        return sharp_p / torch.sum(sharp_p, dim=1, keepdim=True)

    def distributed_sinkhorn(Q, num_itr=3):
        Q = Q.T.clone()
        B, K = Q.shape[1], Q.shape[0]
        Q /= torch.sum(Q)
        for _ in range(num_itr):
            Q /= torch.sum(Q, dim=1, keepdim=True)
            Q /= K
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.T

    probs = snn(anchors, prototypes)
    t = sharpen(snn(targets, prototypes))
    if sinkhorn_on:
        t = distributed_sinkhorn(t)
    t = torch.cat([t for _ in range(len(anchors) // len(targets))], dim=0)
    loss = torch.mean(torch.sum(torch.log(probs ** (-t)), dim=1))
    avg_probs = torch.mean(probs, dim=0)
    rloss = - torch.sum(torch.log(avg_probs ** (-avg_probs))) + math.log(float(len(avg_probs)))
    sloss = torch.mean(torch.sum(torch.log(probs ** (-probs)), dim=1))
    return loss + memax_weight * rloss + ent_weight * sloss, rloss, sloss


@pytest.mark.parametrize("use_sinkhorn, ent_weight", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_the_loss_equals_the_official_formula(use_sinkhorn, ent_weight):
    """Sharpened (and balanced) targets, the cross-entropy over every anchor view, me-max and the entropy
    term, on fixed embeddings: [3 anchor views x 4 images, 16] against [4, 16] targets."""
    obj = tiny_msn(sinkhorn=use_sinkhorn, entropy_weight=ent_weight, memax_weight=1.0)
    obj.sharpen_temp = 0.3
    g = torch.Generator().manual_seed(0)
    anchors, targets = torch.randn(12, 16, generator=g), torch.randn(4, 16, generator=g)
    loss, metrics = obj.msn_loss(anchors, targets)
    prototypes = obj.prototypes.parametrizations.weight.original1.detach()
    expected, rloss, sloss = official_msn_loss(anchors, targets, prototypes, 0.1, 0.3, use_sinkhorn, 1.0, ent_weight)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["me_max"], rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["anchor_entropy"], sloss, rtol=1e-5, atol=1e-6)


def test_sinkhorn_balances_the_prototypes_and_keeps_each_image_a_distribution():
    probs = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    balanced = sinkhorn(probs)
    torch.testing.assert_close(balanced.sum(1), torch.ones(6))
    def imbalance(q: torch.Tensor) -> float:  # how far the prototypes' totals are from B / K
        return (q.sum(0) - 6 / 4).abs().max().item()

    assert imbalance(balanced) < imbalance(probs) / 3
    assert imbalance(sinkhorn(probs, iterations=100)) < 1e-4  # MSN's 3 iterations go part of the way


def test_only_the_anchors_carry_gradient_to_the_prototypes_and_the_student():
    obj = tiny_msn()
    loss, _ = obj({"image": fake_views(4)})
    loss.backward()
    assert obj.prototypes.parametrizations.weight.original1.grad.abs().sum() > 0
    assert obj.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in obj._teacher_parameters())
    teacher = {id(p) for p in obj._teacher_parameters()}
    assert not any(id(p) in teacher for p in obj.prototypes.parameters())  # the prototypes are the student's alone


# ----- the teacher and the schedules -----
def test_teacher_gets_no_gradient_and_moves_only_by_ema():
    torch.manual_seed(0)
    obj = tiny_msn()
    opt = sgd(obj)
    info = StepInfo(step=3, total_steps=10, epoch=0, steps_per_epoch=10)
    before = [p.detach().clone() for p in obj._teacher_parameters()]
    obj.start_step(info, opt)
    loss, _ = obj({"image": fake_views(4)})
    loss.backward()
    opt.step()
    assert all(torch.equal(t0, t) for t0, t in zip(before, obj._teacher_parameters()))  # the step left it alone
    obj.end_step(info)
    m = obj.teacher_momentum(3, 10)
    students = list(obj._student_parameters())
    assert len(students) == len(before) == len(list(obj.backbone.parameters())) + len(list(obj.head.parameters()))
    changed = 0
    for t, t0, s in zip(obj._teacher_parameters(), before, students):
        torch.testing.assert_close(t.detach(), m * t0 + (1 - m) * s.detach(), rtol=1e-5, atol=1e-7)
        changed += not torch.equal(t, t0)
    assert changed > 0


def test_momentum_sharpening_and_weight_decay_span_one_and_a_quarter_runs():
    """msn_train.py: momentum 0.996 -> 1 and sharpening linear, weight decay on a cosine, all over 1.25 x
    the iterations, so at the last step they are 80% along."""
    obj = tiny_msn(start_sharpen=0.25, final_sharpen=0.5)
    assert obj.teacher_momentum(0, 100) == pytest.approx(0.996)
    assert obj.teacher_momentum(100, 100) == pytest.approx(0.996 + 0.004 * 0.8)
    opt = sgd(obj, wd=0.04)
    obj.start_step(StepInfo(50, 100, 0, 100), opt)
    assert obj.sharpen_temp == pytest.approx(0.25 + 0.25 * 0.4)
    assert opt.param_groups[1]["weight_decay"] == pytest.approx(0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * 0.4)) / 2)
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_the_prototypes_and_biases_do_not_decay_and_the_class_token_does():
    run = parse_run_config("msn", MSNConfig, MSN.recipe_defaults, argv=["--depth", "1", "--num-prototypes", "8"])
    obj = MSN(Backbone(run.backbone), run.objective_config, DataInfo("x", None, None, MEAN, STD, 32))
    decay = {id(p): g["weight_decay"] for g in build_optimizer(obj, run.train).param_groups for p in g["params"]}
    assert decay[id(obj.prototypes.parametrizations.weight.original1)] == 0
    assert decay[id(obj.backbone.vit.cls_token)] > 0 and decay[id(obj.head[0].weight)] > 0
    assert decay[id(obj.head[0].bias)] == 0 and decay[id(obj.head[1].weight)] == 0  # a bias, a BatchNorm


# ----- training and collapse watch -----
def test_the_collapse_watch_averages_micro_batches_and_counts_steps_in_a_row():
    from ssl_vit.objectives.collapse import CollapseWatch

    watch = CollapseWatch(lambda values: values < 1.0)
    for step, value in enumerate([0.5] * 3 + [2.0] + [0.5] * 4 + [2.0] * 2):
        watch.start_step()
        watch.add(torch.tensor([value - 0.25]))  # two micro-batches: the step's value is their mean
        watch.add(torch.tensor([value + 0.25]))
        watch.end_step()
    assert watch.last.tolist() == [2.0] and watch.steps == 10
    assert watch.sustained() == [None]  # 4 steps in a row at most: fewer than the 5 a warning needs
    for _ in range(5):
        watch.add(torch.tensor([0.0]))
        watch.end_step()
    assert watch.sustained() == [5]



def test_a_few_steps_on_a_fixed_batch_lower_the_loss_without_collapse():
    torch.manual_seed(0)
    obj = tiny_msn()
    opt = create_optimizer_v2(obj, opt="adamw", lr=1e-3, weight_decay=0.04)
    views = fake_views(8)
    losses = [train_step(obj, [views], opt, StepInfo(i, 8, 0, 8)).item() for i in range(8)]
    assert losses[-1] < losses[0]
    lines = obj.summary()
    assert lines[0].startswith("MSN end state") and not any("WARNING" in line for line in lines)


@pytest.mark.parametrize("kind", ["uniform", "one prototype"])
def test_forced_collapse_triggers_the_warning(kind):
    torch.manual_seed(0)
    if kind == "uniform":  # a huge temperature: every assignment uniform, entropy ln K
        obj, same_image = tiny_msn(temperature=1e4), False
    else:  # no balancing, no me-max, extreme sharpening, one image repeated: every target on one prototype
        obj, same_image = tiny_msn(sinkhorn=False, memax_weight=0.0, start_sharpen=1e-4, final_sharpen=1e-4), True
    opt = sgd(obj)
    for i in range(6):
        views = fake_views(4, seed=i)
        views = [v[:1].expand_as(v) for v in views] if same_image else views
        train_step(obj, [views], opt, StepInfo(i, 6, 0, 6))
    warning = " ".join(obj.summary())
    assert "WARNING: MSN looks collapsed" in warning
    assert ("near ln K" in warning) == (kind == "uniform") and ("one prototype" in warning) == (kind != "uniform")


# ----- the recipe: checkpoint, resume, processes -----
TINY_RECIPE = ["--batch-size", "8", "--depth", "1", "--img-size", "16", "--focal-size", "8", "--focal-views", "2",
               "--num-prototypes", "16", "--hidden-dim", "32", "--output-dim", "16", "--num-workers", "0",
               "--lr", "1e-2", "--log-every", "1"]


def test_the_checkpoint_holds_the_teacher_and_load_objective_rebuilds_the_rest(tmp_path):
    path = run_recipe("msn", argv=[*TINY_RECIPE, "--steps", "2", "--out", str(tmp_path / "run")])
    ckpt = load_checkpoint(path)
    assert ckpt["objective"] == "msn" and ckpt["step"] == 2
    rebuilt = load_objective(path)
    assert isinstance(rebuilt, MSN) and not rebuilt.training
    saved = objective_state(ckpt)
    assert {"prototypes.parametrizations.weight.original1", "head.1.running_mean", "teacher_head.0.weight"} <= set(saved)
    assert all(torch.equal(v, saved[k]) for k, v in rebuilt.objective_state().items())
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in rebuilt.teacher.vit.state_dict().items())
    student = student_weights(ckpt, path)
    assert any(not torch.equal(student[k], ckpt["state_dict"][k]) for k in student)
    export_safetensors(path, str(tmp_path / "student.safetensors"), student=True)
    exported, _ = load_backbone(str(tmp_path / "student.safetensors"))
    assert all(torch.equal(v, student[k]) for k, v in exported.vit.state_dict().items())


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    """The teacher, the prototypes, the heads' BatchNorm statistics and the patch-drop draws all resume."""
    argv = [*TINY_RECIPE, "--steps", "4"]
    early = load_checkpoint(run_recipe("msn", argv=[*argv, "--stop-at", "2", "--out", str(tmp_path / "run")]))
    assert early["step"] == 2
    resumed = load_checkpoint(run_recipe("msn", argv=[*argv, "--out", str(tmp_path / "run")]))
    whole = load_checkpoint(run_recipe("msn", argv=[*argv, "--out", str(tmp_path / "whole")]))
    assert resumed["step"] == 4
    assert_same_weights(resumed, whole)
