"""Per-sample random masking by shuffling, shared by the masked objectives (MAE, masked patch prediction)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Masking(NamedTuple):
    """Which patch tokens of each image are hidden.

    keep:    [B, K]  indices of visible tokens (ascending noise order)
    masked:  [B, M]  indices of masked tokens, K + M = N
    restore: [B, N]  argsort that puts cat(keep, masked) back in raster order
    mask:    [B, N]  bool, True where the token is masked
    """

    keep: torch.Tensor
    masked: torch.Tensor
    restore: torch.Tensor
    mask: torch.Tensor


def num_masked(num_tokens: int, mask_ratio: float) -> int:
    """round(N * ratio), at least 1 and at most N - 1, so both sides are never empty."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio {mask_ratio} must lie strictly between 0 and 1")
    return min(num_tokens - 1, max(1, round(num_tokens * mask_ratio)))


def random_masking(batch: int, num_tokens: int, mask_ratio: float, device: torch.device,
                   generator: Optional[torch.Generator] = None) -> Masking:
    """Mask the same number of tokens in every image, a fresh random subset per image."""
    m = num_masked(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)  # [B, N]: a random permutation per image
    restore = shuffle.argsort(dim=1)  # [B, N]: its inverse
    keep, masked = shuffle[:, : num_tokens - m], shuffle[:, num_tokens - m :]
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    mask.scatter_(1, masked, True)
    return Masking(keep, masked, restore, mask)
