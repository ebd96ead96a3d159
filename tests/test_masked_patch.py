"""Masked patch prediction: corruption statistics, targets, loss, hybrid blanking, learning, checkpoint."""


import pytest
import torch
import torch.nn.functional as F

from conftest import fit, tiny_hybrid, tiny_vit
from ssl_vit.data import MEAN, STD
from ssl_vit.objectives import DataInfo
from ssl_vit.objectives.masked_patch import (
    KEEP, MASK, NUM_COLORS, RANDOM, TARGETS, UNTOUCHED, MaskedPatchConfig, MaskedPatchPrediction,
)


def objective(backbone, mean=MEAN, std=STD, **cfg):
    data = DataInfo("test", None, None, mean, std, backbone.cfg.img_size)
    return MaskedPatchPrediction(backbone, MaskedPatchConfig(**cfg), data)


def normalise(pixels, mean=MEAN, std=STD):
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def corrupt_at_seed(obj, images, seed):
    """The same draws for the same seed, whatever the images: (tokens [B, N, D], corruption)."""
    torch.manual_seed(seed)
    return obj.corrupt(images)


def smooth_images(n, size, seed=0):
    """Images with structure (upsampled 4x4 colour noise), normalised: [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    return normalise(F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear"))


# ----- corruption -----
def test_corruption_rate_and_split_over_many_draws():
    obj = objective(tiny_vit())
    torch.manual_seed(0)
    cases = torch.cat([obj.draw(64, 64, torch.device("cpu")).case for _ in range(20)])  # [1280, 64]
    corrupted = cases != UNTOUCHED
    assert (corrupted.sum(1) == 32).all()  # exactly round(0.5 * 64) per image
    n = corrupted.sum().item()
    for case, share in ((MASK, 0.8), (RANDOM, 0.1), (KEEP, 0.1)):
        assert abs((cases == case).sum().item() / n - share) < 0.01

    other = objective(tiny_vit(), corruption_rate=0.15, mask_fraction=0.5, random_fraction=0.5, unchanged_fraction=0)
    cases = other.draw(256, 64, torch.device("cpu")).case
    assert ((cases != UNTOUCHED).sum(1) == 10).all()
    assert not (cases == KEEP).any()
    assert abs((cases == MASK).sum().item() / (cases != UNTOUCHED).sum().item() - 0.5) < 0.03


def test_corrupt_replaces_embeddings_and_leaves_the_rest_untouched():
    bb = tiny_vit()
    obj = objective(bb)
    images = torch.randn(8, 3, 16, 16)
    tokens, c = corrupt_at_seed(obj, images, 1)
    clean = bb.embed(images)
    same = (c.case == UNTOUCHED) | (c.case == KEEP)
    assert torch.equal(tokens[same], clean[same])
    assert torch.equal(tokens[c.case == MASK], obj.mask_token.expand(int((c.case == MASK).sum()), -1))
    random = c.case == RANDOM
    assert random.any()
    assert torch.equal(tokens[random], clean.flatten(0, 1)[c.source[random]])
    image_of_source = c.source // 16
    assert (image_of_source[random] != torch.arange(8).unsqueeze(1).expand(-1, 16)[random]).all()  # another image
    assert torch.equal(c.masked.sort(1).values, (c.case != UNTOUCHED).nonzero()[:, 1].view(8, -1))


def test_hybrid_blanked_pixels_do_not_reach_the_network():
    bb = tiny_hybrid()
    obj = objective(bb)
    images = torch.randn(2, 3, 64, 64)
    tokens, c = corrupt_at_seed(obj, images, 2)
    hidden = (c.case[0] == MASK) | (c.case[0] == RANDOM)  # image 0's patches it must not see
    assert hidden.any() and (~hidden).any()
    patches = bb.patchify(images)
    changed = patches.clone()
    changed[0, hidden] = torch.randn_like(changed[0, hidden]) * 5
    tokens2, _ = corrupt_at_seed(obj, bb.unpatchify(changed, (4, 4)), 2)
    assert torch.allclose(tokens[0], tokens2[0])

    visible = patches.clone()  # control: a patch the network does see changes its tokens
    visible[0, ~hidden] += 1.0
    tokens3, _ = corrupt_at_seed(obj, bb.unpatchify(visible, (4, 4)), 2)
    assert not torch.allclose(tokens[0], tokens3[0])


def test_hybrid_mask_patches_get_the_learned_mask_embedding_after_the_stem():
    bb = tiny_hybrid()
    obj = objective(bb)
    images = torch.randn(4, 3, 64, 64)
    tokens, c = corrupt_at_seed(obj, images, 3)
    masked = c.case == MASK
    assert masked.any() and (c.case == RANDOM).any()
    assert torch.equal(tokens[masked], obj.mask_token.expand(int(masked.sum()), -1))  # before position embeddings
    patches = bb.patchify(images)
    stem = bb.embed(bb.unpatchify(obj.apply(patches, c, patches.new_zeros(patches.shape[-1])), (4, 4)))
    assert torch.equal(tokens[~masked], stem[~masked])  # the other tokens: the stem's, of the corrupted pixels
    assert not torch.allclose(tokens[masked], stem[masked])
    obj(dict(image=images))[0].backward()
    assert obj.mask_token.grad is not None and obj.mask_token.grad.abs().sum() > 0


def test_hybrid_checkpoints_from_before_the_mask_embedding_keep_blanking(tmp_path):
    """A hybrid's masked-patch state had no [mask] embedding then: it loads, and corrupts as it did."""
    import dataclasses

    from ssl_vit.checkpoint import load_backbone, load_checkpoint, save_checkpoint
    from ssl_vit.objectives import load_objective

    old = objective(tiny_hybrid(), hybrid_mask="blank")
    assert old.mask_token is None
    config = dataclasses.asdict(old.cfg)
    del config["hybrid_mask"]  # the config as it was saved then
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, old.backbone, objective="masked_patch", objective_config=config, train_config={}, step=1,
                    data=dataclasses.asdict(old.data), objective_state=old.objective_state())
    assert load_checkpoint(path)["objective_config"]["hybrid_mask"] == "blank"
    rebuilt = load_objective(path, expect="masked_patch")
    images = torch.randn(2, 3, 64, 64)
    assert rebuilt.mask_token is None
    assert torch.equal(corrupt_at_seed(rebuilt, images, 4)[0], corrupt_at_seed(old.eval(), images, 4)[0])
    assert torch.equal(load_backbone(path)[0](images), old.backbone(images))


