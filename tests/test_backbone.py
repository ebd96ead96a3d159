"""The shared backbone: shapes, the token contract, hybrids and clear errors."""

import pytest
import torch

from conftest import tiny_hybrid, tiny_vit
from ssl_vit.backbone import PRESETS, BackboneConfig, BackboneError, build_backbone


def test_vit_shapes_and_dynamic_size():
    b = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    assert b.forward_features(x).shape == (2, 1 + 16, 192)
    assert b(x).shape == (2, 192)
    # twice the size: 8x8 grid, position embeddings resampled on the fly
    assert b.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 64, 192)


def test_hybrid_shapes():
    b = tiny_hybrid().eval()
    assert b.is_hybrid and b.pixel_patch_size == 16
    assert b.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, 1 + 16, 192)


def test_preset_widths():
    for name, width in [("vit_small", 384), ("r26_vit_small", 384)]:
        b = build_backbone(BackboneConfig(model=name, img_size=64, depth=1))
        assert b.embed_dim == width


def test_encode_subset_returns_class_token_plus_kept_tokens():
    b = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    tokens = b.embed(x)
    keep = torch.tensor([[0, 5, 9], [1, 2, 15]])
    out = b.encode(tokens, b.grid_size(x), keep=keep)
    assert out.shape == (2, 1 + 3, 192)
    # a kept token's output depends only on kept tokens: changing a dropped patch changes nothing
    tokens2 = tokens.clone()
    tokens2[0, 7] += 10.0
    assert torch.allclose(out, b.encode(tokens2, b.grid_size(x), keep=keep))


def test_encode_keeps_each_tokens_own_position():
    """Keeping every token in a shuffled order gives the full encoding's tokens in that order: each
    kept token carries its own patch's position embedding, not that of its place in ``keep``."""
    b = tiny_vit().eval()
    with torch.no_grad():
        b.vit.pos_embed.normal_()  # positions that matter (a fresh learned table is near zero)
    x = torch.randn(2, 3, 16, 16)
    tokens, grid = b.embed(x), b.grid_size(x)
    keep = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    full = b.encode(tokens, grid)
    shuffled = b.encode(tokens, grid, keep=keep)
    expected = torch.gather(b.patch_tokens(full), 1, keep.unsqueeze(-1).expand(-1, -1, 192))
    torch.testing.assert_close(b.patch_tokens(shuffled), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shuffled[:, 0], full[:, 0], rtol=1e-4, atol=1e-5)  # the class token


def test_replaced_embedding_changes_output():
    b = tiny_vit().eval()
    x = torch.randn(1, 3, 16, 16)
    tokens = b.embed(x)
    replaced = tokens.clone()
    replaced[0, 3] = torch.zeros(192)  # e.g. a mask token
    grid = b.grid_size(x)
    assert not torch.allclose(b.encode(tokens, grid), b.encode(replaced, grid))


def test_hybrid_blanked_patch_pixels_do_not_reach_the_network():
    b = tiny_hybrid().eval()
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True  # patch (row 1, col 1): pixels 16..31 x 16..31
    y = x.clone()
    y[:, :, 16:32, 16:32] = torch.randn(1, 3, 16, 16) * 5
    out_x = b.forward_features(b.blank_patches(x, mask))
    out_y = b.forward_features(b.blank_patches(y, mask))
    assert torch.equal(out_x, out_y)
    # without blanking, the convolution stem would have seen the change
    assert not torch.allclose(b.forward_features(x), b.forward_features(y))


def test_patchify_roundtrip():
    b = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    p = b.patchify(x)
    assert p.shape == (2, 16, 4 * 4 * 3)
    assert torch.equal(b.unpatchify(p, (4, 4)), x)


def test_sincos_position_embeddings_are_fixed():
    b = tiny_vit(pos_embed="sincos")
    assert not b.vit.pos_embed.requires_grad
    assert torch.all(b.vit.pos_embed[0, 0] == 0)  # class token position


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(BackboneError) as err:
        build_backbone(BackboneConfig(model="vit_tinyy"))
    for name in PRESETS:
        assert name in str(err.value)


def test_image_size_not_divisible_by_patch():
    with pytest.raises(BackboneError, match="not divisible by the patch size 4; use a multiple of 4"):
        build_backbone(BackboneConfig(model="vit_tiny", patch_size=4, img_size=30, depth=1))


def test_hybrid_grid_must_match_stride():
    with pytest.raises(BackboneError, match="total stride 16"):
        build_backbone(BackboneConfig(model="r_vit_tiny", img_size=60, depth=1))


def test_average_pooling_averages_normalised_tokens_with_no_unused_parameter():
    """As big_vision and MAE: every output token is layer-normalised (mean 0, std 1 before the affine
    part), the representation is their mean, and no parameter sits outside the computation."""
    b = tiny_vit(global_pool="avg").eval()
    x = torch.randn(2, 3, 16, 16)
    tokens = b.forward_features(x)  # [2, 17, 192]; the final norm's affine part is still 1 and 0
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 17), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.std(-1, unbiased=False), torch.ones(2, 17), atol=1e-3, rtol=0)
    torch.testing.assert_close(b(x), b.patch_tokens(tokens).mean(1))
    b(x).sum().backward()
    assert all(p.grad is not None for p in b.parameters() if p.requires_grad)


def test_checkpoints_from_before_the_fc_norm_setting_keep_their_norm_after_averaging(tmp_path):
    from ssl_vit.checkpoint import load_backbone, load_checkpoint, save_checkpoint

    old = tiny_vit(global_pool="avg", fc_norm=True).eval()  # what average pooling was before
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, old, objective="masked_patch", objective_config={}, train_config={}, step=1, data={})
    ckpt = torch.load(path, weights_only=True)
    del ckpt["arch"]["fc_norm"]  # the architecture as it was saved then
    torch.save(ckpt, path)
    assert load_checkpoint(path)["arch"]["fc_norm"] is True
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(load_backbone(path)[0](x), old(x))
