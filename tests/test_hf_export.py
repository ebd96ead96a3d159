"""``--format hf``: a folder transformers loads with our outputs, one-line refusals, the model card, the upload."""

import importlib
import json
import os
import shlex
import sys

import pytest
import torch
from PIL import Image

from conftest import tiny_hybrid, tiny_vit
from ssl_vit import export
from ssl_vit.checkpoint import save_checkpoint
from ssl_vit.config import parse_run_config, recipe_defaults
from ssl_vit.data.transforms import to_normalized_tensor
from ssl_vit.errors import run_cli
from ssl_vit.objectives import get_objective
from ssl_vit.train import run_recipe

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

DATA = {"name": "default", "num_classes": 10, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}


def _checkpoint(path, backbone, objective="supervised", objective_state=None):
    """Save ``backbone`` with every weight moved off its initial value (a swapped pair of LayerNorms
    would otherwise hold the same ones and zeros) and a recipe's settings."""
    with torch.no_grad():
        for tensor in backbone.vit.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    run = recipe_defaults(objective).to_dict()
    save_checkpoint(str(path), backbone, objective=objective, objective_config=run["objective_config"],
                    train_config=run["train"], step=3, data=DATA, objective_state=objective_state)
    return str(path)


def _export(capsys, *argv):
    run_cli(export.main, [*map(str, argv)])
    return capsys.readouterr().out


def _refused(capsys, *argv) -> str:
    """The one line a refused export prints (and no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(export.main, [*map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


@torch.no_grad()
def _hf_outputs(folder, images, global_pool):
    """transformers' tokens [B, 1 + N, D] and representation [B, D] as the model card says to read them."""
    model = transformers.ViTModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    tokens = model(pixel_values=images).last_hidden_state
    return tokens, tokens[:, 0] if global_pool == "token" else tokens[:, 1:].mean(1)


