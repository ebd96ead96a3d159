"""What the first layer and the position embeddings learned (ViT paper Figure 7, left and centre).

* ``first_layer_filters``: the top principal components of the patch-embedding filters, as RGB
  patches; for a hybrid, whose first layer is the stem's convolution, that convolution's filters.
* ``position_similarity``: cosine similarity of each patch position's embedding with every other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone

from .attention import patch_distances

NUM_FILTERS = 28  # the paper shows the first 28 principal components


@dataclass
class Filters:
    images: torch.Tensor  # [K, C, k, k] filters or principal components, raw values
    title: str  # what they are, for the figure
    explained_variance_ratio: list[float]  # per principal component; empty for stem filters


def first_layer_filters(backbone: Backbone, num: int = NUM_FILTERS) -> Filters:
    """Principal components of ``patch_embed.proj`` (rows = filters as C*p*p vectors); for hybrids
    the first convolution of the stem, shown as is (its input is pixels, unlike ``proj``'s)."""
    if backbone.is_hybrid:
        conv = next(m for m in backbone.vit.patch_embed.backbone.modules() if isinstance(m, nn.Conv2d))
        w = conv.weight.detach().float()
        k = w.shape[-1]
        title = f"first layer is a {k}x{k} convolution: {min(num, len(w))} of its {len(w)} filters"
        return Filters(w[:num], title, [])
    w = backbone.vit.patch_embed.proj.weight.detach().float()  # [D, C, p, p]
    flat = w.flatten(1)
    _, s, vh = torch.linalg.svd(flat - flat.mean(dim=0), full_matrices=False)
    num = min(num, vh.shape[0])
    ratio = (s**2 / (s**2).sum())[:num]
    title = f"top {num} principal components of the {len(w)} patch-embedding filters"
    return Filters(vh[:num].reshape(num, *w.shape[1:]), title, [round(float(r), 5) for r in ratio])


def position_similarity(backbone: Backbone) -> torch.Tensor:
    """[N, N] cosine similarity between the patch position embeddings on the backbone's own grid
    (prefix positions excluded)."""
    _, pos = backbone.position_embedding(backbone.base_grid)
    pos = F.normalize(pos[0].detach().float(), dim=-1)
    return pos @ pos.T


def similarity_by_distance(similarity: torch.Tensor, grid: tuple[int, int]) -> dict[int, float]:
    """Mean similarity of position pairs at each rounded grid distance (0 = itself): a grid
    pattern shows as a falling curve, random embeddings as a flat one."""
    dist = patch_distances(grid, 1).round().long()
    return {int(d): round(float(similarity[dist == d].mean()), 5) for d in dist.unique()}
