"""Attention weights of a backbone, and the two summaries of ViT paper section 4.5 built on them.

* ``record_attention``: forward hooks on each block's ``attn`` module that recompute the
  attention weights from the block's input, so the backbone keeps its fused (SDPA) fast path.
* ``mean_attention_distance``: for each head, the pixel distance between a query patch and the
  key patches, weighted by the attention weights, averaged over query patches (Figure 7, right).
* ``attention_rollout``: Abnar & Zuidema (2020): average the heads, add the identity for the
  residual path, renormalise the rows, multiply across layers (Figure 6 and appendix D.8). The
  map is read from the representation's query: the class token's row, or for average pooling
  (whose class token the output never uses) the mean of the patch rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..backbone import Backbone
from ..data import denormalize

from ..errors import EvalError

# The class token is left out of the attention distance: queries are patch tokens, keys are patch
# tokens with each row renormalised to sum to 1 (the class token has no position on the image).
# The weight each patch query puts on prefix tokens is reported separately.
CLASS_TOKEN_HANDLING = (
    "queries and keys: patch tokens only; the weight on the class token is removed and "
    "each query's weights renormalised to 1"
)


# Where a rollout map is read from (``rollout_source``), as figures and inspect.json name it.
FROM_CLASS, FROM_PATCH_MEAN = "[class]", "patch mean"


class AttentionError(EvalError):
    """A backbone whose attention cannot be read; the message says which module and why."""


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) of a timm ``Attention`` for its input x: [B, T, D] -> [B, H, T, T].

    Written here because timm's fused path (scaled_dot_product_attention) never materialises the
    weights; this repeats its non-fused branch (qkv projection, optional q/k norm, scale, softmax).
    """
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _attention_modules(backbone: Backbone) -> list[nn.Module]:
    modules = []
    for i, block in enumerate(backbone.vit.blocks):
        attn = getattr(block, "attn", None)
        missing = [a for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm") if not hasattr(attn, a)]
        if missing:
            raise AttentionError(
                f"block {i}'s attention is a {type(attn).__name__}, not timm's Attention "
                f"(missing {', '.join(missing)}); inspection reads timm Attention modules only"
            )
        modules.append(attn)
    return modules


@contextmanager
def record_attention(backbone: Backbone) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass appends one [B, H, T, T] tensor per layer (in layer
    order) to the yielded list; the hooks are removed on exit."""
    maps: list[torch.Tensor] = []

    def hook(module, args, output):
        maps.append(attention_weights(module, args[0]).detach())

    handles = [m.register_forward_hook(hook) for m in _attention_modules(backbone)]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def patch_distances(grid: tuple[int, int], patch_px: int) -> torch.Tensor:
    """[N, N] Euclidean distances in pixels between patch centres of a grid (raster order)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=-1).float() * patch_px
    return torch.cdist(centres, centres)


def mean_attention_distance(attn: torch.Tensor, distances: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """attn: [B, H, T, T] with T = num_prefix + N; distances: [N, N] -> [B, H] pixels.

    Class-token handling: see ``CLASS_TOKEN_HANDLING``.
    """
    a = attn[..., num_prefix:, num_prefix:]
    a = a / a.sum(dim=-1, keepdim=True)
    return (a * distances.to(a)).sum(dim=-1).mean(dim=-1)


def prefix_attention(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """attn: [B, H, T, T] -> [B, H]: weight a patch query puts on the prefix tokens, mean over queries."""
    return attn[..., num_prefix:, :num_prefix].sum(dim=-1).mean(dim=-1)


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer [B, H, T, T] (first layer first) -> [B, T, T]: how much each output token draws
    on each input token, through the attention and the residual paths."""
    eye = torch.eye(attentions[0].shape[-1], dtype=attentions[0].dtype, device=attentions[0].device)
    rollout = eye.expand_as(attentions[0][:, 0])
    for attn in attentions:
        a = attn.mean(dim=1) + eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def rollout_source(backbone: Backbone) -> str:
    """The query the representation comes from: FROM_CLASS (class-token pooling) or FROM_PATCH_MEAN."""
    return FROM_CLASS if backbone.cfg.global_pool == "token" else FROM_PATCH_MEAN


def rollout_map(rollout: torch.Tensor, num_prefix: int, grid: tuple[int, int], source: str) -> torch.Tensor:
    """[B, T, T] -> [B, h, w] over the patch columns: the class token's row (``source`` FROM_CLASS)
    or the mean of the patch rows (FROM_PATCH_MEAN)."""
    rows = rollout[:, 0] if source == FROM_CLASS else rollout[:, num_prefix:].mean(dim=1)
    return rows[:, num_prefix:].reshape(-1, *grid)


@torch.no_grad()
def attention_pass(backbone: Backbone, loader: Iterable[dict], num_rollout: int, device: torch.device, desc: str):
    """Run the images (batches {"image": [B, C, H, W]}) through the backbone once, reading its attention.

    Returns (distance [L, H], prefix_weight [L, H], rollout maps [K, h, w], images [K, C, H, W],
    grid, number of images).
    """
    num_prefix, source = backbone.num_prefix_tokens, rollout_source(backbone)
    dist_sum = prefix_sum = distances = grid = None
    maps, shown, seen = [], [], 0
    for batch in tqdm(loader, desc=f"attention {desc}", unit="batch"):
        images = batch["image"].to(device)
        with record_attention(backbone) as layers:
            backbone.forward_features(images)
        if distances is None:
            grid = backbone.grid_size(images)
            distances = patch_distances(grid, backbone.pixel_patch_size).to(device)
        per_layer = torch.stack([mean_attention_distance(a, distances, num_prefix).sum(0) for a in layers])
        per_prefix = torch.stack([prefix_attention(a, num_prefix).sum(0) for a in layers])
        dist_sum = per_layer if dist_sum is None else dist_sum + per_layer
        prefix_sum = per_prefix if prefix_sum is None else prefix_sum + per_prefix
        seen += len(images)
        need = num_rollout - sum(len(m) for m in maps)
        if need > 0:
            maps.append(rollout_map(attention_rollout([a[:need] for a in layers]), num_prefix, grid, source).cpu())
            shown.append(denormalize(batch["image"][:need]).clamp(0, 1))
    if not seen:
        raise EvalError("the data has no images to inspect")
    return (dist_sum / seen).cpu(), (prefix_sum / seen).cpu(), torch.cat(maps), torch.cat(shown), grid, seen