@pytest.mark.parametrize("arch", [
    dict(model="vit_tiny", patch_size=4, img_size=16, depth=2, global_pool="token"),
    dict(model="vit_small", patch_size=8, img_size=32, depth=1, global_pool="avg"),
])
def test_transformers_loads_the_export_with_our_outputs(tmp_path, capsys, arch):
    torch.manual_seed(0)
    backbone = tiny_vit(**arch)
    ckpt = _checkpoint(tmp_path / "ckpt.pt", backbone)
    out = tmp_path / "hf"
    _export(capsys, ckpt, out, "--format", "hf")
    assert set(os.listdir(out)) == FILES
    size = arch["img_size"]
    images = torch.randn(3, 3, size, size)
    tokens, representation = _hf_outputs(out, images, arch["global_pool"])
    with torch.no_grad():
        torch.testing.assert_close(tokens, backbone.eval().forward_features(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(representation, backbone(images), rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu" and config["qkv_bias"] is True
    assert (config["image_size"], config["patch_size"]) == (size, arch["patch_size"])
    assert config["ssl_vit"]["global_pool"] == arch["global_pool"]
    assert config["ssl_vit"]["representation"] in (out / "README.md").read_text()

    processor = transformers.ViTImageProcessor.from_pretrained(str(out))
    assert processor.resample == 3 and processor.size == {"height": size, "width": size}  # 3: bicubic
    image = Image.fromarray(torch.randint(0, 256, (size, size, 3), dtype=torch.uint8).numpy())
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, to_normalized_tensor(DATA["mean"], DATA["std"])(image), rtol=0, atol=1e-5)


def test_a_dino_export_with_student_holds_the_student(tmp_path, capsys):
    torch.manual_seed(0)
    teacher, student = tiny_vit(), tiny_vit()
    with torch.no_grad():
        for tensor in student.vit.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    state = {"backbone.vit." + k: v.clone() for k, v in student.vit.state_dict().items()}
    ckpt = _checkpoint(tmp_path / "ckpt.pt", teacher, "dino", objective_state=state)
    _export(capsys, ckpt, tmp_path / "hf", "--format", "hf", "--student")
    images = torch.randn(2, 3, 16, 16)
    tokens, _ = _hf_outputs(tmp_path / "hf", images, "token")
    with torch.no_grad():
        torch.testing.assert_close(tokens, student.eval().forward_features(images), rtol=1e-5, atol=1e-5)
    assert "the DINO student" in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("make, message", [
    (lambda: tiny_hybrid(depth=1), "has a ResNet stem (a hybrid)"),
    (lambda: tiny_vit(global_pool="avg", fc_norm=True), "has a norm after averaging (fc_norm, --fc-norm)"),
])
def test_a_hybrid_and_a_norm_after_averaging_are_refused_in_one_line(tmp_path, capsys, make, message):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", make())
    line = _refused(capsys, ckpt, tmp_path / "hf", "--format", "hf")
    assert message in line and f"python -m ssl_vit.export {ckpt} OUT.safetensors" in line
    assert not (tmp_path / "hf").exists()


def _layer_scale(backbone):
    from timm.layers import LayerScale

    backbone.vit.blocks[1].ls2 = LayerScale(backbone.embed_dim, init_values=0.1)


def _qk_norm(backbone):
    backbone.vit.blocks[0].attn.q_norm = torch.nn.LayerNorm(backbone.vit.blocks[0].attn.head_dim)


@pytest.mark.parametrize("change, message", [
    (_layer_scale, "layer scale"),
    (_qk_norm, "qk-norm"),
    (lambda b: setattr(b.vit, "norm", torch.nn.Identity()), "no final LayerNorm"),
    (lambda b: setattr(b.vit, "cls_token", None), "no class token"),
    (lambda b: setattr(b.vit, "num_prefix_tokens", 2), "register or distillation tokens"),
    (lambda b: setattr(b.vit.blocks[0].mlp, "act", torch.nn.GELU(approximate="tanh")), "(not GELU)"),
    (lambda b: setattr(b.vit, "norm_pre", torch.nn.LayerNorm(b.embed_dim)), "a norm before the blocks"),
])
def test_what_transformers_vit_lacks_is_named(change, message):
    from ssl_vit.hf_export import unsupported

    backbone = tiny_vit()
    assert unsupported(backbone) is None
    change(backbone)
    assert message in unsupported(backbone)


def test_register_tokens_of_a_timm_model_are_refused():
    from ssl_vit.backbone import BackboneConfig, build_backbone
    from ssl_vit.hf_export import unsupported

    backbone = build_backbone(BackboneConfig(model="vit_small_patch14_reg4_dinov2", img_size=28, depth=1))
    assert unsupported(backbone) == "register or distillation tokens"


def _records_by_kind(records):
    return {(r.get("k"), r.get("shots"), r.get("protocol")): r for r in records}


def test_the_card_holds_this_checkpoints_records_with_commands_that_reproduce_them(tmp_path, capsys, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.chdir(tmp_path)
    tiny = ["--model", "vit_tiny", "--depth", "2", "--patch-size", "4", "--img-size", "16", "--batch-size", "8",
            "--num-workers", "0", "--steps", "0", "--lr", "0.5", "--no-hflip", "--crop-scale", "0.5", "1.0"]
    ckpt = run_recipe("supervised", argv=[*tiny, "--out", "run"])  # relative: records hold "run/ckpt.pt"
    records, cache = [], ["--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"]
    for module, flags in (("knn", ["--k", "5", "--temperature", "0.1"]), ("fewshot", ["--shots", "2", "--seeds", "2"]),
                          ("linear", ["--epochs", "2", "--bn"])):
        records += importlib.import_module(f"eval.{module}").main([ckpt, *cache, *flags])
    finetune = {"checkpoint": ckpt, "data": "default", "protocol": "paper", "accuracy": 0.3125, "steps": 7,
                "batch_size": 8, "lr": 0.003, "img_size": 16, "fc_norm": False, "crop_scale": [0.35, 1.0]}
    other = {**records[0], "checkpoint": "elsewhere/ckpt.pt", "accuracy": 0.4242}
    (tmp_path / "evals.json").write_text(json.dumps(records + [other]))
    (tmp_path / "finetune.json").write_text(json.dumps([finetune]))
    capsys.readouterr()
    _export(capsys, tmp_path / "run" / "ckpt.pt", tmp_path / "hf", "--format", "hf",
            "--eval-json", tmp_path / "evals.json", tmp_path / "finetune.json")

    card = ModelCard.load(str(tmp_path / "hf" / "README.md"))
    assert card.data.library_name == "transformers" and set(card.data.tags) == {"ssl_vit", "vision-transformer",
                                                                                 "supervised"}
    assert "42.42" not in card.text and "elsewhere" not in card.text  # another checkpoint's record
    assert f"{100 * records[1]['accuracy']:.2f} ± {100 * records[1]['accuracy_std']:.2f}" in card.text
    commands = [line.split("`")[-2] for line in card.text.splitlines() if line.startswith("| ") and "`python" in line]
    assert len(commands) == 4 and "--steps 7 --batch-size 8 --img-size 16 --lr 0.003 --no-fc-norm" in commands[3]
    for command in commands[:3]:  # each derived command gives its record again
        argv = shlex.split(command)
        rerun = importlib.import_module(argv[2]).main([a if a != "CKPT" else ckpt for a in argv[3:]] + cache)
        assert _records_by_kind(rerun).items() <= _records_by_kind(records).items(), command

    pretrain = next(line for line in card.text.splitlines() if line.startswith("accelerate launch recipes/"))
    argv = shlex.split(pretrain)[3:]
    cls = get_objective("supervised")
    again = parse_run_config("supervised", cls.Config, cls.recipe_defaults, argv).to_dict()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert json.loads(json.dumps(again)) == {**saved, "train": {**saved["train"], "out": None}}
    assert "| images seen | 0 (steps x batch size) |" in card.text


def test_an_eval_file_without_this_checkpoints_records_is_refused(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", tiny_vit())
    (tmp_path / "evals.json").write_text(json.dumps([{"checkpoint": "other.pt", "data": "default", "k": 20,
                                                      "accuracy": 0.5}]))
    line = _refused(capsys, ckpt, tmp_path / "hf", "--format", "hf", "--eval-json", tmp_path / "evals.json")
    assert "holds no records of" in line and "other.pt" in line and not (tmp_path / "hf").exists()


class FakeHfApi:
    """Records what the export asks of the Hub; the folder must be complete when it is uploaded."""

    calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw.get("private"), kw.get("exist_ok")))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        self.calls.append(("upload_folder", repo_id, folder_path, set(os.listdir(folder_path))))


def test_push_to_hub_uploads_the_written_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    ckpt = _checkpoint(tmp_path / "ckpt.pt", tiny_vit())
    printed = _export(capsys, ckpt, tmp_path / "hf", "--format", "hf", "--push-to-hub", "someone/tiny-vit", "--private")
    assert FakeHfApi.calls == [("create_repo", "someone/tiny-vit", True, True),
                               ("upload_folder", "someone/tiny-vit", str(tmp_path / "hf"), FILES)]
    assert "uploaded it to someone/tiny-vit" in printed
    assert 'from_pretrained("someone/tiny-vit", add_pooling_layer=False)' in (tmp_path / "hf" / "README.md").read_text()


def test_push_to_hub_without_a_token_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    ckpt = _checkpoint(tmp_path / "ckpt.pt", tiny_vit())
    line = _refused(capsys, ckpt, tmp_path / "hf", "--format", "hf", "--push-to-hub", "someone/tiny-vit")
    assert "huggingface-cli login" in line and "HF_TOKEN" in line
    assert not (tmp_path / "hf").exists() and FakeHfApi.calls == []
    assert set(os.listdir(tmp_path)) == {"ckpt.pt"}


def test_a_folder_that_is_not_an_export_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = _checkpoint(run / "ckpt.pt", tiny_vit())
    (run / "config.json").write_text('{"objective": "supervised"}')
    line = _refused(capsys, ckpt, run, "--format", "hf")
    assert "holds other files and is not an earlier --format hf export" in line
    assert (run / "config.json").read_text() == '{"objective": "supervised"}'
    _export(capsys, ckpt, tmp_path / "hf", "--format", "hf")
    _export(capsys, ckpt, tmp_path / "hf", "--format", "hf")  # an earlier export is replaced
    assert set(os.listdir(tmp_path / "hf")) == FILES and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_hf_flags_need_the_hf_format_and_transformers(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", tiny_vit())
    line = _refused(capsys, ckpt, tmp_path / "x.safetensors", "--push-to-hub", "someone/x")
    assert "--push-to-hub go with --format hf" in line
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert 'pip install -e ".[hf]"' in _refused(capsys, ckpt, tmp_path / "hf", "--format", "hf")
    assert not (tmp_path / "hf").exists()


def test_an_unwritable_folder_is_one_line(tmp_path, capsys, monkeypatch):
    from ssl_vit import hf_export

    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied")

    ckpt = _checkpoint(tmp_path / "ckpt.pt", tiny_vit())
    monkeypatch.setattr(hf_export.tempfile, "mkdtemp", refuse)  # as a folder the user may not write to (not root)
    line = _refused(capsys, ckpt, tmp_path / "hf", "--format", "hf")
    assert "cannot write" in line and "Permission denied" in line
