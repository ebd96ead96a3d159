"""ckpt.pt: safe to load, rebuilt by one loader, exported for timm, with clear errors."""

import dataclasses
import json

import pytest
import timm
import torch
from safetensors import safe_open
from timm.layers import resample_abs_pos_embed

from conftest import tiny_hybrid, tiny_vit
from ssl_vit.checkpoint import (CheckpointError, backbone_info, export_safetensors, init_weights, load_backbone,
                                load_checkpoint, load_weights, save_checkpoint)


def _save(path, backbone):
    save_checkpoint(str(path), backbone, objective="supervised", objective_config={}, train_config={}, step=7,
                    data={"name": "default"})
    return str(path)


@pytest.mark.parametrize("make, size", [(tiny_vit, 16), (tiny_hybrid, 64)])
def test_roundtrip_rebuilds_the_same_backbone(tmp_path, make, size):
    backbone = make().eval()
    path = _save(tmp_path / "ckpt.pt", backbone)
    torch.load(path, weights_only=True)
    rebuilt, info = load_backbone(path)
    x = torch.randn(2, 3, size, size)
    assert torch.equal(rebuilt(x), backbone(x))
    assert info["step"] == 7 and info["arch"] == dataclasses.asdict(backbone.cfg)


def test_safetensors_export_loads_in_timm(tmp_path):
    backbone = tiny_vit().eval()
    out = tmp_path / "backbone.safetensors"
    export_safetensors(_save(tmp_path / "ckpt.pt", backbone), str(out))
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    model = timm.create_model(meta["timm_name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              **json.loads(meta["timm_kwargs"])).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model(x), backbone(x), atol=1e-5)
    assert torch.equal(load_backbone(str(out))[0](x), backbone(x))
    for spec in (str(out), str(tmp_path / "ckpt.pt")):  # the facts the checkpoint was saved with, nothing built
        info = backbone_info(spec)
        assert info["arch"] == dataclasses.asdict(backbone.cfg)
        assert (info["objective"], info["step"], info["data"]) == ("supervised", 7, {"name": "default"})
    timm_info = backbone_info("timm:vit_tiny_patch16_224")
    assert (timm_info["arch"]["model"], timm_info["objective"], timm_info["step"]) == \
        ("vit_tiny_patch16_224", "random-init", 0)


def test_timm_name_gives_a_random_init_backbone():
    backbone, info = load_backbone("timm:vit_tiny_patch16_224")
    assert backbone.embed_dim == 192 and info["objective"] == "random-init"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt is not a readable ssl_vit checkpoint"):
        load_checkpoint(str(tmp_path / "notes.txt"))
    torch.save({"model": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt is a PyTorch file but not an ssl_vit checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_truncated_checkpoint(tmp_path):
    path = _save(tmp_path / "ckpt.pt", tiny_vit())
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_weights_of_another_architecture(tmp_path):
    small = load_checkpoint(_save(tmp_path / "ckpt.pt", tiny_vit()))["state_dict"]
    with pytest.raises(CheckpointError, match="another architecture"):
        load_weights(tiny_vit(depth=3), small)


def test_init_with_a_norm_after_averaging_starts_it_fresh_and_drops_the_final_norm():
    """MAE's fine-tuning (models_vit.py, global_pool): the pretrained final norm is deleted and the
    norm after averaging starts as a fresh LayerNorm (weight 1, bias 0); every other weight is loaded."""
    source = tiny_vit().eval()
    with torch.no_grad():
        source.vit.norm.weight.normal_()  # a trained final norm
    target = tiny_vit(global_pool="avg", fc_norm=True)
    state = init_weights(target, source)
    assert not any(k.startswith("norm.") for k in state)
    assert torch.equal(state["fc_norm.weight"], torch.ones(192)) and not state["fc_norm.bias"].any()
    load_weights(target, state)
    kept = source.vit.state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in target.vit.state_dict().items() if not k.startswith("fc_norm."))


def test_higher_resolution_resamples_position_embeddings(tmp_path):
    low = tiny_vit().eval()
    with torch.no_grad():
        low.vit.pos_embed.normal_()  # a table with content to resample
    high = tiny_vit(img_size=32)
    load_weights(high, low.vit.state_dict())
    # timm's 2-D resampling of the 4x4 grid to 8x8 (bicubic), the class token kept apart
    expected = resample_abs_pos_embed(low.vit.pos_embed, new_size=(8, 8), old_size=(4, 4), num_prefix_tokens=1)
    assert torch.equal(high.vit.pos_embed, expected)
    assert torch.equal(high.vit.pos_embed[:, 0], low.vit.pos_embed[:, 0])
    # every other weight is loaded as it is
    low_state, high_state = low.vit.state_dict(), high.vit.state_dict()
    assert all(torch.equal(low_state[k], high_state[k]) for k in low_state if k != "pos_embed")


def test_short_names_of_checkpoints_and_data():
    from ssl_vit.names import folder_safe, short_name

    assert short_name("runs/mae-x/ckpt.pt") == "mae-x" and short_name("timm:vit_tiny_patch16_224") == "vit_tiny_patch16_224"
    assert short_name("out/backbone.safetensors") == "backbone" and short_name("../shared/data/cifar10/") == "cifar10"
    assert short_name("data/digits.parquet") == "digits" and short_name("user/some-set") == "some-set"
    assert folder_safe("some-set v2") == "some_set_v2"


def test_version_1_checkpoints_still_rebuild_their_objective(tmp_path):
    """Version 1 kept each objective's tensors under its own key (head_state_dict, ...)."""
    from ssl_vit.data import MEAN, STD
    from ssl_vit.objectives import DataInfo, load_objective
    from ssl_vit.objectives.supervised import Supervised, SupervisedConfig

    data = DataInfo("default", 10, None, MEAN, STD, 16)
    model = Supervised(tiny_vit(), SupervisedConfig(), data)
    path = str(tmp_path / "ckpt.pt")
    legacy = {"head_state_dict": {k[len("head."):]: v for k, v in model.objective_state().items()}}
    save_checkpoint(path, model.backbone, objective="supervised", objective_config={}, train_config={}, step=1,
                    data=dataclasses.asdict(data), extra=legacy)
    ckpt = load_checkpoint(path)
    del ckpt["objective_state"]
    rebuilt = load_objective(ckpt)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(rebuilt.logits(x), model.eval().logits(x))
    with pytest.raises(CheckpointError, match="is a supervised checkpoint: only DINO and MSN runs have a student"):
        export_safetensors(path, str(tmp_path / "student.safetensors"), student=True)
    with pytest.raises(CheckpointError, match="is a supervised checkpoint; pass a ckpt.pt written by recipes/mae.py"):
        load_objective(path, expect="mae")
