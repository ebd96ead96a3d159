"""MAE reconstructions as a PNG grid: one row per image, columns original | masked | reconstruction.

    python -m ssl_vit.viz.mae runs/mae/ckpt.pt --data ../shared/data/cifar10 --out docs/mae_reconstruction.png

The reconstruction pastes the decoder's prediction into the masked patches and keeps the visible
ones, as the MAE paper's figures do. With ``norm_pix_loss`` the decoder predicts each patch
normalised by its own mean and standard deviation, so the prediction is mapped back to pixels
with the true patch's statistics (the picture then shows structure, not the patch's mean colour).
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..data import denormalize, eval_transform, load_data  # noqa: E402
from ..errors import run_cli  # noqa: E402
from ..masking import random_masking  # noqa: E402
from ..objectives import load_objective  # noqa: E402
from ..objectives.mae import MAE, patch_stats  # noqa: E402

MASKED_GREY = 0.5  # pixel value shown for hidden patches


@torch.no_grad()
def reconstruct(mae: MAE, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """images: [B, C, H, W] normalised -> {"original", "masked", "reconstruction"}, each [B, C, H, W] in 0..1."""
    mae.eval()
    bb = mae.backbone
    grid = bb.grid_size(images)
    gen = torch.Generator(device=images.device).manual_seed(seed)
    masking = random_masking(len(images), grid[0] * grid[1], mae.cfg.mask_ratio, images.device, gen)
    latent, _, _ = mae.forward_encoder(images, masking)
    pred = mae.forward_decoder(latent, masking.restore, grid)  # [B, N, p*p*C]
    patches = bb.patchify(images)
    if mae.cfg.norm_pix_loss:
        mean, std = patch_stats(patches)
        pred = pred * std + mean
    hidden = masking.mask.unsqueeze(-1)  # [B, N, 1]

    def to_pixels(p: torch.Tensor) -> torch.Tensor:  # [B, N, p*p*C] -> [B, C, H, W] in 0..1
        return denormalize(bb.unpatchify(p, grid), mae.data.mean, mae.data.std).clamp(0, 1)

    original = to_pixels(patches)
    hidden_pixels = bb.unpatchify(hidden.expand_as(patches).to(images.dtype), grid).bool()  # [B, C, H, W]
    return {
        "original": original,
        "masked": original.masked_fill(hidden_pixels, MASKED_GREY),
        "reconstruction": to_pixels(torch.where(hidden, pred, patches)),
    }


def save_grid(columns: dict[str, torch.Tensor], out: str) -> None:
    """Write the images of ``columns`` ({title: [B, C, H, W] in 0..1}) as rows of a PNG."""
    titles = list(columns)
    rows = len(columns[titles[0]])
    fig, axes = plt.subplots(rows, len(titles), figsize=(1.6 * len(titles), 1.6 * rows), squeeze=False)
    for j, title in enumerate(titles):
        axes[0, j].set_title(title, fontsize=9)
        for i in range(rows):
            axes[i, j].imshow(columns[title][i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            axes[i, j].axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="ckpt.pt written by recipes/mae.py")
    parser.add_argument("--data", default="default", help="data set to draw the images from (as --data of the recipes)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    parser.add_argument("--out", default="mae_reconstruction.png")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num-images {args.num_images}: need at least 1")

    mae = load_objective(args.checkpoint, expect="mae")
    source = load_data(args.data)
    split = source.test if args.split == "test" and source.test is not None else source.train
    transform = eval_transform(mae.backbone.cfg.img_size, mae.data.mean, mae.data.std)
    rows = split.select(range(min(args.num_images, len(split))))
    images = torch.stack([transform(row[source.image_column].convert("RGB")) for row in rows])
    save_grid(reconstruct(mae, images, args.seed), args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    run_cli(main)