# ----- targets -----
def test_pure_red_patch_is_class_r7_g0_b0():
    obj = objective(tiny_vit())
    pixels = torch.zeros(1, 3, 16, 16)
    pixels[0, 0, :4, :4] = 1.0  # patch 0 pure red; the rest black
    pixels[0, :, :4, 4:8] = 1.0  # patch 1 white
    pixels[0, :, :4, 8:12] = 0.55  # patch 2 grey: level floor(0.55 * 8) = 4 of 8 equal bins
    pixels[0, 1, :4, 12:16] = 0.1  # patch 3 dark green: level 0
    targets = obj.targets(normalise(pixels))
    assert targets.shape == (1, 16)
    assert targets[0, 0] == 7 * 64 + 0 * 8 + 0  # class = r * 64 + g * 8 + b
    assert targets[0, 1] == NUM_COLORS - 1 and targets[0, 4] == 0
    assert targets[0, 2] == 4 * 64 + 4 * 8 + 4 and targets[0, 3] == 0


def test_4x4_target_of_half_black_half_white_patch():
    obj = objective(tiny_vit(patch_size=8), target="color3bit_4x4")  # 8 px patches: each cell averages 2x2
    pixels = torch.zeros(1, 3, 16, 16)
    pixels[0, :, :8, 4:8] = 1.0  # patch 0: left half black, right half white
    targets = obj.targets(normalise(pixels))
    assert targets.shape == (1, 4, 16)
    assert targets[0, 0].view(4, 4).tolist() == [[0, 0, 511, 511]] * 4
    assert (targets[0, 1:] == 0).all()


