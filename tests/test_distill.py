"""DeiT's distillation: the distillation token in the token contract, checkpoints, the timm export and
the evaluations; the distill objective's losses, its frozen teacher, resume, and its refusals."""

import dataclasses
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import fit, small_digits, tiny_vit
from ssl_vit.backbone import BackboneConfig, BackboneError, build_backbone
from ssl_vit.checkpoint import export_safetensors, load_backbone, load_checkpoint, objective_state, save_checkpoint
from ssl_vit.config import parse_run_config
from ssl_vit.data import MEAN, STD, EpochSampler, ImageDataset, load_data, make_loader, train_transform
from ssl_vit.errors import run_cli
from ssl_vit.objectives import DataInfo, StepInfo, get_objective, load_objective
from ssl_vit.objectives.distill import Distill, DistillConfig
from ssl_vit.objectives.frozen_teacher import FrozenTeacher
from ssl_vit.train import run_recipe
from ssl_vit.train.optim import build_optimizer
from test_train import assert_same_weights

TINY = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "8",
        "--num-workers", "0", "--log-every", "1", "--report-to", "none"]


def distilled_vit(**kw):
    """The tiny ViT of conftest with a distillation token and position embeddings that matter."""
    b = tiny_vit(depth=1, distillation_token=True, **kw).eval()
    with torch.no_grad():
        b.vit.pos_embed.normal_()
        b.vit.dist_token.normal_()
    return b


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A ViT teacher: the supervised recipe for a few steps on the digits at 16 px."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    return run_recipe("supervised", None, argv=[*TINY, "--steps", "4", "--out", str(out)])


@pytest.fixture(scope="module")
def cnn_weights(tmp_path_factory):
    """timm's resnet10t (with BatchNorm) as 10- and 5-class classifiers, saved as safetensors."""
    folder = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    for classes in (10, 5):
        save_file(timm.create_model("resnet10t", num_classes=classes).state_dict(),
                  str(folder / f"resnet10t-{classes}.safetensors"))
    return folder


def _data_info(ckpt_path: str) -> DataInfo:
    data = load_checkpoint(ckpt_path)["data"]
    return DataInfo(**{f.name: data[f.name] for f in dataclasses.fields(DataInfo)})


def _objective(teacher: str, data: DataInfo, **settings) -> Distill:
    objective = Distill(distilled_vit().train(), DistillConfig(teacher=teacher, **settings), data)
    objective.prepare_training()
    return objective


def _batch(n: int) -> dict:
    torch.manual_seed(0)
    src = load_data("default")
    ds = ImageDataset(src.train, src.image_column, src.label_column, train_transform(16))
    return next(iter(make_loader(ds, EpochSampler(len(ds), n), 0, False)))


def _distill(out, *extra):
    return run_recipe("distill", None, argv=[*TINY, "--out", str(out), *extra])


