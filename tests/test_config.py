"""Settings: every config validates itself with one ConfigError that names the setting and the
valid values; flags are parsed exactly (no abbreviations; --patch-size=N counts as naming it)."""

import pytest

from ssl_vit.backbone import BackboneConfig
from ssl_vit.config import ConfigError, TrainConfig, parse_run_config
from ssl_vit.objectives.dino import DINOConfig
from ssl_vit.objectives.mae import MAEConfig
from ssl_vit.objectives.masked_patch import MaskedPatchConfig
from ssl_vit.objectives.supervised import SupervisedConfig


@pytest.mark.parametrize("cls, bad, message", [
    (TrainConfig, dict(precision="fp8"), r"--precision 'fp8': use one of auto, no, bf16, fp16"),
    (TrainConfig, dict(on_nonfinite="ignore"), r"--on-nonfinite 'ignore': use one of stop, skip"),
    (TrainConfig, dict(grad_accum=0), r"--grad-accum 0: must be >= 1"),
    (TrainConfig, dict(stop_at=-5), r"--stop-at -5: must be >= 0"),
    (BackboneConfig, dict(global_pool="max"), r"--global-pool 'max': use 'token' or 'avg'"),
    (MAEConfig, dict(mask_ratio=1.0), r"--mask-ratio 1.0: must lie strictly between 0 and 1"),
    (MAEConfig, dict(decoder_dim=130), r"--decoder-dim 130: sin-cos position embeddings need a multiple of 4"),
    (DINOConfig, dict(student_temp=0.0), r"--student-temp 0.0 must be positive"),
    (MaskedPatchConfig, dict(corruption_rate=0.0), r"--corruption-rate 0.0 must lie strictly between 0 and 1"),
    (SupervisedConfig, dict(label_smoothing=1.0), r"--label-smoothing 1.0: use a value in \[0, 1\)"),
])
def test_configs_refuse_bad_values_by_name(cls, bad, message):
    with pytest.raises(ConfigError, match=message):
        cls(**bad)


def test_unknown_setting_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown settings \['stepz'\].*valid: .*steps"):
        parse_run_config("supervised", SupervisedConfig, {"stepz": 3}, argv=[])


@pytest.mark.parametrize("argv, patch", [([], None), (["--patch-size", "8"], 8), (["--patch-size=8"], 8)])
def test_a_hybrid_keeps_its_own_patch_unless_one_is_named(argv, patch):
    recipe = {"model": "r_vit_tiny", "patch_size": 4}  # a recipe's small-image patch, meant for plain ViTs
    run = parse_run_config("supervised", SupervisedConfig, recipe, argv=argv)
    assert run.backbone.patch_size == patch
    plain = parse_run_config("supervised", SupervisedConfig, {**recipe, "model": "vit_tiny"}, argv=argv)
    assert plain.backbone.patch_size == (patch or 4)


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_run_config("supervised", SupervisedConfig, {}, argv=["--step", "2"])
    assert "unrecognized arguments: --step 2" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("steps = 2.7", r"steps = 2.7 in .*run.toml: expected a whole number"),
    ('hflip = "no"', r"hflip = 'no' in .*run.toml: expected a boolean \(true or false\)"),
    ("crop_scale = 0.5", r"crop_scale = 0.5 in .*run.toml: expected a list of 2 numbers"),
    ('init = 3', r"init = 3 in .*run.toml: expected a string or null"),
    ("steps = = 3", r"--config .*run.toml is not valid TOML"),
])
def test_config_file_values_are_checked_against_their_types(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        parse_run_config("supervised", SupervisedConfig, {}, argv=["--config", str(path)])


def test_config_file_values_of_the_right_type_are_used(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"train": {"steps": 3, "lr": 1, "crop_scale": [0.5, 1]}, "backbone": {"patch_size": null}}')
    run = parse_run_config("supervised", SupervisedConfig, {}, argv=["--config", str(path)])
    assert (run.train.steps, run.train.lr, run.train.crop_scale) == (3, 1.0, (0.5, 1.0))
    assert isinstance(run.train.lr, float)


def test_a_runs_saved_config_json_is_a_valid_config_file(tmp_path):
    from ssl_vit.train import run_recipe

    run_recipe("dino", argv=["--steps", "0", "--depth", "1", "--out-dim", "32", "--num-workers", "0",
                             "--out", str(tmp_path / "run")])
    again = parse_run_config("dino", DINOConfig, {}, argv=["--config", str(tmp_path / "run" / "config.json")])
    assert again.objective_config.out_dim == 32 and again.backbone.depth == 1
