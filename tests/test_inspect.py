"""python -m eval.inspection: attention distance, rollout, position similarity, filters, the figures."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.evaluation.attention import (
    FROM_CLASS,
    FROM_PATCH_MEAN,
    attention_rollout,
    mean_attention_distance,
    patch_distances,
    record_attention,
    rollout_map,
)
from ssl_vit.evaluation.embeddings import first_layer_filters, position_similarity, similarity_by_distance
from eval.inspection import image_loader, inspect_checkpoint, main
from eval.inspection_figures import plot_rollout
from ssl_vit.checkpoint import load_backbone, save_checkpoint
from ssl_vit.data import load_data
from tests.conftest import tiny_hybrid, tiny_vit

GRID, PATCH_PX, PREFIX = (4, 5), 4, 1
T = PREFIX + GRID[0] * GRID[1]


def brute_force_mean_pairwise_distance(grid, patch_px):
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    return np.mean([patch_px * np.hypot(a[0] - b[0], a[1] - b[1]) for a in cells for b in cells])


def test_identity_attention_has_zero_distance():
    attn = torch.eye(T).expand(2, 3, T, T)
    dist = mean_attention_distance(attn, patch_distances(GRID, PATCH_PX), PREFIX)
    assert dist.shape == (2, 3)
    assert torch.allclose(dist, torch.zeros(2, 3))


def test_uniform_attention_gives_the_grids_mean_pairwise_distance():
    attn = torch.full((2, 3, T, T), 1.0 / T)  # class-token key included: removed and renormalised
    dist = mean_attention_distance(attn, patch_distances(GRID, PATCH_PX), PREFIX)
    expected = brute_force_mean_pairwise_distance(GRID, PATCH_PX)
    assert torch.allclose(dist, torch.full((2, 3), expected, dtype=torch.float32), atol=1e-4)


def test_rollout_of_identity_is_identity_and_of_uniform_mixes_half():
    eye = torch.eye(T).expand(2, 3, T, T)
    assert torch.allclose(attention_rollout([eye, eye, eye]), torch.eye(T).expand(2, T, T))
    uniform = torch.full((2, 3, T, T), 1.0 / T)
    expected = 0.5 * torch.eye(T) + 0.5 / T  # (A + I) renormalised, one layer
    assert torch.allclose(attention_rollout([uniform]), expected.expand(2, T, T), atol=1e-6)
    assert rollout_map(attention_rollout([eye]), PREFIX, GRID, FROM_CLASS).shape == (2, *GRID)


def test_rollout_map_reads_the_class_row_or_the_mean_of_the_patch_rows():
    rollout = torch.rand(2, T, T)
    by_hand = rollout[:, PREFIX:, PREFIX:].sum(dim=1) / (T - PREFIX)  # patch rows, patch columns
    assert torch.allclose(rollout_map(rollout, PREFIX, GRID, FROM_PATCH_MEAN), by_hand.reshape(2, *GRID))
    assert torch.equal(rollout_map(rollout, PREFIX, GRID, FROM_CLASS), rollout[:, 0, PREFIX:].reshape(2, *GRID))


def test_recorded_attention_reproduces_the_fused_attention_output():
    torch.manual_seed(0)
    backbone = tiny_vit().eval()
    attn = backbone.vit.blocks[1].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = backbone.forward_features(images)
        with record_attention(backbone) as layers:
            recorded = backbone.forward_features(images)
    handle.remove()
    assert torch.equal(plain, recorded)  # reading attention leaves the forward pass alone
    assert len(layers) == 2 and layers[1].shape == (2, 3, 17, 17)
    assert torch.allclose(layers[1].sum(-1), torch.ones(2, 3, 17))
    b, n, c = seen["x"].shape
    v = attn.qkv(seen["x"]).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    rebuilt = attn.proj((layers[1] @ v).transpose(1, 2).reshape(b, n, c))
    assert torch.allclose(rebuilt, seen["out"], atol=1e-5)


def test_sincos_position_embeddings_make_neighbours_more_similar_than_distant_patches():
    backbone = tiny_vit(pos_embed="sincos", img_size=32)  # 8x8 grid of 2-D sin-cos embeddings
    sim = position_similarity(backbone)
    assert sim.shape == (64, 64)
    assert torch.allclose(sim.diagonal(), torch.ones(64), atol=1e-5)
    by_distance = similarity_by_distance(sim, backbone.base_grid)
    assert by_distance[1] > by_distance[3] > by_distance[6]
    # the patch at row 3, column 3: its 4 neighbours beat the 4 grid corners
    maps = sim.reshape(8, 8, 8, 8)[3, 3]
    neighbours = torch.stack([maps[2, 3], maps[4, 3], maps[3, 2], maps[3, 4]])
    corners = torch.stack([maps[0, 0], maps[0, 7], maps[7, 0], maps[7, 7]])
    assert neighbours.min() > corners.max()


def test_filters_are_patch_embedding_components_or_the_hybrid_stem():
    vit = first_layer_filters(tiny_vit())
    assert vit.images.shape == (28, 3, 4, 4)
    flat = vit.images.flatten(1)
    assert torch.allclose(flat @ flat.T, torch.eye(28), atol=1e-4)  # orthonormal components
    assert vit.explained_variance_ratio == sorted(vit.explained_variance_ratio, reverse=True)
    hybrid = first_layer_filters(tiny_hybrid())
    assert hybrid.images.shape[1] == 3 and hybrid.images.shape[-1] == 7
    assert "convolution" in hybrid.title and hybrid.explained_variance_ratio == []


def _save(path, backbone):
    save_checkpoint(str(path), backbone, objective="supervised", objective_config={}, train_config={},
                    step=7, data={"name": "default"})


def test_cli_writes_every_figure_with_one_panel_per_checkpoint(tmp_path):
    torch.manual_seed(0)
    _save(tmp_path / "vit" / "ckpt.pt", tiny_vit())
    _save(tmp_path / "hybrid" / "ckpt.pt", tiny_hybrid())
    out = tmp_path / "inspect"
    payload = main([str(tmp_path / "vit" / "ckpt.pt"), str(tmp_path / "hybrid"), "--data", "default",
                    "--out", str(out), "--images", "6", "--rollout-images", "2", "--batch-size", "4"])

    expected_panels = {"filters.png": 2, "position_similarity.png": 2, "attention_distance.png": 2,
                       "attention_rollout.png": 2 * (1 + 2)}
    for name, panels in expected_panels.items():
        with Image.open(out / name) as img:
            img.verify()
        assert payload["figures"][name]["panels"] == panels

    saved = json.loads((out / "inspect.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    vit, hybrid = saved["checkpoints"]
    assert (vit["name"], hybrid["name"]) == ("vit", "hybrid")
    assert vit["num_images"] == 6 and vit["step"] == 7
    for ckpt, patch_px in ((vit, 4), (hybrid, 16)):
        dist = np.array(ckpt["attention_distance"]["mean_px"])
        assert dist.shape == (2, 3)  # 2 layers x 3 heads
        assert ckpt["pixel_patch_size"] == patch_px and ckpt["grid"] == [4, 4]
        # a random-init network attends almost uniformly: every head near the grid's mean pairwise distance
        uniform = brute_force_mean_pairwise_distance((4, 4), patch_px)
        np.testing.assert_allclose(dist, uniform, rtol=0.05)
        assert np.array(ckpt["rollout"]["maps"]).shape == (2, 4, 4) and ckpt["rollout"]["from"] == FROM_CLASS
        assert np.array(ckpt["position_similarity"]["matrix"]).shape == (16, 16)


@pytest.mark.parametrize("pool, source", [("avg", FROM_PATCH_MEAN), ("token", FROM_CLASS)])
def test_rollout_of_a_checkpoint_starts_from_its_representations_query(tmp_path, pool, source):
    """Average pooling never uses the class token: its rollout is the mean of the patch rows."""
    torch.manual_seed(0)
    path = tmp_path / pool / "ckpt.pt"
    _save(path, tiny_vit(global_pool=pool))
    data = load_data("default")
    result = inspect_checkpoint(str(path), data, 2, 2, 2, torch.device("cpu"))
    backbone, _ = load_backbone(str(path))
    images = next(iter(image_loader(data, 16, 2, 2)))["image"]
    with torch.no_grad(), record_attention(backbone) as layers:
        backbone.forward_features(images)
    rollout = attention_rollout(layers)  # [2, 17, 17]
    rows = rollout[:, 0, 1:] if pool == "token" else rollout[:, 1:, 1:].mean(dim=1)
    assert result.rollout_from == source
    torch.testing.assert_close(result.rollout_maps, rows.reshape(2, 4, 4), rtol=0, atol=1e-6)
    titles = [ax.get_title() for ax in plot_rollout([result]).axes[1::2]]  # the map panels of both rows
    assert len(titles) == 2 and all(t.endswith(f"rollout from {source}") for t in titles)


def test_cli_rejects_a_zero_image_count(tmp_path):
    with pytest.raises(ValueError, match="--images 0"):
        main(["timm:vit_tiny_patch16_224", "--out", str(tmp_path), "--images", "0"])
