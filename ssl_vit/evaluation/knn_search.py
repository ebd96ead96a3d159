"""Exact top-k cosine search for kNN, in memory-bounded chunks, with a bf16 screen on CPUs where
bf16 products are faster.

On CPUs where bfloat16 matrix products beat float32 ones (AVX512-BF16, AMX), small k (up to
``SCREEN_MAX_K``, e.g. DINO's k = 20 alone) are searched by ``screened_topk``: a bf16 product
proposes candidates (``bf16_candidates``: block maxima first, so the full top-k pass reads a small
part of the product), float32 decides, and a rounding-error bound proves per row that no other
training point could have made the top k (rows it cannot prove are redone in float32). The
neighbours are the same as the float32 search's. Written here because no maintained library
offers an exact search with such a screen (faiss and scikit-learn search in float32 only).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Iterator, Optional

import torch

CHUNK_BYTES = 1 << 28  # float32 similarity block per chunk of test rows (256 MiB)
# bf16 block per chunk when screening: small enough to stay in cache between the product and the
# candidate search (32 MiB: 2x faster than 256 MiB blocks on 50,000 training points, measured)
SCREEN_CHUNK_BYTES = 1 << 25
CANDIDATE_BLOCK = 64  # training points per block in ``bf16_candidates``
BF16_UNIT = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
RERANK_ROWS = 64  # test rows per exact re-ranking step (bounds the gathered [rows, C, D] block)
# Screening re-ranks 2k candidates per test row by gathering their vectors; beyond this k the
# gathering costs about what the bf16 product saves (measured on 50,000 x 384 features).
SCREEN_MAX_K = 64


@functools.cache
def bf16_is_faster() -> bool:
    """Whether bf16 matrix products beat float32 ones on this CPU: yes where the instruction sets
    for them exist (AVX512-BF16, AMX), else measured once per process (best of 5 per type: the
    first bf16 product also builds its kernel, so one timing alone is not enough)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch.cpu, private but stable
        supported = getattr(torch.cpu, probe, None)
        if supported is not None and supported():
            return True
    a, b = torch.randn(256, 384), torch.randn(4096, 384)
    best = {torch.float32: math.inf, torch.bfloat16: math.inf}
    for _ in range(5):
        for dtype in best:
            x, y = a.to(dtype), b.to(dtype)
            start = time.perf_counter()
            x @ y.T
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16] < 0.7 * best[torch.float32]


