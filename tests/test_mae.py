"""MAE: the encoder sees only visible tokens, unmasking is exact, the loss is on masked patches,
hybrids hide masked pixels from the stem, training lowers the loss, the checkpoint rebuilds it."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fit, tiny_hybrid, tiny_vit
from ssl_vit.checkpoint import load_checkpoint, save_checkpoint
from ssl_vit.data import MEAN, STD
from ssl_vit.masking import random_masking
from ssl_vit.objectives import DataInfo, load_objective
from ssl_vit.objectives.mae import MAE, MAEConfig
from ssl_vit.train import run_recipe
from ssl_vit.viz.mae import main as viz_main


def make_mae(backbone, **cfg) -> MAE:
    data = DataInfo("test", None, None, MEAN, STD, backbone.cfg.img_size)
    return MAE(backbone, MAEConfig(**cfg), data)


def images_for(mae: MAE, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = mae.backbone.cfg.img_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fixed_masking(mae: MAE, images: torch.Tensor, seed: int = 0):
    grid = mae.backbone.grid_size(images)
    gen = torch.Generator().manual_seed(seed)
    return random_masking(len(images), grid[0] * grid[1], mae.cfg.mask_ratio, images.device, gen)


@pytest.mark.parametrize("build", [tiny_vit, tiny_hybrid], ids=["vit", "hybrid"])
def test_encoder_sees_visible_tokens_plus_class_token(build):
    mae = make_mae(build())
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for blk in mae.backbone.vit.blocks]
    try:
        mae({"image": images_for(mae)})
    finally:
        for h in hooks:
            h.remove()
    n = 16  # a 4x4 grid
    visible = n - round(0.75 * n)
    assert seen == [visible + 1] * len(mae.backbone.vit.blocks)


def test_unshuffle_puts_every_token_back():
    mae = make_mae(tiny_vit(), decoder_dim=8, decoder_heads=2)
    b, n, d = 3, 16, 8
    tokens = torch.randn(b, n, d)
    masking = random_masking(b, n, 0.75, tokens.device)
    visible = torch.gather(tokens, 1, masking.keep.unsqueeze(-1).expand(-1, -1, d))
    restored = mae.unshuffle(visible, masking.restore)
    assert torch.equal(restored[~masking.mask], tokens[~masking.mask])
    mask_token = mae.decoder.mask_token.reshape(d).expand(int(masking.mask.sum()), d)
    assert torch.equal(restored[masking.mask], mask_token)


def test_loss_ignores_visible_patches():
    mae = make_mae(tiny_vit())
    images = images_for(mae)
    masking = fixed_masking(mae, images)
    pred = torch.randn(2, 16, mae.backbone.pixel_patch_size ** 2 * 3)
    grid = mae.backbone.grid_size(images)

    def with_new_patches(where):
        patches = mae.backbone.patchify(images)
        patches[where] = torch.randn_like(patches[where])
        return mae.backbone.unpatchify(patches, grid)

    loss = mae.forward_loss(images, pred, masking.mask)
    assert torch.equal(mae.forward_loss(with_new_patches(~masking.mask), pred, masking.mask), loss)
    assert not torch.allclose(mae.forward_loss(with_new_patches(masking.mask), pred, masking.mask), loss)


def test_norm_pix_loss_normalises_each_patch():
    mae = make_mae(tiny_vit())
    images = images_for(mae)
    target = mae.target(images)  # [B, N, p*p*C]
    assert torch.allclose(target.mean(-1), torch.zeros(target.shape[:2]), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(target.shape[:2]), atol=1e-3)
    # Each patch on its own: rescaling and shifting one patch leaves every target unchanged.
    patches = mae.backbone.patchify(images)
    patches[0, 3] = 5.0 * patches[0, 3] + 2.0
    moved = mae.backbone.unpatchify(patches, mae.backbone.grid_size(images))
    assert torch.allclose(mae.target(moved), target, atol=1e-4)
    raw = make_mae(tiny_vit(), norm_pix_loss=False)
    assert torch.equal(raw.target(images), raw.backbone.patchify(images))


def test_hybrid_masked_pixels_do_not_reach_the_network():
    mae = make_mae(tiny_hybrid()).eval()
    images = images_for(mae)
    masking = fixed_masking(mae, images)
    grid = mae.backbone.grid_size(images)

    def encoded(where):
        patches = mae.backbone.patchify(images)
        patches[where] = torch.randn_like(patches[where])
        return mae.forward_encoder(mae.backbone.unpatchify(patches, grid), masking)[0]

    with torch.no_grad():
        base = mae.forward_encoder(images, masking)[0]
        assert torch.equal(encoded(masking.mask), base)
        assert not torch.allclose(encoded(~masking.mask), base)  # the probe can see a change


def smooth_images(mae: MAE, batch: int, seed: int = 0) -> torch.Tensor:
    """Images with structure (upsampled 3x3 noise): a masked patch is predictable from its neighbours."""
    g = torch.Generator().manual_seed(seed)
    size = mae.backbone.cfg.img_size
    return F.interpolate(torch.randn(batch, 3, 3, 3, generator=g), size=size, mode="bicubic", align_corners=True)


class BlindMAE(MAE):
    """The control: a decoder that never sees the encoder (latent zeroed), only positions and the mask."""

    def forward_encoder(self, images, masking=None):
        latent, masking, grid = super().forward_encoder(images, masking)
        return latent * 0, masking, grid


def train_on_fixed_images(cls, steps: int = 160) -> float:
    """Train a tiny MAE on 8 fixed smooth images with fresh masks each step; the loss on a new mask after."""
    torch.manual_seed(0)
    mae = cls(tiny_vit(pos_embed="sincos"), MAEConfig(), DataInfo("test", None, None, MEAN, STD, 16))
    images = smooth_images(mae, 8)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3, betas=(0.9, 0.95))
    fit(mae, {"image": images}, optimizer, steps)
    masking = fixed_masking(mae, images, seed=1)
    with torch.no_grad():
        latent, _, grid = mae.forward_encoder(images, masking)
        return mae.forward_loss(images, mae.forward_decoder(latent, masking.restore, grid), masking.mask).item()


def test_training_uses_what_the_encoder_saw():
    """On smooth images the visible patches tell the masked ones: the trained MAE beats the same
    training with the latent zeroed (which can only learn an average patch per position) and
    predicting zero (a loss of about 1 with per-patch normalised targets)."""
    loss, blind = train_on_fixed_images(MAE), train_on_fixed_images(BlindMAE)
    assert loss < 0.7 * blind and loss < 0.7


@pytest.mark.parametrize("build", [tiny_vit, tiny_hybrid], ids=["vit", "hybrid"])
def test_masked_predictions_depend_on_the_visible_patches(build):
    mae = make_mae(build()).eval()
    images = images_for(mae)
    masking = fixed_masking(mae, images)
    grid = mae.backbone.grid_size(images)
    patches = mae.backbone.patchify(images)
    patches[~masking.mask] += 1.0
    moved = mae.backbone.unpatchify(patches, grid)
    with torch.no_grad():
        pred, pred_moved = (mae.forward_decoder(mae.forward_encoder(x, masking)[0], masking.restore, grid)
                            for x in (images, moved))
    assert not torch.allclose(pred[masking.mask], pred_moved[masking.mask], atol=1e-4)


def test_checkpoint_rebuilds_mae_and_writes_the_reconstruction_png(tmp_path):
    mae = make_mae(tiny_vit(img_size=32, pos_embed="sincos"), decoder_depth=1)
    data = {"name": "default", "num_classes": 10, "class_names": None, "mean": MEAN, "std": STD, "img_size": 32}
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, mae.backbone, objective="mae", objective_config=vars(mae.cfg), train_config={},
                    step=0, data=data, objective_state=mae.objective_state())
    rebuilt = load_objective(path, expect="mae")
    assert rebuilt.backbone.cfg.pos_embed == "sincos"
    images = images_for(mae)
    masking = fixed_masking(mae, images)
    mae.eval(), rebuilt.eval()
    with torch.no_grad():
        preds = [m.forward_decoder(m.forward_encoder(images, masking)[0], masking.restore, (8, 8))
                 for m in (mae, rebuilt)]
    assert torch.equal(*preds)
    png = tmp_path / "recon.png"
    viz_main([path, "--num-images", "2", "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_fresh_mae_run_initialises_the_encoder_as_models_mae(tmp_path):
    """xavier-uniform linears and flattened patch embedding, class token normal(0.02) (timm's
    would give linears std 0.02 and a class token of std 1e-6); --init weights are kept."""
    argv = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--steps", "0"]
    weights = load_checkpoint(run_recipe("mae", argv=[*argv, "--out", str(tmp_path / "mae")]))["state_dict"]
    qkv, patch = weights["blocks.0.attn.qkv.weight"], weights["patch_embed.proj.weight"].flatten(1)
    for w in (qkv, patch):
        bound = math.sqrt(6 / sum(w.shape))  # xavier-uniform: U(-bound, bound), std bound / sqrt(3)
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert patch.abs().max() > 1 / math.sqrt(patch.shape[1])  # beyond PyTorch's default conv bound
    assert weights["cls_token"].std().item() == pytest.approx(0.02, rel=0.3)
    assert not weights["blocks.0.attn.qkv.bias"].any()
    supervised = run_recipe("supervised", argv=[*argv, "--out", str(tmp_path / "sup")])
    kept = load_checkpoint(run_recipe("mae", argv=[*argv, "--init", supervised, "--out", str(tmp_path / "init")]))
    name = "blocks.0.attn.qkv.weight"
    assert torch.equal(kept["state_dict"][name], load_checkpoint(supervised)["state_dict"][name])