def _refused(argv, capsys) -> str:
    """The one line a command refuses ``argv`` with (run_cli: exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda a: run_recipe("distill", argv=a), argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# ----- the token contract -----
def test_the_distillation_token_is_a_second_prefix_token_placed_and_pooled_as_timm_does():
    b = distilled_vit()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = b.forward_features(x)
        assert features.shape == (2, 2 + 16, 192) and b.num_prefix_tokens == 2
        # [class, distillation, patches], each with its own position embedding: timm's forward
        torch.testing.assert_close(features, b.vit.forward_features(x))
        mean = (features[:, 0] + features[:, 1]) / 2  # DeiT's representation at test time
        torch.testing.assert_close(b(x), mean)
        torch.testing.assert_close(b.pool(features), mean)
        torch.testing.assert_close(b.distillation_token(features), features[:, 1])
        assert b.patch_tokens(features).shape == (2, 16, 192)
        # a subset of patch tokens still works: prefix tokens first, dropped patches change nothing
        tokens, grid = b.embed(x), b.grid_size(x)
        keep = torch.tensor([[0, 5, 9], [1, 2, 15]])
        kept = b.encode(tokens, grid, keep=keep)
        assert kept.shape == (2, 2 + 3, 192)
        changed = tokens.clone()
        changed[0, 7] += 10.0
        torch.testing.assert_close(b.encode(changed, grid, keep=keep), kept)
        # another grid: the patch positions are resampled, the two prefix positions kept
        assert b.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 2 + 64, 192)


def test_register_tokens_stay_placed_as_timm_places_them():
    b = build_backbone(BackboneConfig(model="vit_small_patch14_reg4_dinov2", img_size=28, depth=1)).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(b.forward_features(x), b.vit.forward_features(x))
        torch.testing.assert_close(b(x), b.vit(x))


def test_prefix_tokens_the_contract_cannot_place_are_refused(monkeypatch):
    with pytest.raises(BackboneError, match="no distilled vit_large"):
        build_backbone(BackboneConfig(model="vit_large", patch_size=4, img_size=16, depth=1, distillation_token=True))
    with pytest.raises(BackboneError, match="--global-pool token"):
        BackboneConfig(distillation_token=True, global_pool="avg")
    create = timm.create_model

    def with_an_unknown_token(*args, **kwargs):  # a ViT whose third prefix token encode would not place
        vit = create(*args, **kwargs)
        vit.num_prefix_tokens += 1
        return vit

    monkeypatch.setattr(timm, "create_model", with_an_unknown_token)
    with pytest.raises(BackboneError, match="2 prefix tokens that the token contract cannot place"):
        tiny_vit(depth=1)


# ----- checkpoints, export, evaluation -----
def test_checkpoints_record_the_token_and_old_ones_load_unchanged(tmp_path):
    b, plain = distilled_vit(), tiny_vit(depth=1).eval()
    x = torch.randn(2, 3, 16, 16)
    for name, backbone in (("distilled", b), ("old", plain)):
        path = str(tmp_path / f"{name}.pt")
        save_checkpoint(path, backbone, objective="supervised", objective_config={}, train_config={}, step=1, data={})
        if name == "old":  # the architecture as written before the setting existed
            ckpt = torch.load(path, weights_only=True)
            del ckpt["arch"]["distillation_token"]
            torch.save(ckpt, path)
        loaded, _ = load_backbone(path)
        assert loaded.has_distillation_token == (name == "distilled")
        torch.testing.assert_close(loaded(x), backbone(x))


def test_a_run_folder_from_before_the_setting_resumes_without_a_distillation_token(tmp_path):
    argv = [*TINY, "--steps", "2", "--out", str(tmp_path / "run")]
    run_recipe("supervised", {}, argv=[*argv, "--stop-at", "1"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    del config["backbone"]["distillation_token"]  # as written before the setting existed
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="distillation_token: False -> True"):
        run_recipe("supervised", {}, argv=[*argv, "--distillation-token"])
    assert load_checkpoint(run_recipe("supervised", {}, argv=argv))["step"] == 2


def test_a_distilled_backbone_exports_to_timm_with_equal_outputs(tmp_path):
    b = distilled_vit()
    ckpt, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "backbone.safetensors")
    save_checkpoint(ckpt, b, objective="distill", objective_config={}, train_config={}, step=1, data={})
    export_safetensors(ckpt, out)
    from safetensors import safe_open

    with safe_open(out, "pt") as fh:
        meta = fh.metadata()
    assert meta["timm_name"] == "deit_tiny_distilled_patch16_224"
    model = timm.create_model(meta["timm_name"], pretrained=True, pretrained_cfg_overlay=dict(file=out),
                              **json.loads(meta["timm_kwargs"])).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), b.forward_features(x))
        torch.testing.assert_close(model(x), b(x))  # timm's eval head: the mean of the two tokens
    torch.testing.assert_close(load_backbone(out)[0](x), b(x))


def test_eval_features_of_a_distilled_checkpoint_are_the_mean_of_its_two_tokens(tmp_path):
    from ssl_vit.evaluation.features import FeatureExtractor, image_split
    from ssl_vit.evaluation.linear import dino_features

    b = distilled_vit()
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(ckpt, b, objective="distill", objective_config={}, train_config={}, step=1,
                    data={"mean": MEAN, "std": STD})
    extractor = FeatureExtractor.from_checkpoint(ckpt, torch.device("cpu"), str(tmp_path / "cache"), batch_size=8, num_workers=0)
    features = extractor.features("default", max_train=8, max_test=8)
    test = image_split(load_data("default"), "default", "test", 8, extractor.transform, False)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    with torch.no_grad():
        tokens = b.forward_features(images)
        mean = (tokens[:, 0] + tokens[:, 1]) / 2
        torch.testing.assert_close(features.test, mean)
        # DINO's linear protocol reads each block's prefix the same way
        torch.testing.assert_close(dino_features(b, images, 1, False), mean)


@pytest.mark.parametrize("objective", ["supervised", "masked_patch", "mae", "dino"])
def test_every_objective_trains_a_distillation_token(objective):
    cls = get_objective(objective)
    extra = ["--out-dim", "16", "--hidden-dim", "16", "--bottleneck-dim", "8", "--local-crops-number", "2",
             "--local-crop-size", "8"] if objective == "dino" else ["--global-pool", "token"]
    run = parse_run_config(objective, cls.Config, cls.recipe_defaults, argv=[*TINY, "--distillation-token", *extra])
    data = DataInfo("default", 10, None, MEAN, STD, 16)
    model = cls(build_backbone(run.backbone), run.objective_config, data)
    src = load_data("default")
    ds = ImageDataset(src.train, src.image_column, src.label_column, cls.train_transform(run.train, run.objective_config, data))
    batch = next(iter(make_loader(ds, EpochSampler(len(ds), 4), 0, False)))
    model.start_step(StepInfo(0, 10, 0, 10), build_optimizer(model, run.train))
    loss, _ = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.vit.dist_token.grad.abs().sum() > 0


# ----- the distill objective -----
def test_the_recipe_defaults_are_deits():
    run = parse_run_config("distill", DistillConfig, Distill.recipe_defaults, argv=["--teacher", "t.pt"])
    o, t, b = run.objective_config, run.train, run.backbone
    assert (o.distillation_type, o.distillation_alpha, o.distillation_tau) == ("hard", 0.5, 1.0)
    assert (o.label_smoothing, o.mixup, o.cutmix) == (0.1, 0.8, 1.0)
    assert (t.weight_decay, t.clip_grad, t.random_erasing, t.randaugment) == (0.05, 0.0, 0.25, "rand-m9-mstd0.5-inc1")
    assert b.distillation_token and b.drop_path_rate == 0.1


@pytest.mark.parametrize("kind", ["hard", "soft", "none"])
def test_the_losses_equal_a_hand_computation(teacher_ckpt, kind):
    """hard: cross-entropy of the distillation head to the teacher's argmax; soft: KL(teacher || student)
    at temperature tau, x tau^2, summed and divided by the number of logits (DeiT's losses.py); none: the
    class head alone. The class head always learns the true labels; alpha weighs the two."""
    data = _data_info(teacher_ckpt)
    objective = _objective(teacher_ckpt, data, distillation_type=kind, distillation_alpha=0.3, distillation_tau=2.0)
    assert (objective.teacher is None) == (kind == "none")
    batch = _batch(8)
    images, labels = batch["image"], batch["label"]
    loss, metrics = objective(batch)
    with torch.no_grad():
        tokens = objective.backbone.forward_features(images)
        cls, dist = objective.head(tokens[:, 0]), objective.head_dist(tokens[:, 1])
        class_loss = F.cross_entropy(cls, labels)
        teacher = load_objective(teacher_ckpt).logits(images)  # same data, size and normalisation
    if kind == "hard":
        distill = F.cross_entropy(dist, teacher.argmax(dim=1))
    else:
        log_student, log_teacher = (dist / 2.0).log_softmax(dim=1), (teacher / 2.0).log_softmax(dim=1)
        distill = (log_teacher.exp() * (log_teacher - log_student)).sum() * 2.0 ** 2 / dist.numel()
    expected = class_loss if kind == "none" else 0.7 * class_loss + 0.3 * distill
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["class_loss"], class_loss, rtol=1e-5, atol=1e-6)
    # at test time: the mean of both heads' logits, counted per head too
    torch.testing.assert_close(objective.logits(images).detach(), (cls + dist) / 2)
    sums = objective.evaluate_batch(batch)
    for key, logits in [("test_accuracy", cls + dist), ("test_accuracy_class_head", cls),
                        ("test_accuracy_distillation_head", dist)]:
        assert sums[key] == (logits.argmax(-1) == labels).sum()


def test_the_teacher_sees_the_mixed_images_the_student_sees(teacher_ckpt):
    """As DeiT's engine.py: Mixup/CutMix first, then the student and the teacher on the same images."""
    objective = _objective(teacher_ckpt, _data_info(teacher_ckpt), mixup=0.8, cutmix=1.0)
    seen = {}
    objective.backbone.vit.patch_embed.register_forward_pre_hook(lambda m, args: seen.update(student=args[0].clone()))
    classify = objective.teacher.classify
    objective.teacher.classify = lambda x: seen.update(teacher=x) or classify(x)
    batch = _batch(8)
    unmixed = batch["image"].clone()  # timm's Mixup mixes in place
    objective(batch)
    assert not torch.allclose(seen["student"], unmixed)
    torch.testing.assert_close(seen["teacher"], seen["student"])  # same size and normalisation: as they are


def test_the_teacher_gets_no_gradient_does_not_change_and_moves_with_the_student(cnn_weights):
    data = DataInfo("default", 10, None, MEAN, STD, 16)
    weights = str(cnn_weights / "resnet10t-10.safetensors")
    objective = _objective("resnet10t", data, teacher_weights=weights, teacher_img_size=32)
    teacher = objective.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # BatchNorm statistics too
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in objective.parameters()}
    objective.train()
    fit(objective, _batch(8), optimizer, 2)
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, after[k]) for k, v in load_file(weights).items())  # the file's, classifier too
    # its logits are timm's on the renormalised, resized batch
    images = _batch(4)["image"]
    config = timm.data.resolve_model_data_config(teacher)
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    resized = F.interpolate((pixels - mean) / std, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(objective.teacher(images), teacher(resized), rtol=1e-4, atol=1e-4)
    objective.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64


def test_the_teacher_sees_its_own_input_size_and_normalisation():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))

    student = DataInfo("x", 3, None, MEAN, STD, 16)
    model = Recorder()
    teacher = FrozenTeacher(model, model.forward, (32, 32), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), student, "r")
    images = torch.randn(2, 3, 16, 16)
    teacher(images)
    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    expected = (pixels - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    expected = F.interpolate(expected, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(seen["x"], expected, rtol=1e-5, atol=1e-5)
    assert "resized to 32 px" in teacher.describe()


def test_loss_goes_down_on_a_fixed_batch(teacher_ckpt):
    objective = _objective(teacher_ckpt, _data_info(teacher_ckpt))
    batch = _batch(16)
    losses, _ = fit(objective, batch, torch.optim.AdamW(objective.parameters(), lr=1e-3), 20)
    assert losses[-1] < 0.5 * losses[0]


def test_a_run_resumes_after_a_stop_as_if_never_stopped_and_saves_no_teacher(tmp_path, teacher_ckpt):
    small = ["--data", small_digits(tmp_path / "data"), "--steps", "6", "--teacher", teacher_ckpt]
    assert load_checkpoint(_distill(tmp_path / "run", *small, "--stop-at", "3"))["step"] == 3
    resumed = load_checkpoint(_distill(tmp_path / "run", *small))
    whole = load_checkpoint(_distill(tmp_path / "whole", *small))
    assert_same_weights(resumed, whole)
    # the student (with its distillation token) and its two heads; the teacher only as its spec
    assert "dist_token" in whole["state_dict"] and whole["arch"]["distillation_token"]
    assert {k.split(".")[0] for k in objective_state(whole)} == {"head", "head_dist"}
    assert whole["objective_config"]["teacher"] == teacher_ckpt
    saved = load_file(str(next((tmp_path / "whole" / "state").glob("step-*/model.safetensors"))))
    assert not [k for k in saved if not k.startswith(("backbone.", "head.", "head_dist."))]


def test_load_objective_rebuilds_a_distilled_run_and_its_test_accuracy(tmp_path, teacher_ckpt, capsys):
    path = _distill(tmp_path / "run", "--steps", "2", "--teacher", teacher_ckpt, "--save-every", "0")
    out = capsys.readouterr().out
    assert "distill: test accuracy" in out and "teacher:" in out
    ckpt = load_checkpoint(path)
    rebuilt = load_objective(path)
    assert isinstance(rebuilt, Distill) and rebuilt.teacher is None  # the teacher is not part of ckpt.pt
    assert all(torch.equal(v, objective_state(ckpt)[k]) for k, v in rebuilt.objective_state().items())
    from ssl_vit.evaluation.features import image_split
    from ssl_vit.data import eval_transform

    data = _data_info(path)
    test = image_split(load_data("default"), "default", "test", None, eval_transform(16, data.mean, data.std), False)
    loader = make_loader(test, EpochSampler(len(test), 64, drop_last=False), 0, False)
    sums = [rebuilt.evaluate_batch(b) for b in loader]
    results = rebuilt.test_metrics({k: sum(s[k] for s in sums) for k in sums[0]})
    assert results["test_accuracy"] == pytest.approx(ckpt["results"]["test_accuracy"])
    # a distilled run teaches too: its prediction is the mean of its two heads
    objective = _objective(path, data)
    assert isinstance(objective.teacher.model, Distill)


def test_a_timm_cnn_teaches_from_a_weights_file(tmp_path, cnn_weights):
    weights = str(cnn_weights / "resnet10t-10.safetensors")
    path = _distill(tmp_path / "run", "--steps", "2", "--teacher", "resnet10t", "--teacher-weights", weights,
                    "--teacher-img-size", "32", "--mixup", "0", "--cutmix", "0")
    assert 0.0 <= load_checkpoint(path)["results"]["teacher_test_accuracy"] <= 1.0


def test_teachers_that_cannot_teach_are_refused_in_one_line(tmp_path, teacher_ckpt, cnn_weights, capsys):
    out = tmp_path / "run"
    base = [*TINY, "--out", str(out), "--steps", "1"]
    five = str(cnn_weights / "resnet10t-5.safetensors")
    assert "predicts 5 classes and default has 10" in _refused(
        [*base, "--teacher", "resnet10t", "--teacher-weights", five], capsys)
    assert "not a timm model name" in _refused([*base, "--teacher", "no_such_model"], capsys)
    # timm's pretrained resnet10t predicts ImageNet's 1000 classes: refused before anything is downloaded
    assert "resnet10t predicts 1000 classes and default has 10" in _refused([*base, "--teacher", "timm:resnet10t"], capsys)
    assert "needs --teacher" in _refused(base, capsys)
    export = str(tmp_path / "teacher.safetensors")
    export_safetensors(teacher_ckpt, export)
    assert "without its class head" in _refused([*base, "--teacher", export], capsys)
    assert "has no distillation token" in _refused(
        [*base, "--teacher", teacher_ckpt, "--model", "vit_small_patch14_reg4_dinov2", "--patch-size", "14",
         "--img-size", "28"], capsys)
    assert "backbone has none" in _refused([*base, "--teacher", teacher_ckpt, "--no-distillation-token"], capsys)
    mae = run_recipe("mae", None, argv=[*TINY, "--steps", "0", "--out", str(tmp_path / "mae")])
    capsys.readouterr()
    assert "MAE checkpoint, without a class head" in _refused([*base, "--teacher", mae], capsys)
    assert not out.exists()  # refused before anything was written


def test_pretrained_weights_that_cannot_be_fetched_are_one_line():
    from ssl_vit.objectives.frozen_teacher import TeacherError, _download

    with pytest.raises(TeacherError, match="timm could not fetch its pretrained weights .*--teacher-weights FILE"):
        _download("resnet10t")  # HF_HUB_OFFLINE (conftest): the hub refuses to download