def bf16_candidates(approx: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The c largest entries (bf16 values, indices) [b, c] of each row of a bf16 matrix [b, N], and
    whether each row's answer is certain [b].

    A full top-k over [b, N] costs about as much as the bf16 product itself, so: the maximum of
    each block of ``CANDIDATE_BLOCK`` columns, the c blocks with the largest maxima, then top-k over
    their columns only. Those blocks hold the c largest entries (a block with a larger maximum than
    all c chosen would have been chosen). The maxima and top-k run on the bits as int16, which
    torch reduces several times faster than bf16: for non-negative values the int16 order is the
    float order, and every negative value sorts below them. A row is certain when its c-th value is
    non-negative; other rows (fewer than c non-negative similarities) are the caller's to redo.
    """
    keys = approx.view(torch.int16)  # [b, N]
    rows, n = keys.shape
    blocks = n // CANDIDATE_BLOCK
    if blocks <= c:
        values, indices = approx.topk(c, dim=1)
        return values, indices, torch.ones(rows, dtype=torch.bool, device=approx.device)
    block_max = keys[:, :blocks * CANDIDATE_BLOCK].unflatten(1, (blocks, CANDIDATE_BLOCK)).amax(2)  # [b, blocks]
    top_blocks = block_max.topk(c, dim=1).indices  # [b, c]
    offsets = torch.arange(CANDIDATE_BLOCK, device=approx.device)
    columns = (top_blocks[:, :, None] * CANDIDATE_BLOCK + offsets).flatten(1)  # [b, c * CANDIDATE_BLOCK]
    if n > blocks * CANDIDATE_BLOCK:  # the last, partial block: always searched
        tail = torch.arange(blocks * CANDIDATE_BLOCK, n, device=approx.device)
        columns = torch.cat([columns, tail.expand(rows, -1)], dim=1)
    values, pos = keys.gather(1, columns).topk(c, dim=1)  # [b, c]
    return values.view(torch.bfloat16), columns.gather(1, pos), values[:, -1] >= 0


def screened_topk(test: torch.Tensor, train: torch.Tensor, train_bf16: torch.Tensor, train_lo_norm: float,
                  k: int, margin: int, out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 top-k cosine similarities (values, indices) [b, k] of L2-normalised rows.
    ``out``: a bf16 buffer of at least [b, N] for the product, reused across calls (a fresh
    tensor of that size per call costs page faults, about a third of the product's time on a CPU).

    Candidates: the top ``k + margin`` by the bf16 product. Write x = x_hi + x_lo (x_hi its bf16
    rounding) and likewise y. The product sums exact x_hi_i y_hi_i in float32, then rounds to bf16, so
        |x.y - s_bf16| <= |x_lo||y_hi| + |x_hi||y_lo| + |x_lo||y_lo| + D 2^-23 + 2^-8 (1 + 2^-7) |s_bf16|,
    which grows with s_bf16. A non-candidate has s_bf16 <= tau (the last candidate's), so its exact
    similarity is at most tau plus that bound at tau; if this is below the k-th exact similarity
    among the candidates, the candidates hold the exact top k. Other rows are searched in float32.
    """
    test_bf16 = test.bfloat16()
    test_lo = (test - test_bf16.float()).norm(dim=1)  # |x_lo|, [b]
    approx = torch.mm(test_bf16, train_bf16.T, out=None if out is None else out[:len(test)])  # [b, N] bf16
    cand_sim, cand, certain = bf16_candidates(approx, k + margin)  # [b, C], [b, C], [b]
    exact = torch.empty(cand.shape, device=test.device)  # [b, C] float32 similarities of the candidates
    for i in range(0, len(test), RERANK_ROWS):
        rows = cand[i:i + RERANK_ROWS]
        gathered = train.index_select(0, rows.flatten()).view(*rows.shape, -1)  # [r, C, D]
        exact[i:i + RERANK_ROWS] = torch.bmm(gathered, test[i:i + RERANK_ROWS, :, None]).squeeze(-1)
    values, pos = exact.topk(k, dim=1)
    indices = cand.gather(1, pos)
    tau = cand_sim[:, -1].float()
    input_error = test_lo + train_lo_norm + test_lo * train_lo_norm  # |x_hi|, |y_hi| <= 1 + 2^-8: slack below
    bound = tau + 1.01 * input_error + test.shape[1] * 2.0 ** -23 + BF16_UNIT * (1 + 2.0 ** -7) * tau.abs()
    unsure = ((bound >= values[:, -1]) | ~certain).nonzero().squeeze(1)
    if len(unsure):
        values[unsure], indices[unsure] = (test[unsure] @ train.T).topk(k, dim=1)
    return values, indices


def topk_chunks(train: torch.Tensor, test: torch.Tensor, k: int, chunk_rows: Optional[int] = None,
                screen: Optional[bool] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(similarities, indices) [b, k] of the k most cosine-similar training rows, most similar first,
    for each chunk of test rows in order. train: [N, D], test: [M, D], both L2-normalised.
    ``screen``: use ``screened_topk`` (default: for k up to ``SCREEN_MAX_K`` on a CPU where bf16
    products are faster)."""
    margin = k  # candidates for screening: twice the neighbours needed
    if screen is None:
        screen = train.device.type == "cpu" and k <= SCREEN_MAX_K and k + margin < len(train) and bf16_is_faster()
    rows = chunk_rows or max(1, (SCREEN_CHUNK_BYTES // 2 if screen else CHUNK_BYTES // 4) // len(train))
    if screen:
        train_bf16 = train.bfloat16()
        train_lo_norm = (train - train_bf16.float()).norm(dim=1).max().item()
        product = torch.empty(min(rows, len(test)), len(train), dtype=torch.bfloat16, device=train.device)
    for start in range(0, len(test), rows):
        chunk = test[start:start + rows]
        if screen:
            yield screened_topk(chunk, train, train_bf16, train_lo_norm, k, margin, product)
        else:
            yield (chunk @ train.T).topk(k, dim=1)
