"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): a closed-form item-item model.

With X the (n_users x n_items) train matrix (0/1 by default, see ``EASEConfig.binary``; with
``EASEConfig.half_life_days`` each pair's 1 becomes ``0.5 ** (days since the user last bought the item / half
life)``, see ``recency_matrix``) and lambda > 0::

    G = X^T X,   P = (G + lambda I)^-1,   B = I - P diagMat(1 / diag(P))   (so diag(B) = 0)

i.e. ``B[i, j] = -P[i, j] / P[j, j]`` off the diagonal: column j holds the weights with which the items a user
has predict item j, and a user's scores are ``X[u] @ B``.

As ``Embeddings`` (the shared contract, dot scoring): user vectors are the rows of X (dense, n_users x n_items)
and item vectors are the columns of B (``item_vectors = B.T``, n_items x n_items), so ``user_vectors @
item_vectors.T = X @ B``. Evaluation, top-k export and the registry need no special case; similar items are the
cosine of B's columns. The price is memory: items^2 for B and users x items for the dense rows, so ``fits``
refuses catalogs above the configured budget (``EASEConfig.max_items`` / ``max_memory_gb``).

The inverse is a Cholesky one (LAPACK potrf + potri, half the flops of an LU inverse), in place in float64.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from recsys_embed.config import EASEConfig
from recsys_embed.errors import ConfigError
from recsys_embed.types import Embeddings, Interactions, check_trainable

log = logging.getLogger(__name__)

_GIB = 2**30
# Below this many items the inverse takes milliseconds on one thread, and BLAS threads only add synchronisation
# (measured on a busy 2-core box: 497 items 0.93 s on 2 threads against 0.004 s on 1).
_PARALLEL_MIN_ITEMS = 1024


class EASETooLarge(ConfigError):
    """The catalog is above EASE's configured item count or memory budget (the message names both and the fix)."""


def memory_bytes(n_users: int, n_items: int) -> int:
    """Estimated peak bytes of an EASE fit and save.

    20 B x items^2: the float64 Gram matrix (8), its float64 inverse while tuning keeps the Gram matrix (8), B
    as float32 item vectors (4). 8 B x users x items: the dense float32 user rows and their copy when saved.
    """
    return 20 * n_items * n_items + 8 * n_users * n_items


def fits(n_users: int, n_items: int, cfg: EASEConfig) -> str | None:
    """Why EASE cannot be fitted on an (n_users x n_items) matrix under ``cfg``'s budget, or None if it can."""
    need = memory_bytes(n_users, n_items)
    budget = cfg.max_memory_gb * _GIB
    fix = (
        "raise models.ease.max_items / models.ease.max_memory_gb on a machine that has it, shrink the catalog "
        "(ingest.min_item_interactions, ingest.item_filters), or set models.ease.enabled=false"
    )
    if n_items > cfg.max_items:
        return (
            f"ease: {n_items:,} items is over models.ease.max_items = {cfg.max_items:,} (the inverse costs items^3 "
            f"= {float(n_items) ** 3:.2g} flops; memory about {need / _GIB:.1f} GiB); {fix}"
        )
    if need > budget:
        return (
            f"ease: needs about {need / _GIB:.1f} GiB ({n_items:,} items^2 x 20 B for the item-item matrices + "
            f"{n_users:,} users x {n_items:,} items x 8 B for the dense user rows), over models.ease.max_memory_gb "
            f"= {cfg.max_memory_gb:g}; {fix}"
        )
    return None


def fit_matrix(matrix: sp.csr_matrix, binary: bool) -> sp.csr_matrix:
    """What EASE is fitted on: the train CSR as float64, its stored positive entries set to 1 when ``binary``."""
    x = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    x.data = np.where(x.data > 0, 1.0 if binary else x.data, 0.0)
    x.eliminate_zeros()
    return x


def recency_matrix(train: Interactions, half_life_days: float) -> sp.csr_matrix:
    """The pairs of ``train.matrix`` weighted by how recently the user last bought the item.

    Entry (u, i) = ``0.5 ** (age / half_life_days)``, the age in days from the pair's last positive event in
    ``train.events`` to the last event of the window (the fit window's end: the validation start when
    validating, the log's end in the refit), on the pairs with positive net confidence (a fully cancelled pair
    stays out, as in the binary matrix). Old co-purchases then weigh less in the Gram matrix and in the user's
    query row: on a seasonal catalog (retail) what people bought this autumn predicts their next basket better
    than what they bought last winter.

    Raises:
        ConfigError: the events lack timestamps, or were not loaded (``train.events`` empty).
    """
    ev = train.events
    if ev.height == 0 or "ts" not in ev.columns:
        raise ConfigError("models.ease.half_life_days needs the train events with timestamps, but none were "
                          "loaded; set models.ease.half_life_days to null")  # fmt: skip
    if missing := ev["ts"].null_count():
        raise ConfigError(f"models.ease.half_life_days={half_life_days:g} needs a timestamp on every event, but "
                          f"{missing:,} have none; set it to null or map ingest.columns.timestamp")  # fmt: skip
    end = ev["ts"].max()
    last = ev.filter(pl.col("weight") > 0).group_by("user_idx", "item_idx").agg(pl.col("ts").max())
    age = last.select((pl.lit(end) - pl.col("ts")).dt.total_microseconds().alias("age"))["age"]
    age_days = age.to_numpy() / 86_400e6
    rec = sp.csr_matrix(
        (np.exp2(-age_days / half_life_days), (last["user_idx"].to_numpy(), last["item_idx"].to_numpy())),
        shape=train.shape,
        dtype=np.float64,
    )
    return sp.csr_matrix(rec.multiply(train.matrix > 0), dtype=np.float64)


