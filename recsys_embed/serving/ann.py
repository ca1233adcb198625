"""Approximate top-k through faiss, for catalogs where the exact GEMM of ``recsys_embed.evaluation.topk`` is too slow.

``searcher`` is what export calls: exact (``topk.iter_topk``) unless ``export.search.kind`` names an index.

- ``hnsw``: ``IndexHNSWFlat`` over the item vectors, inner-product metric; ``ef_search`` trades speed for recall.
- ``ivf``: ``IndexIVFFlat`` with ``nlist`` k-means cells; ``nprobe`` cells are scanned per query.

Contract: the same ``TopK`` chunks as ``iter_topk`` (users in the order given, scores non-increasing, no
train-seen or excluded item, -1 / -inf padding only when a user has fewer than k admissible items). Each query
asks the index for ``k`` + the chunk's largest seen count (capped by ``max_candidates``); seen items are then
dropped. A user left with fewer than ``k`` candidates (a heavy user whose seen items crowd the answer) is
ranked exactly, so the filter never shortens a list. ``recall_against_exact`` measures what the
approximation loses on a sample of users; export reports it with every approximate table.

faiss is an optional extra (``pip install 'recsys-embed[faiss]'``); exact search never imports it.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsys_embed.config import SearchConfig
from recsys_embed.errors import ConfigError
from recsys_embed.evaluation.topk import TopK, default_threads, iter_topk
from recsys_embed.types import Embeddings

log = logging.getLogger(__name__)

_NEG_INF32 = np.float32(-np.inf)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            "export.search.kind asks for a faiss index, but faiss is not installed; "
            "pip install 'recsys-embed[faiss]' (faiss-cpu) or set export.search.kind=exact"
        ) from None
    return faiss


def build_index(item_vectors: np.ndarray, cfg: SearchConfig, threads: int | None = None) -> Any:
    """A faiss inner-product index over ``item_vectors`` (n_items x d, float32) as ``cfg.kind`` says."""
    faiss = _faiss()
    faiss.omp_set_num_threads(max(1, threads or default_threads()))
    x = np.ascontiguousarray(item_vectors, dtype=np.float32)
    n, d = x.shape
    t0 = time.perf_counter()
    if cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.add(x)
        index.hnsw.efSearch = cfg.ef_search
    elif cfg.kind == "ivf":
        nlist = cfg.nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))  # faiss wants >= 39 points per cell
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(cfg.seed)
        train = x if n <= 256 * nlist else x[np.sort(rng.choice(n, 256 * nlist, replace=False))]
        index.cp.seed = cfg.seed
        index.train(train)
        index.add(x)
        index.nprobe = min(cfg.nprobe, nlist)
    else:
        raise ConfigError(f"export.search.kind={cfg.kind!r} is not an index; use 'hnsw' or 'ivf'")
    log.info("ann: %s index over %d items x %d dims built in %.2fs", cfg.kind, n, d, time.perf_counter() - t0)
    return index


def _compact(
    cand: np.ndarray, scores: np.ndarray, bad: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the first ``k`` candidates not marked ``bad`` (order kept); also how many each row found."""
    ok = ~bad
    rank = np.cumsum(ok, axis=1) - 1
    take = ok & (rank < k)
    n = cand.shape[0]
    items = np.full((n, k), -1, dtype=np.int64)
    out = np.full((n, k), _NEG_INF32, dtype=np.float32)
    r, c = np.nonzero(take)
    items[r, rank[r, c]] = cand[r, c]
    out[r, rank[r, c]] = scores[r, c]
    return items, out, np.minimum(ok.sum(axis=1), k)


