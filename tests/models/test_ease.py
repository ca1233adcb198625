"""EASE: B worked out by hand on tiny matrices, scores through the shared ``Embeddings`` contract, the binary /
confidence choice, and the refusal above the item or memory budget (the run skips the model and goes on)."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed.config import EASEConfig, EvalConfig, ModelsConfig
from recsys_embed.errors import ConfigError
from recsys_embed.evaluation.metrics import evaluate
from recsys_embed.models import ease
from recsys_embed.models.factory import runnable_models, train_model
from recsys_embed.types import IdMap, Interactions, RowReport


def _interactions(dense: list[list[float]]) -> Interactions:
    m = sp.csr_matrix(np.asarray(dense, dtype=np.float32))
    n_users, n_items = m.shape
    return Interactions(
        matrix=m,
        users=IdMap(pl.Series("id", [f"u{i}" for i in range(n_users)])),
        items=IdMap(pl.Series("id", [100 + i for i in range(n_items)])),
        report=RowReport(rows_read=m.nnz, kept=m.nnz),
        events=pl.DataFrame(),
    )


def _b(dense: list[list[float]], lam: float, binary: bool = True) -> np.ndarray:
    return ease.weights(ease.gram(ease.fit_matrix(sp.csr_matrix(np.asarray(dense, dtype=np.float32)), binary)), lam)


def test_symmetric_worked_example() -> None:
    # X = [[1,1,0],[0,1,1],[1,0,1]]: G = X^T X = I + J (2 on the diagonal, 1 elsewhere); lambda = 1:
    # G + I = 2I + J, whose inverse is (I - J / 5) / 2: P_ii = (1 - 1/5) / 2 = 0.4, P_ij = -1/10 = -0.1.
    # B_ij = -P_ij / P_jj = 0.1 / 0.4 = 0.25 off the diagonal, 0 on it.
    b = _b([[1, 1, 0], [0, 1, 1], [1, 0, 1]], 1.0)
    np.testing.assert_allclose(b, [[0, 0.25, 0.25], [0.25, 0, 0.25], [0.25, 0.25, 0]], atol=1e-6)


def test_asymmetric_worked_example_scales_columns() -> None:
    # X = [[1,1,0],[1,0,0],[0,0,1]]: G = [[2,1,0],[1,1,0],[0,0,1]]; lambda = 1: G + I = [[3,1,0],[1,2,0],[0,0,2]].
    # The 2x2 block [[3,1],[1,2]] has det 5 and inverse [[2,-1],[-1,3]] / 5; the last entry is 1/2, so
    # P = [[0.4,-0.2,0],[-0.2,0.6,0],[0,0,0.5]].
    # B_01 = -P_01 / P_11 = 0.2 / 0.6 = 1/3;  B_10 = -P_10 / P_00 = 0.2 / 0.4 = 0.5;  item 2 is alone: 0.
    b = _b([[1, 1, 0], [1, 0, 0], [0, 0, 1]], 1.0)
    np.testing.assert_allclose(b, [[0, 1 / 3, 0], [0.5, 0, 0], [0, 0, 0]], atol=1e-6)


def test_scores_through_the_embeddings_contract_are_x_times_b() -> None:
    # the asymmetric example: user 1 bought item 0 only, so its scores are row 0 of B: item 1 gets 1/3, item 2 0;
    # user 2 (item 2 only) gets 0 everywhere but on itself.
    train = _interactions([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    emb = train_model("ease", train, ModelsConfig(ease=EASEConfig(enabled=True, regularization=1.0)), EvalConfig())
    assert emb.model == "ease" and emb.scoring == "dot" and emb.dim == 3
    assert emb.user_vectors.shape == (3, 3) and emb.item_vectors.shape == (3, 3)
    assert emb.item_vectors.flags.c_contiguous
    user, item = emb.scoring_vectors()
    scores = user @ item.T
    np.testing.assert_allclose(scores[1], [0.0, 1 / 3, 0.0], atol=1e-6)
    np.testing.assert_allclose(scores, train.matrix.toarray() @ _b([[1, 1, 0], [1, 0, 0], [0, 0, 1]], 1.0), atol=1e-6)
    # the shared evaluation ranks it: user 1's held-out item 1 is its first unseen item -> recall@1 = 1
    targets = sp.csr_matrix(([1.0], ([1], [1])), shape=(3, 3))
    assert evaluate(emb, train.matrix, targets, [1])["recall_at_1"] == 1.0


def test_binary_ignores_confidence_and_confidence_does_not() -> None:
    ones = [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    heavy = [[5, 1, 0], [1, 0, 0], [0, 0, 3]]
    np.testing.assert_array_equal(_b(heavy, 1.0, binary=True), _b(ones, 1.0, binary=True))
    # with confidence, G_00 = 5^2 + 1 = 26 instead of 2: item 0's column changes
    assert not np.allclose(_b(heavy, 1.0, binary=False), _b(ones, 1.0, binary=False))


def test_matches_a_dense_inverse_on_random_data() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((60, 40)) < 0.2).astype(np.float64)
    lam = 3.0
    p = np.linalg.inv(x.T @ x + lam * np.eye(40))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(_b(x.tolist(), lam), expected, rtol=1e-4, atol=1e-6)


def test_symmetrize_over_block_boundaries() -> None:
    rng = np.random.default_rng(1)
    full = rng.random((7, 7))
    full = full + full.T
    upper = np.triu(full) + np.tril(rng.random((7, 7)), -1)  # garbage below the diagonal
    ease._symmetrize_from_upper(upper, block=3)
    np.testing.assert_array_equal(upper, full)


def test_memory_estimate() -> None:
    # 20 B per item pair + 8 B per (user, item): 3 items, 2 users -> 180 + 48
    assert ease.memory_bytes(2, 3) == 20 * 9 + 8 * 6


def test_refuses_above_the_item_count_naming_numbers_and_fix() -> None:
    train = _interactions([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    cfg = ModelsConfig(ease=EASEConfig(enabled=True, max_items=2))
    fix = r"3 items is over models\.ease\.max_items = 2.*models\.ease\.enabled=false"
    with pytest.raises(ease.EASETooLarge, match=fix):
        train_model("ease", train, cfg, EvalConfig())


def test_refuses_above_the_memory_budget() -> None:
    # 30,000 items x 200,000 users: 20 x 9e8 + 8 x 6e9 = 6.6e10 B = 61.5 GiB, over 8 GiB
    reason = ease.fits(200_000, 30_000, EASEConfig())
    assert reason is not None
    assert "61.5 GiB" in reason and "30,000 items" in reason and "200,000 users" in reason
    assert "models.ease.max_memory_gb = 8" in reason
    assert ease.fits(3_741, 3_526, EASEConfig()) is None  # the retail catalog fits (~0.35 GiB)


def test_the_run_skips_ease_above_the_budget_and_keeps_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    cfg = ModelsConfig(ease=EASEConfig(enabled=True, max_items=1_000))
    assert "ease" in runnable_models(cfg, 500, 800)
    with caplog.at_level(logging.WARNING, logger="recsys_embed.models.factory"):
        names = runnable_models(cfg, 500, 5_000)
    assert names == ["popularity", "als", "bpr"]  # ease skipped, the others (two-tower is off by default) run
    assert "5,000 items is over models.ease.max_items = 1,000" in caplog.text and "skipping it" in caplog.text


def _with_events(dense: list[list[float]], rows: list[tuple[int, int, str, float]]) -> Interactions:
    from datetime import datetime

    train = _interactions(dense)
    events = pl.DataFrame(
        {
            "user_idx": [r[0] for r in rows],
            "item_idx": [r[1] for r in rows],
            "ts": [datetime.fromisoformat(r[2] + "T00:00:00+00:00") for r in rows],
            "weight": [r[3] for r in rows],
        },
        schema={"user_idx": pl.Int64, "item_idx": pl.Int64, "ts": pl.Datetime("us", "UTC"), "weight": pl.Float64},
    )
    return Interactions(train.matrix, train.users, train.items, train.report, events)


def test_recency_weights_each_pair_by_its_last_purchase() -> None:
    # The window ends 2011-03-02 (the last event). Half-life 30 days:
    # (0,0) last bought 2011-03-02 -> 1; (0,1) bought 2011-01-01 and again 2011-01-31 -> 30 days -> 0.5;
    # (1,1) bought 2010-12-31 -> 61 days -> 0.5 ** (61/30); (1,2) bought then fully cancelled -> net 0, left out,
    # and the cancellation (the later, negative event) does not count as a purchase.
    rows = [(0, 0, "2011-03-02", 1.0), (0, 1, "2011-01-01", 1.0), (0, 1, "2011-01-31", 1.0),
            (1, 1, "2010-12-31", 1.0), (1, 2, "2011-02-01", 1.0), (1, 2, "2011-02-20", -1.0)]  # fmt: skip
    train = _with_events([[1, 2, 0], [0, 1, 0]], rows)
    x = ease.recency_matrix(train, 30.0).toarray()
    np.testing.assert_allclose(x, [[1.0, 0.5, 0.0], [0.0, 0.5 ** (61 / 30), 0.0]], rtol=1e-12)

    cfg = EASEConfig(enabled=True, regularization=1.0, half_life_days=30.0)
    emb = ease.train_ease(train, cfg)
    np.testing.assert_allclose(emb.user_vectors, x.astype(np.float32))  # the query rows are the decayed rows
    assert emb.info["half_life_days"] == 30.0
    plain = ease.inputs(train, cfg.model_copy(update={"half_life_days": None})).toarray()
    np.testing.assert_array_equal(plain, [[1, 1, 0], [0, 1, 0]])  # null: the paper's binary matrix


def test_recency_needs_timestamps_and_says_how_to_switch_it_off() -> None:
    train = _with_events([[1.0]], [(0, 0, "2011-01-01", 1.0)])
    no_time = Interactions(train.matrix, train.users, train.items, train.report,
                           train.events.with_columns(pl.lit(None, pl.Datetime("us", "UTC")).alias("ts")))  # fmt: skip
    for bad in (no_time, _interactions([[1.0]])):
        with pytest.raises(ConfigError, match=r"models\.ease\.half_life_days"):
            ease.recency_matrix(bad, 30.0)
