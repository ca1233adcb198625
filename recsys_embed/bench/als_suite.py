"""ALS fit benchmark: ``mf.train_als`` (validation off) against a bare implicit ``fit`` on the same matrix.

- Candidate ("train_als"): ``train_als(train, ALSConfig(..., eval_every=0))``: backend factory, BLAS pinned
  to one thread, per-iteration loss logging and callback, ``Embeddings`` construction.
- Baseline ("implicit"): ``implicit.als.AlternatingLeastSquares(same params).fit(csr)`` inside the same
  ``threadpool_limits(1, "blas")``, with the same training-loss computation, no callback.

The matrix is a seeded power-law CSR of MovieLens shape built here with NumPy/SciPy (so the suite does
not depend on the log generator): user activity and item popularity both heavy-tailed, every user with at
least 20 items as in MovieLens. The "als-noloss" row repeats the comparison without implicit's per-iteration
training loss on either side; comparing the two baselines shows what the loss costs.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys_embed.bench.harness import BenchResult, Measurement, alternate, time_call
from recsys_embed.bench.matrices import power_law_matrix
from recsys_embed.config import ALSConfig
from recsys_embed.models.mf import als_model, train_als, use_gpu_backend
from recsys_embed.types import IdMap, Interactions, RowReport

log = logging.getLogger(__name__)

TARGET = "<= 1.05x"





def _interactions(m: sp.csr_matrix) -> Interactions:
    n_users, n_items = m.shape
    return Interactions(
        matrix=m,
        users=IdMap(pl.Series("id", np.arange(n_users, dtype=np.int64))),
        items=IdMap(pl.Series("id", np.arange(n_items, dtype=np.int64))),
        report=RowReport(rows_read=m.nnz, kept=m.nnz),
        events=pl.DataFrame(),
    )


def _val_targets(m: sp.csr_matrix, per_user: int = 2, seed: int = 1) -> sp.csr_matrix:
    """``per_user`` random items for every user (timing only: overlap with train is simply never hit)."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(m.shape[0]), per_user)
    cols = rng.integers(0, m.shape[1], size=rows.shape[0])
    return sp.csr_matrix((np.ones(rows.shape[0], dtype=np.float32), (rows, cols)), shape=m.shape)


def run(size: str = "20m", repeats: int = 3, factors: int = 64, iterations: int = 15) -> list[BenchResult]:
    """Time ``train_als`` against bare implicit ``fit`` on the ``size`` matrix, alternating, ``repeats`` times.

    Two rows: "als" (training loss on, both sides) and "als-noloss" (``training_loss=False`` against
    implicit's default, no loss). The "als" row's extras add ``train_als`` with validation every 5
    iterations on ``val_max_users`` sampled users, the price of keeping the best iteration.
    """
    m = power_law_matrix(size)
    train = _interactions(m)
    cfg = ALSConfig(factors=factors, iterations=iterations, eval_every=0)
    gpu = use_gpu_backend(cfg.use_gpu, "als")
    log.info("als bench: %s matrix %d x %d, %d nnz, gpu=%s", size, *m.shape, m.nnz, gpu)

    def raw_fit(loss: bool) -> Any:
        with threadpool_limits(1, "blas"):
            model = als_model(cfg, gpu, training_loss=loss)  # implicit's own class, the pipeline's settings
            model.fit(m, show_progress=False)
        return model

    matrix = f"{m.shape[0]:,} x {m.shape[1]:,}, {m.nnz:,} nnz"
    params = f"factors={factors} iterations={iterations} cg={cfg.use_cg} gpu={gpu}"
    cand, base = alternate(lambda: train_als(train, cfg), lambda: raw_fit(True), repeats)
    no_loss_cfg = cfg.model_copy(update={"training_loss": False})
    cand_nl, base_nl = alternate(lambda: train_als(train, no_loss_cfg), lambda: raw_fit(False), repeats)
    # decomposition of one more call: what train_als spends outside implicit's solver (robust to load noise)
    wall, emb = time_call(lambda: train_als(train, cfg))
    own = wall - emb.info["fit_seconds"] + emb.info["callback_seconds"]
    val_cfg = cfg.model_copy(update={"eval_every": 5})
    val = _val_targets(m)
    with_val = [time_call(lambda: train_als(train, val_cfg, val, ks=[20]))[0] for _ in range(repeats)]
    return [
        BenchResult(
            suite="als",
            size=size,
            candidate=Measurement("train_als", cand),
            baseline=Measurement("implicit", base),
            target=TARGET,
            extra={
                "matrix": matrix,
                "params": params + " training_loss=True",
                f"train_als + validation every 5 on {val_cfg.val_max_users:,} users (s, median)": round(
                    statistics.median(with_val), 3
                ),
                "ratio of that to implicit": round(statistics.median(with_val) / statistics.median(base), 3),
                "train_als own time outside the solver, one call (s)": f"{own:.4f} of {wall:.2f} ({own / wall:.3%})",
            },
        ),
        BenchResult(
            suite="als-noloss",
            size=size,
            candidate=Measurement("train_als", cand_nl),
            baseline=Measurement("implicit", base_nl),
            target=TARGET,
            extra={"params": params + " training_loss=False"},
        ),
    ]
