"""The two figures of ``python -m eval.embedding``: the 2-D map of the test features, and the
nearest training images of a few test images.

Each function takes the ``View`` of every (checkpoint, data set) and returns a matplotlib Figure.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # used without pyplot: no GUI backend, nothing to close
from matplotlib.lines import Line2D

from ssl_vit.names import short_name

if TYPE_CHECKING:
    from .embedding import View

PANEL_INCHES = 3.4
TILE_INCHES = 0.85  # one image of the retrieval grid
MAX_LEGEND_CLASSES = 20  # more classes are coloured but not named
SAME_CLASS, OTHER_CLASS, QUERY = "#1a9641", "#d7191c", "#2166ac"  # frame colours: green, red, blue
FRAME_WIDTH = 3.0
CHARS_PER_INCH = 13  # wrap width of a note at font size 8


def class_colours(num_classes: int) -> list:
    """One colour per class: tab10 / tab20 while they last, else evenly spaced on turbo."""
    if num_classes <= 20:
        cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
        return [cmap(i) for i in range(num_classes)]
    return [colormaps["turbo"](i / (num_classes - 1)) for i in range(num_classes)]


def _axis_labels(ax: Axes, v: View) -> None:
    if v.method == "pca":
        ratio = v.record["pca_explained_variance_ratio"]
        ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)", fontsize=7)
        ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)", fontsize=7)
    else:
        ax.set_xlabel("UMAP 1", fontsize=7)
        ax.set_ylabel("UMAP 2", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax: Axes, v: View) -> None:
    """The class names beside the last panel of a row, when there are few enough to read."""
    colours = class_colours(len(v.class_names))
    handles = [Line2D([], [], ls="", marker="o", ms=5, color=c, label=n) for c, n in zip(colours, v.class_names)]
    ax.legend(handles=handles, title="class", fontsize=7, title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def plot_embedding(views: Sequence[View]) -> Figure:
    """The test points in 2-D coloured by class: columns are checkpoints, rows data sets."""
    checkpoints = list(dict.fromkeys(v.record["checkpoint"] for v in views))
    datas = list(dict.fromkeys(v.data for v in views))
    fig = Figure(figsize=(PANEL_INCHES * len(checkpoints) + 1.2, PANEL_INCHES * len(datas) + 0.4),
                 layout="constrained")
    axes = fig.subplots(len(datas), len(checkpoints), squeeze=False)
    for v in views:
        row, col = datas.index(v.data), checkpoints.index(v.record["checkpoint"])
        ax, colours = axes[row, col], class_colours(len(v.class_names))
        for cls in np.unique(v.point_labels):
            at = v.point_labels == cls
            ax.scatter(v.points[at, 0], v.points[at, 1], s=7, color=colours[cls], alpha=0.8, linewidths=0)
        named = "" if len(v.class_names) <= MAX_LEGEND_CLASSES else f", {len(v.class_names)} classes (not named)"
        ax.set_title(f"{v.name}\n{short_name(v.data)}: {v.method.upper()} of {v.record['features']} features\n"
                     f"{v.record['points_drawn']} of {v.record['num_test']} test images{named}", fontsize=8)
        _axis_labels(ax, v)
        if col == len(checkpoints) - 1 and len(v.class_names) <= MAX_LEGEND_CLASSES:
            _legend(ax, v)
    return fig


def _tile(ax: Axes, image: np.ndarray, title: str, frame: str) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=6, color=frame, pad=2)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(frame)
        spine.set_linewidth(FRAME_WIDTH)


def plot_retrieval(views: Sequence[View]) -> Figure:
    """A block per checkpoint and data set: each row a query test image, then its nearest training
    images, most similar first (titled with class and cosine similarity, framed by class agreement)."""
    queries, k = max(len(v.query_images) for v in views), len(views[0].neighbour_images[0])
    block_inches = TILE_INCHES * 1.2 * queries + 0.5
    fig = Figure(figsize=(TILE_INCHES * (1 + k) + 0.4, block_inches * len(views)), layout="constrained")
    for block, v in zip(fig.subfigures(len(views), 1, squeeze=False)[:, 0], views):
        axes = block.subplots(len(v.query_images), 1 + k, squeeze=False)
        for i in range(len(v.query_images)):
            cls = v.record["query_labels"][i]
            _tile(axes[i, 0], v.query_images[i], f"query: {v.class_names[cls]}", QUERY)
            for j in range(k):
                n = v.record["neighbour_labels"][i][j]
                title = f"{v.class_names[n]} ({v.record['neighbour_similarity'][i][j]:.3f})"
                _tile(axes[i, 1 + j], v.neighbour_images[i][j], title, SAME_CLASS if n == cls else OTHER_CLASS)
        agreement = 100 * v.record["neighbour_agreement"]
        block.suptitle(f"{v.name} on {short_name(v.data)}: {agreement:.1f}% of the {k} nearest share the class "
                       f"(all {v.record['num_test']} test images)", fontsize=8)
    note = (f"Each row: a test image (blue frame), then its {k} nearest training images by cosine similarity "
            f"(in brackets) of {views[0].record['features']} features; green frame: the query's class, red: another")
    fig.suptitle(textwrap.fill(note, int(CHARS_PER_INCH * fig.get_figwidth())), fontsize=8)
    return fig


FIGURES = {"embedding.png": plot_embedding, "retrieval.png": plot_retrieval}