def inputs(train: Interactions, cfg: EASEConfig) -> sp.csr_matrix:
    """X, what EASE is fitted on and scores with: recency-weighted pairs (``cfg.half_life_days``), else
    ``fit_matrix(train.matrix, cfg.binary)``."""
    if cfg.half_life_days is not None:
        return recency_matrix(train, cfg.half_life_days)
    return fit_matrix(train.matrix, cfg.binary)


def gram(x: sp.csr_matrix) -> np.ndarray:
    """G = X^T X as a dense float64 (n_items x n_items) array."""
    return np.asarray((x.T @ x).toarray(), dtype=np.float64)


def weights(g: np.ndarray, regularization: float, overwrite: bool = False, threads: int = 0) -> np.ndarray:
    """B from the Gram matrix: float32 (n_items x n_items, column-major), diagonal 0, ``B[i, j] = -P[i, j] / P[j, j]``.

    Args:
        g: G = X^T X, float64, symmetric.
        regularization: lambda > 0 (G + lambda I is then positive definite).
        overwrite: reuse ``g``'s memory for the inverse (``g`` is destroyed); False keeps it (tuning reuses it).
        threads: BLAS threads for the inverse (0: BLAS's default, every core); small catalogs always use 1.
    """
    if regularization <= 0:
        raise ValueError(f"ease: regularization must be > 0, got {regularization}; set models.ease.regularization")
    n = g.shape[0]
    a = g if overwrite else g.copy()
    a[np.diag_indices(n)] += regularization
    limit = 1 if n < _PARALLEL_MIN_ITEMS else (threads or None)
    with threadpool_limits(limit, user_api="blas"):
        chol, info = lapack.dpotrf(a, lower=False, overwrite_a=True, clean=False)
        if info != 0:
            raise ValueError(f"ease: G + {regularization:g} I is not positive definite (LAPACK potrf info {info}); "
                             "raise models.ease.regularization")  # fmt: skip
        p, info = lapack.dpotri(chol, lower=False, overwrite_c=True)
    if info != 0:
        raise ValueError(f"ease: inverse failed (LAPACK potri info {info}); raise models.ease.regularization")
    _symmetrize_from_upper(p)
    p /= -np.diag(p)[None, :]  # column j scaled by -1 / P[j, j]
    p[np.diag_indices(n)] = 0.0
    return p.astype(np.float32, order="F")  # column-major: B.T (the item vectors) is C-contiguous, no copy


def _symmetrize_from_upper(a: np.ndarray, block: int = 1024) -> None:
    """Copy the upper triangle onto the lower one in place, a block of rows at a time (no n^2 temporaries)."""
    for r0 in range(0, a.shape[0], block):
        r1 = min(r0 + block, a.shape[0])
        a[r0:r1, :r0] = a[:r0, r0:r1].T
        sub = a[r0:r1, r0:r1]
        sub[np.tril_indices(r1 - r0, -1)] = sub.T[np.tril_indices(r1 - r0, -1)]


def embeddings(
    train: Interactions, b: np.ndarray, x: sp.csr_matrix | np.ndarray, info: dict[str, object]
) -> Embeddings:
    """The ``Embeddings`` of a fitted B: user vectors = the dense rows of ``x``, item vectors = B's columns."""
    user = sp.csr_matrix(x, dtype=np.float32).toarray() if sp.issparse(x) else x
    return Embeddings(
        user_vectors=np.asarray(user, dtype=np.float32),
        item_vectors=b.T,
        users=train.users,
        items=train.items,
        model="ease",
        scoring="dot",
        info=info,
    )


def train_ease(train: Interactions, cfg: EASEConfig) -> Embeddings:
    """Fit EASE on ``train.matrix`` (binary or confidence, ``cfg.binary``) with lambda = ``cfg.regularization``.

    Returns:
        ``Embeddings`` (model "ease", d = n_items): user vectors (n_users, n_items) = the fitted X rows, item
        vectors (n_items, n_items) = B^T. ``info``: backend, regularization, binary, fit_seconds, memory_gib.

    Raises:
        EASETooLarge: the catalog is above ``cfg.max_items`` or the estimate above ``cfg.max_memory_gb``
            (the message names both numbers and the fix).
    """
    check_trainable(train, None, "ease")
    n_users, n_items = train.shape
    reason = fits(n_users, n_items, cfg)
    if reason is not None:
        raise EASETooLarge(reason)
    t0 = time.perf_counter()
    x = inputs(train, cfg)
    b = weights(gram(x), cfg.regularization, overwrite=True, threads=cfg.blas_threads)
    seconds = time.perf_counter() - t0
    log.info("ease: %d users x %d items, lambda=%g, binary=%s, half-life=%s days: fitted in %.2f s", n_users,
             n_items, cfg.regularization, cfg.binary, cfg.half_life_days, seconds)  # fmt: skip
    info: dict[str, object] = {
        "backend": "numpy-lapack",
        "regularization": cfg.regularization,
        "binary": cfg.binary,
        "half_life_days": cfg.half_life_days,
        "fit_seconds": seconds,
        "memory_gib": round(memory_bytes(n_users, n_items) / _GIB, 3),
    }
    return embeddings(train, b, x, info)
