"""Picture of masked patch prediction: images, their corrupted version, the targets and the predictions.

    python -m ssl_vit.viz.masked_patch runs/mpp/ckpt.pt --data ../shared/data/cifar10 --out docs/masked_patch.png

Rows: the image; what the network gets (a [mask] patch drawn grey, a random patch drawn with
the other image's pixels it was taken from, an unchanged patch as it is); the target of each
corrupted patch (3-bit mean colours, 4x4 cells or pixels); the prediction from its output token.
Corrupted patches are outlined and uncorrupted ones faded in the last two rows. The head and the [mask] embedding come from
the checkpoint (``ssl_vit.objectives.load_objective``).
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ..data import ImageDataset, denormalize, eval_transform, load_data  # noqa: E402
from ..errors import UserError, run_cli  # noqa: E402
from ..objectives import load_objective  # noqa: E402
from ..objectives.masked_patch import (  # noqa: E402
    CELLS, UNTOUCHED, MaskedPatchPrediction, class_colors, take,
)

Row = tuple[str, torch.Tensor]  # (title, images [B, 3, H, W] in 0..1)
MASK_GREY = 0.5  # how a [mask] patch is drawn
FADE = 0.25  # uncorrupted patches in the target and prediction rows: this much of the image, the rest white


def patch_pixels(objective: MaskedPatchPrediction, values: torch.Tensor) -> torch.Tensor:
    """Targets or predictions of M patches [B, M, ...] -> their pixels [B, M, p*p*3] in 0..1.

    Colour classes [B, M] or [B, M, 16] (predictions: logits, reduced by argmax) become flat
    colours or 4x4 cells scaled to the patch (nearest neighbour); pixels are clamped to 0..1.
    """
    target, p = objective.cfg.target, objective.backbone.pixel_patch_size
    if target == "pixels_l2":
        return values.clamp(0, 1)
    if values.is_floating_point():
        values = values.argmax(-1)
    rgb = class_colors(values)  # [B, M, 3] or [B, M, 16, 3]
    if target == "color3bit":
        return rgb.unsqueeze(-2).expand(*rgb.shape[:-1], p * p, 3).flatten(-2)
    b, m = rgb.shape[:2]
    cells = rgb.reshape(b * m, CELLS, CELLS, 3).permute(0, 3, 1, 2)
    patch = F.interpolate(cells, size=(p, p), mode="nearest")  # [B*M, 3, p, p]
    return patch.permute(0, 2, 3, 1).reshape(b, m, p * p * 3)


@torch.no_grad()
def panels(objective: MaskedPatchPrediction, images: torch.Tensor) -> tuple[list[Row], torch.Tensor]:
    """Normalised images [B, C, H, W] -> (the picture's rows as (title, images [B, 3, H, W] in 0..1),
    corrupted [B, h, w] bool)."""
    bb, data = objective.backbone, objective.data
    grid = bb.grid_size(images)
    tokens, corruption = objective.corrupt(images)
    features = bb.patch_tokens(bb.encode(tokens, grid))
    predictions = objective.predict(take(features, corruption.masked))
    targets = take(objective.targets(images), corruption.masked)

    patches = bb.patchify(denormalize(images, data.mean, data.std).clamp(0, 1))  # [B, N, p*p*3]
    grey = patches.new_full(patches.shape[-1:], MASK_GREY)
    faded = torch.where(corruption.case.unsqueeze(-1) == UNTOUCHED, FADE * patches + (1 - FADE), patches)
    rows = [("image", patches), ("corrupted input", objective.apply(patches, corruption, grey))]
    for title, values in (("target", targets), ("prediction", predictions)):
        out = faded.clone()
        out[torch.arange(len(out)).unsqueeze(1), corruption.masked] = patch_pixels(objective, values)
        rows.append((title, out))
    corrupted = (corruption.case != UNTOUCHED).view(-1, *grid)
    return [(title, bb.unpatchify(x, grid)) for title, x in rows], corrupted


def draw(rows: list[Row], corrupted: torch.Tensor, out: str, title: str) -> None:
    """One column per image; the corrupted patches [B, h, w] are outlined in the last two rows."""
    n = len(rows[0][1])
    p = rows[0][1].shape[-1] // corrupted.shape[-1]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.6 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for i, j in corrupted[c].nonzero().tolist() if r >= 2 else []:
                ax.add_patch(Rectangle((j * p - 0.5, i * p - 0.5), p, p, fill=False, edgecolor="black", lw=0.6))
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="ckpt.pt written by recipes/masked_patch.py")
    parser.add_argument("--data", help="data set to draw images from (default: the checkpoint's)")
    parser.add_argument("--out", default="masked_patch.png", help="PNG file to write")
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="seed of the corruption")
    args = parser.parse_args(argv)

    objective = load_objective(args.checkpoint, expect="masked_patch")
    data = objective.data
    source = load_data(args.data or data.name)
    split = source.test if source.test is not None else source.train
    transform = eval_transform(data.img_size, data.mean, data.std)
    ds = ImageDataset(split, source.image_column, None, transform, split="test")
    if args.num_images < 1 or args.num_images > len(ds):
        raise UserError(f"--num-images {args.num_images}: use 1 to {len(ds)}")
    images = torch.stack([ds[i]["image"] for i in range(args.num_images)])
    torch.manual_seed(args.seed)
    cfg = objective.cfg
    draw(*panels(objective, images), args.out,
         f"masked patch prediction ({cfg.target}, {cfg.corruption_rate:.0%} corrupted)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
