"""Chunked all-user top-k: one preallocated score buffer, seen-mask by flat index, ``torch.topk``.

Both evaluation and export use this one function, so they rank exactly the same way.
Memory is bounded by ``chunk_users x n_items x 4`` bytes, not by the number of users.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from recsys_embed.types import Embeddings

NEG_INF = float("-inf")


@dataclass
class TopK:
    """Top-k for a set of users. ``items[r, j]`` is the j-th best item index for ``users[r]``.

    Slots with no admissible item (fewer than k candidates) hold item -1 and score -inf.
    """

    users: np.ndarray  # int64 (n,)
    items: np.ndarray  # int64 (n, k)
    scores: np.ndarray  # float32 (n, k)


def _item_mask(n_items: int, allow: np.ndarray | None, deny: np.ndarray | None) -> torch.Tensor | None:
    """Additive mask (0 or -inf) over items, or None when every item is admissible."""
    if allow is None and (deny is None or len(deny) == 0):
        return None
    mask = torch.zeros(n_items, dtype=torch.float32)
    if allow is not None:
        mask.fill_(NEG_INF)
        mask[torch.as_tensor(np.asarray(allow, dtype=np.int64))] = 0.0
    if deny is not None and len(deny):
        mask[torch.as_tensor(np.asarray(deny, dtype=np.int64))] = NEG_INF
    return mask


def iter_topk(
    emb: Embeddings,
    k: int,
    users: np.ndarray | None = None,
    seen: sp.csr_matrix | None = None,
    chunk_users: int = 4096,
    allow_items: np.ndarray | None = None,
    deny_items: np.ndarray | None = None,
) -> Iterator[TopK]:
    """Yield top-k per chunk of users.

    Args:
        emb: any model's embeddings; scores are ``scoring_vectors()`` dot products.
        k: items per user (capped at the number of items).
        users: user indices to score (default: all users, in index order).
        seen: CSR (n_users x n_items); nonzero entries are excluded (train-seen items).
        chunk_users: users per matrix multiply; the score buffer is ``chunk_users x n_items`` float32.
        allow_items / deny_items: item indices to restrict to / exclude.
    """
    uvec, ivec = emb.scoring_vectors()
    n_users_all, n_items = uvec.shape[0], ivec.shape[0]
    k = min(k, n_items)
    user_ids = np.arange(n_users_all, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    if seen is not None and seen.shape != (n_users_all, n_items):
        raise ValueError(f"seen matrix shape {seen.shape} != (users, items) {(n_users_all, n_items)}")
    if seen is not None and not sp.isspmatrix_csr(seen):
        seen = sp.csr_matrix(seen)

    U = torch.from_numpy(uvec)
    It = torch.from_numpy(ivec).t().contiguous()  # (d, n_items): row-major GEMM operand
    mask = _item_mask(n_items, allow_items, deny_items)
    chunk = max(1, min(chunk_users, len(user_ids)))
    buf = torch.empty((chunk, n_items), dtype=torch.float32)
    out_vals = torch.empty((chunk, k), dtype=torch.float32)
    out_idx = torch.empty((chunk, k), dtype=torch.int64)
    flat = buf.view(-1)

    for start in range(0, len(user_ids), chunk):
        rows = user_ids[start : start + chunk]
        n = len(rows)
        b = buf[:n]
        torch.mm(U[torch.from_numpy(rows)], It, out=b)
        if mask is not None:
            b.add_(mask)
        if seen is not None:
            indptr, indices = seen.indptr, seen.indices
            starts, ends = indptr[rows], indptr[rows + 1]
            lens = ends - starts
            if lens.sum():
                local_row = np.repeat(np.arange(n, dtype=np.int64), lens)
                # positions of each row's seen items inside seen.indices
                offs = np.arange(lens.sum(), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
                cols = indices[np.repeat(starts, lens) + offs].astype(np.int64)
                flat[torch.from_numpy(local_row * n_items + cols)] = NEG_INF
        torch.topk(b, k, dim=1, sorted=True, out=(out_vals[:n], out_idx[:n]))
        vals = out_vals[:n].numpy().copy()
        idx = out_idx[:n].numpy().copy()
        idx[np.isneginf(vals)] = -1
        yield TopK(users=rows.copy(), items=idx, scores=vals)


def topk(
    emb: Embeddings,
    k: int,
    users: np.ndarray | None = None,
    seen: sp.csr_matrix | None = None,
    chunk_users: int = 4096,
    allow_items: np.ndarray | None = None,
    deny_items: np.ndarray | None = None,
) -> TopK:
    """All chunks of ``iter_topk`` concatenated (for evaluation and small exports)."""
    parts = list(iter_topk(emb, k, users, seen, chunk_users, allow_items, deny_items))
    if not parts:
        kk = min(k, emb.item_vectors.shape[0])
        return TopK(np.empty(0, np.int64), np.empty((0, kk), np.int64), np.empty((0, kk), np.float32))
    return TopK(
        users=np.concatenate([p.users for p in parts]),
        items=np.concatenate([p.items for p in parts]),
        scores=np.concatenate([p.scores for p in parts]),
    )
