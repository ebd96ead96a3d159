"""RankMe (Garrido et al. 2023, "RankMe: Assessing the downstream performance of pretrained
self-supervised representations by their rank"): the effective rank of an embedding matrix, a
label-free measure of how many directions the representation uses.

    rankme(Z) = exp(-sum_k p_k log p_k),  p_k = sigma_k / ||sigma||_1 + eps,  eps = 1e-7 (the paper's)

with sigma the singular values of Z [N, D] (not centred, as in the paper). It lies between 1 (a
collapsed representation: every image on one line) and min(N, D). Written here because no
maintained library ships it (a few lines over ``torch.linalg.svdvals``).
"""

from __future__ import annotations

import torch

EPS = 1e-7  # the paper's


def rankme(embeddings: torch.Tensor, eps: float = EPS) -> float:
    """The effective rank of ``embeddings`` [N, D] (float64 singular values)."""
    sigma = torch.linalg.svdvals(embeddings.double())  # [min(N, D)]
    p = sigma / sigma.sum() + eps
    return torch.exp(-(p * p.log()).sum()).item()