def _seen_mask(seen: sp.csr_matrix | None, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """``mask[r, j]``: candidate item ``cand[r, j]`` was seen by user ``rows[r]`` (-1 padding counts as seen)."""
    bad = cand < 0
    if seen is None:
        return bad
    n_items = seen.shape[1]
    sub = seen[rows]
    seen_keys = np.repeat(np.arange(len(rows), dtype=np.int64), np.diff(sub.indptr)) * n_items + sub.indices
    keys = np.arange(len(rows), dtype=np.int64)[:, None] * n_items + np.maximum(cand, 0)
    return bad | np.isin(keys, seen_keys)


def iter_topk_ann(
    emb: Embeddings,
    k: int,
    users: np.ndarray | None = None,
    seen: sp.csr_matrix | None = None,
    chunk_users: int = 4096,
    allow_items: np.ndarray | None = None,
    deny_items: np.ndarray | None = None,
    *,
    search: SearchConfig,
    threads: int | None = None,
    index: Any | None = None,
) -> Iterator[TopK]:
    """``iter_topk``'s contract, answered by a faiss index as ``search`` says (built here unless ``index`` is given).

    Users whose filtered candidate list is shorter than ``k`` are re-ranked exactly (counted in the log).
    """
    uvec, ivec = emb.scoring_vectors()
    n_items = ivec.shape[0]
    k = min(k, n_items)
    cols = None
    if allow_items is not None or (deny_items is not None and len(deny_items)):
        keep = np.zeros(n_items, dtype=bool)
        keep[np.asarray(allow_items, dtype=np.int64) if allow_items is not None else slice(None)] = True
        if deny_items is not None and len(deny_items):
            keep[np.asarray(deny_items, dtype=np.int64)] = False
        cols = np.flatnonzero(keep)
    if index is None:
        index = build_index(ivec if cols is None else ivec[cols], search, threads)
    n_index = index.ntotal
    user_ids = np.arange(uvec.shape[0], dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    seen_counts = np.diff(seen.indptr) if seen is not None else None
    fallback = 0
    for start in range(0, len(user_ids), max(1, chunk_users)):
        rows = user_ids[start : start + chunk_users]
        extra = int(seen_counts[rows].max()) if seen_counts is not None and len(rows) else 0
        kk = min(n_index, k + min(extra, max(search.max_candidates - k, 0)))
        scores, cand = index.search(np.ascontiguousarray(uvec[rows], dtype=np.float32), kk)
        if cols is not None:
            cand = np.where(cand >= 0, cols[np.maximum(cand, 0)], -1)
        items, out, found = _compact(cand, scores, _seen_mask(seen, rows, cand), k)
        n_admissible = (len(cols) if cols is not None else n_items) - (seen_counts[rows] if seen_counts is not None
                                                                       else 0)  # fmt: skip
        short = np.flatnonzero(found < np.minimum(k, n_admissible))
        if len(short):  # the index ran out of unseen candidates for these users: rank them exactly
            fallback += len(short)
            exact = next(iter_topk(emb, k, users=rows[short], seen=seen, chunk_users=len(short),
                                   allow_items=allow_items, deny_items=deny_items, threads=threads))  # fmt: skip
            items[short], out[short] = exact.items, exact.scores
        yield TopK(users=rows.copy(), items=items, scores=out)
    if fallback:
        log.info("ann: %d of %d users ranked exactly (too few unseen candidates from the index)", fallback,
                 len(user_ids))  # fmt: skip


def searcher(cfg: SearchConfig) -> Callable[..., Iterator[TopK]]:
    """The top-k function ``cfg.kind`` names, called like ``topk.iter_topk``: exact, or a faiss index."""
    if cfg.kind == "exact":
        return iter_topk
    return functools.partial(iter_topk_ann, search=cfg)


def recall_against_exact(
    emb: Embeddings,
    k: int,
    cfg: SearchConfig,
    seen: sp.csr_matrix | None = None,
    sample_users: int = 2000,
    *,
    threads: int | None = None,
) -> float:
    """Mean over a seeded sample of users of |approximate top-k ∩ exact top-k| / |exact top-k| (1.0 = no loss)."""
    n_users = emb.user_vectors.shape[0]
    rng = np.random.default_rng(cfg.seed)
    users = np.sort(rng.choice(n_users, min(sample_users, n_users), replace=False)).astype(np.int64)
    exact = next(iter_topk(emb, k, users=users, seen=seen, chunk_users=len(users), threads=threads))
    approx = next(iter_topk_ann(emb, k, users=users, seen=seen, chunk_users=len(users), search=cfg, threads=threads))
    hits = 0
    total = 0
    for e, a in zip(exact.items, approx.items, strict=True):
        e = e[e >= 0]
        hits += len(np.intersect1d(e, a[a >= 0]))
        total += len(e)
    return hits / total if total else 1.0
