"""Large-catalog top-k: faiss HNSW and IVF (``serving.ann``) against the exact scorer, with recall measured.

- Candidates ("hnsw", "ivf"): ``iter_topk_ann`` over a sample of users, index built once outside the timing
  (its build time is reported beside it), default ``SearchConfig`` parameters.
- Baseline ("exact"): ``iter_topk`` on the same users, items and seen matrix.
- Recall: mean |approximate top-k ∩ exact top-k| / k over the same users, computed from the timed runs' outputs.

The vectors are seeded and clustered (items around 256 centers, users near them, 64 dims): ANN indexes exploit
structure like trained embeddings have; on isotropic random vectors every method's recall collapses, which says
nothing about recommender embeddings. Sizes: ``tiny`` 50k items, ``1m`` 300k items, ``20m`` 1M items, ``100m``
3M items, with 20k scored users (2k at ``tiny``) and 20 seen items each.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_embed.bench.harness import BenchResult, Measurement, alternate
from recsys_embed.config import SearchConfig
from recsys_embed.types import Embeddings, IdMap

log = logging.getLogger(__name__)

SHAPES = {"tiny": (2_000, 50_000), "1m": (20_000, 300_000), "20m": (20_000, 1_000_000), "100m": (20_000, 3_000_000)}
TARGET = "faster than exact at >= 0.9 recall@20"
K = 20


def clustered_embeddings(n_users: int, n_items: int, d: int = 64, centers: int = 256, seed: int = 3) -> Embeddings:
    """Seeded clustered float32 vectors with integer ID maps."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d), dtype=np.float32)
    items = c[rng.integers(0, centers, n_items)] + 0.5 * rng.standard_normal((n_items, d), dtype=np.float32)
    users = c[rng.integers(0, centers, n_users)] + 0.5 * rng.standard_normal((n_users, d), dtype=np.float32)
    return Embeddings(
        user_vectors=users,
        item_vectors=items,
        users=IdMap(pl.Series("id", np.arange(n_users, dtype=np.int64))),
        items=IdMap(pl.Series("id", np.arange(n_items, dtype=np.int64))),
        model="bench",
    )


def _seen(n_users: int, n_items: int, per_user: int = 20, seed: int = 4) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n_users), per_user)
    cols = rng.integers(0, n_items, len(rows))
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    m.sum_duplicates()
    return m


def _items(chunks: object) -> np.ndarray:
    return np.concatenate([c.items for c in chunks])  # type: ignore[attr-defined]


def _recall(exact: np.ndarray, approx: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(e, a)) for e, a in zip(exact, approx, strict=True))
    return hits / exact.size


def run(size: str = "20m", repeats: int = 3) -> list[BenchResult]:
    """Time HNSW and IVF against exact top-k on a clustered catalog of preset ``size``."""
    from recsys_embed.evaluation.topk import iter_topk
    from recsys_embed.serving.ann import build_index, iter_topk_ann

    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SHAPES)}")
    n_users, n_items = SHAPES[size]
    emb = clustered_embeddings(n_users, n_items)
    seen = _seen(n_users, n_items)
    exact_items = _items(iter_topk(emb, K, seen=seen))
    results = []
    kinds: tuple[Literal["hnsw", "ivf"], ...] = ("hnsw", "ivf")
    for kind in kinds:
        cfg = SearchConfig(kind=kind)
        t0 = time.perf_counter()
        index = build_index(emb.item_vectors, cfg)
        build_s = time.perf_counter() - t0
        approx_items = _items(iter_topk_ann(emb, K, seen=seen, search=cfg, index=index))
        def approx(cfg: SearchConfig = cfg, index: object = index) -> np.ndarray:
            return _items(iter_topk_ann(emb, K, seen=seen, search=cfg, index=index))

        c, b = alternate(approx, lambda: _items(iter_topk(emb, K, seen=seen)), repeats)
        result = BenchResult(
            suite=f"ann-{kind}",
            size=size,
            candidate=Measurement(kind, c),
            baseline=Measurement("exact", b),
            target=TARGET,
            extra={
                "users": n_users,
                "items": n_items,
                "index_build_s": round(build_s, 2),
                f"recall@{K}_vs_exact": round(_recall(exact_items, approx_items), 4),
            },
        )
        log.info("ann bench %s %s: %.2fs vs exact %.2fs, recall %.3f", kind, size, result.candidate.median,
                 result.baseline.median, result.extra[f"recall@{K}_vs_exact"])  # fmt: skip
        results.append(result)
    return results
