"""Weighted k-nearest-neighbour classification on frozen features, DINO's ``eval_knn.py``.

    knn(features, ks=(10, 20, 100, 200), temperature=0.07) -> one record per k
    (command line: python -m eval.knn CKPT --data NAME_OR_PATH [--k 10 20 100 200] [--temperature 0.07])

Features are L2-normalised; each test image's k most cosine-similar training images vote for
their class with weight exp(similarity / T), T = 0.07; the class with the largest summed vote
wins. k = 20 is DINO's headline figure. The neighbours come from ``knn_search.topk_chunks``: an
exact search in memory-bounded chunks of test rows (screened in bf16 where that is faster).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import EvalError
from .features import Features
from .knn_search import topk_chunks

DEFAULT_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                ks: Sequence[int] = DEFAULT_KS, temperature: float = TEMPERATURE,
                chunk_rows: Optional[int] = None, screen: Optional[bool] = None) -> dict[int, torch.Tensor]:
    """Predicted classes [M] of the test features for each k.

    train: [N, D], train_labels: [N], test: [M, D] (normalised here). One top-k(max k) search per
    chunk of test rows serves every k, since top-k results are sorted by similarity. ``chunk_rows``
    and ``screen``: see ``knn_search.topk_chunks``.
    """
    k_max = max(ks)
    if k_max > len(train):
        raise EvalError(f"k = {k_max} exceeds the {len(train)} training images; pass a smaller --k")
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for top_sim, top_idx in topk_chunks(train, test, k_max, chunk_rows, screen):  # [b, k_max], most similar first
        neighbours = train_labels[top_idx]  # [b, k_max] their classes
        weights = (top_sim / temperature).exp()  # DINO's vote weight exp(sim / T)
        for k in ks:
            votes = torch.zeros(len(top_sim), num_classes, device=test.device)
            votes.scatter_add_(1, neighbours[:, :k], weights[:, :k])  # [b, K] summed weight per class
            predictions[k].append(votes.argmax(1))
    return {k: torch.cat(p) for k, p in predictions.items()}


def knn(features: Features, ks: Sequence[int] = DEFAULT_KS, temperature: float = TEMPERATURE,
        device: Optional[torch.device] = None) -> list[dict]:
    """One record per k: test accuracy of the weighted kNN classifier."""
    device = device or features.train.device
    test_labels = features.test_labels.to(device)
    predictions = knn_predict(features.train.to(device), features.train_labels.to(device),
                              features.test.to(device), features.num_classes, ks, temperature)
    return [{"k": k, "temperature": temperature, "accuracy": (p == test_labels).float().mean().item()}
            for k, p in predictions.items()]