@pytest.mark.parametrize("target", TARGETS)
def test_targets_do_not_depend_on_the_input_normalisation(target):
    pixels = torch.rand(2, 3, 16, 16)
    other_mean, other_std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    a = objective(tiny_vit(), target=target).targets(normalise(pixels))
    b = objective(tiny_vit(), other_mean, other_std, target=target).targets(normalise(pixels, other_mean, other_std))
    assert torch.allclose(a.float(), b.float(), atol=1e-5)
    if target == "pixels_l2":
        assert a.min() >= 0 and a.max() <= 1


# ----- loss -----
@pytest.mark.parametrize("target", TARGETS)
def test_loss_ignores_uncorrupted_patches(target):
    obj = objective(tiny_vit(), target=target)
    images = torch.randn(4, 3, 16, 16)
    targets = obj.targets(images)
    c = obj.draw(4, 16, torch.device("cpu"))
    predictions = obj.predict(torch.randn(4, c.masked.shape[1], 192))
    loss = obj.loss(predictions, targets, c.masked)

    def changed(where):
        out = targets.clone()
        if target == "pixels_l2":
            out[where] = 1 - out[where]
        else:
            out[where] = (out[where] + 1) % NUM_COLORS
        return out

    assert torch.equal(obj.loss(predictions, changed(c.case == UNTOUCHED), c.masked), loss)
    assert not torch.allclose(obj.loss(predictions, changed(c.case != UNTOUCHED), c.masked), loss)


# ----- learning -----
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("make", [tiny_vit, tiny_hybrid], ids=["vit", "hybrid"])
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(make, target):
    torch.manual_seed(0)
    bb = make()
    obj = objective(bb, target=target)
    batch = {"image": smooth_images(8, bb.cfg.img_size)}
    optimizer = torch.optim.Adam(obj.parameters(), lr=1e-3)

    def loss_at_seed():
        torch.manual_seed(123)  # the same corruption each time
        with torch.no_grad():
            return obj(batch)[0].item()

    before = loss_at_seed()
    _, metrics = fit(obj, batch, optimizer, 8)
    assert set(metrics) == {"color_accuracy", "baseline_accuracy"}
    assert 0 < metrics["baseline_accuracy"] <= 1
    assert loss_at_seed() < 0.9 * before


# ----- user errors -----
def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match=r"r_vit_tiny at image size 16 with a total stride of 16 gives a 1x1 grid"):
        objective(tiny_hybrid(img_size=16))


@pytest.mark.parametrize("bad, message", [
    (dict(target="pixels"), r"--target 'pixels': use one of color3bit, color3bit_4x4, pixels_l2"),
    (dict(corruption_rate=1.0), r"--corruption-rate 1.0 must lie strictly between 0 and 1"),
    (dict(mask_fraction=0.9, random_fraction=0.1, unchanged_fraction=0.1),
     r"--mask-fraction 0.9, --random-fraction 0.1 and --unchanged-fraction 0.1 must be non-negative and add up to 1"),
])
def test_bad_settings_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        objective(tiny_vit(), **bad)


# ----- recipe, checkpoint and picture -----
def test_recipe_writes_a_checkpoint_the_picture_reads(tmp_path):
    from ssl_vit.checkpoint import load_backbone, load_checkpoint, objective_state
    from ssl_vit.objectives import load_objective
    from ssl_vit.train import run_recipe
    from ssl_vit.viz.masked_patch import main

    ckpt = run_recipe("masked_patch", argv=[  # the recipe's defaults
        "--depth", "1", "--steps", "2", "--batch-size", "8", "--num-workers", "0", "--out", str(tmp_path / "run")])
    trained = load_objective(ckpt, expect="masked_patch")
    assert trained.mask_token is not None and trained.head.out_features == NUM_COLORS
    saved = objective_state(load_checkpoint(ckpt))  # the trained head and [mask] embedding, not fresh ones
    assert torch.equal(trained.head.weight, saved["head.weight"]) and torch.equal(trained.mask_token, saved["mask_token"])
    fresh = objective(trained.backbone)
    assert not torch.equal(fresh.head.weight, saved["head.weight"])
    backbone, info = load_backbone(ckpt)
    assert info["objective"] == "masked_patch" and backbone.cfg.global_pool == "avg"
    main([ckpt, "--out", str(tmp_path / "mpp.png"), "--num-images", "2"])
    assert (tmp_path / "mpp.png").read_bytes()[:4] == b"\x89PNG"
