"""Seeded, MovieLens-shaped interaction matrices for the suites that need only a matrix (ALS fit, top-k)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# (n_users, n_items, nnz): MovieLens 1M / 20M shapes, plus a tiny one for tests and a 100m one for scaling.
SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (2_000, 1_500, 60_000),
    "1m": (6_040, 3_706, 1_000_000),
    "20m": (138_000, 27_000, 20_000_000),
    "100m": (700_000, 120_000, 100_000_000),
}


def power_law_matrix(size: str, seed: int = 0) -> sp.csr_matrix:
    """Seeded CSR (n_users x n_items), float32 ones, about ``nnz`` entries (within 1%) for preset ``size``.

    User degrees are 20 + a Pareto(1.2) share, scaled by bisection so that they sum to ``nnz`` under a cap of
    ``n_items / 4``; items follow a Zipf(0.9) popularity over shuffled ranks. Duplicate draws collapse and are
    topped up in a few rounds.
    """
    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SHAPES)}")
    n_users, n_items, nnz = SHAPES[size]
    rng = np.random.default_rng(seed)
    floor, cap = min(20, n_items // 4), n_items // 4
    raw = rng.pareto(1.2, n_users)
    lo, hi = 0.0, float(nnz)
    for _ in range(60):  # bisection on the scale: the clipped sum grows with it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.clip(floor + mid * raw, floor, cap).sum() < nnz else (lo, mid)
    deg = np.clip(floor + lo * raw, floor, cap).astype(np.int64)
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64)[rng.permutation(n_items)] ** -0.9)
    cdf /= cdf[-1]
    m = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    for _ in range(10):
        need = np.maximum(deg - np.diff(m.indptr), 0)
        if need.sum() <= 0.01 * nnz:
            break
        rows = np.repeat(np.arange(n_users, dtype=np.int32), need)
        cols = np.minimum(np.searchsorted(cdf, rng.random(rows.size)), n_items - 1).astype(np.int32)
        m = m + sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(n_users, n_items))
        m.data[:] = 1.0
    m = sp.csr_matrix(m)
    m.sort_indices()
    return m
