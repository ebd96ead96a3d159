"""The four figures of ``python -m eval.inspection``, one panel (or column) per checkpoint.

Each function takes the per-checkpoint ``Inspection`` results and returns a matplotlib Figure;
``panel_count`` counts its panels (colour bars excluded).
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # used without pyplot: no GUI backend, nothing to close
from torchvision.utils import make_grid

from ssl_vit.evaluation.attention import CLASS_TOKEN_HANDLING

if TYPE_CHECKING:
    from .inspection import Inspection

PANEL_INCHES = 3.2
FILTERS_PER_ROW = 7  # 28 filters as 4 rows of 7, as in the paper
CHARS_PER_PANEL = 55  # wrap width of a note at font size 7


def panel_count(fig: Figure) -> int:
    """Panels of a figure: its axes that are not colour bars."""
    return sum(1 for ax in fig.axes if ax.get_label() != "<colorbar>")


def _title(r: Inspection, what: str = "") -> str:
    head = f"{r.name}\n{r.objective}, step {r.step}"
    return head + ("\n" + textwrap.fill(what, 42) if what else "")


def _row(n: int, height: float = PANEL_INCHES) -> tuple[Figure, Sequence[Axes]]:
    fig = Figure(figsize=(PANEL_INCHES * n, height), layout="constrained")
    return fig, fig.subplots(1, n, squeeze=False)[0]


def plot_filters(results: Sequence[Inspection]) -> Figure:
    """Each checkpoint's first-layer filters (or their principal components), each scaled to 0..1."""
    fig, axes = _row(len(results), PANEL_INCHES - 0.4)
    for ax, r in zip(axes, results):
        mosaic = make_grid(r.filters.images, nrow=FILTERS_PER_ROW, padding=1, normalize=True, scale_each=True, pad_value=1.0)
        ax.imshow(mosaic.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(_title(r, r.filters.title), fontsize=8)
        ax.axis("off")
    return fig


def plot_position_similarity(results: Sequence[Inspection]) -> Figure:
    """For each position (small map at its place on the grid), its cosine similarity with every other."""
    fig, axes = _row(len(results), PANEL_INCHES + 0.5)
    for ax, r in zip(axes, results):
        h, w = r.base_grid
        maps = r.similarity.reshape(h * w, 1, h, w)
        mosaic = make_grid(maps, nrow=w, padding=1, pad_value=float("nan"))[0]
        im = ax.imshow(mosaic.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([j * (w + 1) + 1 + (w - 1) / 2 for j in range(w)], [str(j + 1) for j in range(w)], fontsize=6)
        ax.set_yticks([i * (h + 1) + 1 + (h - 1) / 2 for i in range(h)], [str(i + 1) for i in range(h)], fontsize=6)
        ax.set_xlabel("input patch column")
        ax.set_title(_title(r, "position embedding similarity"), fontsize=8)
    axes[0].set_ylabel("input patch row")
    fig.colorbar(im, ax=list(axes), label="cosine similarity", shrink=0.7)
    return fig


def plot_attention_distance(results: Sequence[Inspection]) -> Figure:
    """Mean attention distance of every head (one dot each) against depth."""
    fig, axes = _row(len(results), PANEL_INCHES + 0.6)
    for ax, r in zip(axes, results):
        dist = r.distance  # [L, H]
        layers = torch.arange(1, dist.shape[0] + 1).unsqueeze(1).expand_as(dist)
        ax.scatter(layers.flatten(), dist.flatten(), s=12, alpha=0.7, label="one head")
        ax.axhline(r.uniform_distance, ls="--", c="grey", lw=1, label="uniform attention")
        ax.set_xlabel("network depth (layer)")
        ax.set_ylim(0, max(r.max_distance, float(dist.max())) * 1.05)
        ax.set_xticks(range(1, dist.shape[0] + 1), [str(i) for i in range(1, dist.shape[0] + 1)], fontsize=7)
        ax.set_title(_title(r, f"{r.pixel_patch_size} px patches, {r.num_images} images"), fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    axes[0].set_ylabel("mean attention distance (pixels)")
    fig.supxlabel(textwrap.fill("Class token: " + CLASS_TOKEN_HANDLING + ".", CHARS_PER_PANEL * len(results)), fontsize=7)
    return fig


def plot_rollout(results: Sequence[Inspection]) -> Figure:
    """Rows: images; columns: the image, then each checkpoint's rollout map (from the class token or
    the patch mean, as its panels say; upsampled to the image and scaled to 0..1) over it."""
    n_img = min(len(r.rollout_maps) for r in results)
    fig = Figure(figsize=(2.0 * (1 + len(results)), 2.0 * n_img + 0.6), layout="constrained")
    axes = fig.subplots(n_img, 1 + len(results), squeeze=False)
    for i in range(n_img):
        axes[i, 0].imshow(results[0].rollout_images[i].permute(1, 2, 0).numpy())
        for ax, r in zip(axes[i, 1:], results):
            image = r.rollout_images[i]
            heat = F.interpolate(r.rollout_maps[i][None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
            ax.imshow(image.permute(1, 2, 0).numpy())
            ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6)
            head = f"{r.name}\n{r.objective}, step {r.step}\n" if i == 0 else ""
            ax.set_title(f"{head}rollout from {r.rollout_from}", fontsize=7)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    title = ("attention rollout from the class token's row, or for average pooling the mean of the patch "
             "rows (heads averaged, identity added, layers multiplied), upsampled, each map scaled to its own "
             "min..max")
    fig.suptitle(textwrap.fill(title, 30 * (1 + len(results))), fontsize=7)
    return fig


FIGURES = {
    "filters.png": plot_filters,
    "position_similarity.png": plot_position_similarity,
    "attention_distance.png": plot_attention_distance,
    "attention_rollout.png": plot_rollout,
}
