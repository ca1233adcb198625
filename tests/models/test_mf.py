"""mf: ALS and BPR recover planted clusters, are deterministic under a seed, and keep the best iteration."""

from __future__ import annotations

from collections.abc import Callable

import implicit.als
import implicit.gpu
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys_embed.config import ALSConfig, BPRConfig
from recsys_embed.errors import ConfigError
from recsys_embed.evaluation.metrics import evaluate
from recsys_embed.models.mf import WarmStartError, sample_val_targets, train_als, train_bpr, warm_start_factors
from recsys_embed.models.popularity import train_popularity
from recsys_embed.types import Embeddings, IdMap, Interactions, RowReport

N_USERS, N_CLUSTERS, PER_CLUSTER = 300, 5, 40


def _planted(seed: int = 0) -> tuple[Interactions, sp.csr_matrix]:
    """300 users in 5 clusters; cluster c likes items [40c, 40c + 40). Each user has 12 train items of its
    cluster plus 2 random noise items, and 5 held-out items of its cluster (unseen in train).

    Clusters are the same size, so every item is about equally popular: popularity cannot find the
    cluster (recall@10 about 10/200 = 0.05), while any model that recovers it gets about 10/28 = 0.36.
    """
    rng = np.random.default_rng(seed)
    n_items = N_CLUSTERS * PER_CLUSTER
    cluster = np.arange(N_USERS) % N_CLUSTERS
    # per user: 17 distinct items of its cluster (random order); first 12 train, last 5 held out
    own = np.argsort(rng.random((N_USERS, PER_CLUSTER)), axis=1)[:, :17] + cluster[:, None] * PER_CLUSTER
    noise = rng.integers(0, n_items, size=(N_USERS, 2))
    tr_rows = np.repeat(np.arange(N_USERS), 14)
    tr_cols = np.concatenate([own[:, :12], noise], axis=1).ravel()
    train = sp.csr_matrix((np.ones(len(tr_rows), np.float32), (tr_rows, tr_cols)), shape=(N_USERS, n_items))
    train.sum_duplicates()
    train.data[:] = 1.0
    targets = sp.csr_matrix(
        (np.ones(N_USERS * 5, np.float32), (np.repeat(np.arange(N_USERS), 5), own[:, 12:].ravel())),
        shape=(N_USERS, n_items),
    )
    targets = sp.csr_matrix(targets - targets.multiply(train > 0))  # a noise item may already be seen
    targets.eliminate_zeros()
    coo = train.tocoo()
    inter = Interactions(
        matrix=train,
        users=IdMap(pl.Series("id", [f"u{i}" for i in range(N_USERS)])),
        items=IdMap(pl.Series("id", [f"i{i}" for i in range(n_items)])),
        report=RowReport(rows_read=train.nnz, kept=train.nnz),
        events=pl.DataFrame({"user_idx": coo.row.astype(np.int64), "item_idx": coo.col.astype(np.int64)}),
    )
    return inter, targets


@pytest.fixture(scope="module")
def planted() -> tuple[Interactions, sp.csr_matrix]:
    return _planted()


ALS = ALSConfig(factors=16, iterations=8, regularization=0.05, alpha=10.0, eval_every=0, use_gpu=False)
BPR = BPRConfig(factors=16, iterations=60, learning_rate=0.05, eval_every=0, use_gpu=False)


def _recall10(emb: Embeddings, planted: tuple[Interactions, sp.csr_matrix]) -> float:
    train, targets = planted
    return evaluate(emb, train.matrix, targets, ks=[10])["recall_at_10"]


def test_als_and_bpr_beat_popularity_on_planted_clusters(planted: tuple[Interactions, sp.csr_matrix]) -> None:
    train, _ = planted
    pop = _recall10(train_popularity(train), planted)
    als = _recall10(train_als(train, ALS), planted)
    bpr = _recall10(train_bpr(train, BPR), planted)
    # measured: popularity ~0.05, ALS and BPR ~0.35 (the ceiling is ~10/28 = 0.36); demand a 4x margin
    assert pop < 0.1
    assert als > 4 * pop and als > 0.25, (als, pop)
    assert bpr > 4 * pop and bpr > 0.25, (bpr, pop)


@pytest.mark.parametrize("trainer,cfg", [(train_als, ALS), (train_bpr, BPR)], ids=["als", "bpr"])
def test_deterministic_under_seed(
    trainer: Callable[..., Embeddings], cfg: ALSConfig | BPRConfig, planted: tuple[Interactions, sp.csr_matrix]
) -> None:
    train, _ = planted
    a, b = trainer(train, cfg), trainer(train, cfg)
    np.testing.assert_array_equal(a.user_vectors, b.user_vectors)
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
    c = trainer(train, cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert not np.array_equal(a.item_vectors, c.item_vectors)


def test_shapes_ids_backend_and_info(planted: tuple[Interactions, sp.csr_matrix]) -> None:
    train, _ = planted
    als, bpr = train_als(train, ALS), train_bpr(train, BPR)
    assert als.user_vectors.shape == (N_USERS, 16) and als.item_vectors.shape == (200, 16)
    # BPR: implicit appends an item-bias column (user side fixed at 1), so d = factors + 1
    assert bpr.user_vectors.shape == (N_USERS, 17) and bpr.item_vectors.shape == (200, 17)
    np.testing.assert_array_equal(bpr.user_vectors[:, -1], 1.0)
    for emb, name in ((als, "als"), (bpr, "bpr")):
        assert emb.model == name and emb.scoring == "dot"
        assert emb.users is train.users and emb.items is train.items
        assert emb.user_vectors.dtype == np.float32
        assert emb.info["backend"] == "implicit-cpu"
        assert emb.info["best_iteration"] is None  # no validation asked for
        assert emb.info["fit_seconds"] > 0
        assert len(emb.info["history"]) == (ALS.iterations if name == "als" else BPR.iterations)


def test_als_equals_raw_implicit_fit_so_alpha_is_applied_once(planted: tuple[Interactions, sp.csr_matrix]) -> None:
    # With validation off, train_als must be exactly implicit's fit with the same parameters: a second
    # alpha scaling (C = alpha * alpha * r) or any other change to the matrix would change the factors.
    train, _ = planted
    emb = train_als(train, ALS)
    with threadpool_limits(1, "blas"):
        raw = implicit.als.AlternatingLeastSquares(
            factors=ALS.factors,
            regularization=ALS.regularization,
            alpha=ALS.alpha,
            iterations=ALS.iterations,
            use_gpu=False,
            random_state=ALS.seed,
        )
        raw.fit(train.matrix, show_progress=False)
    np.testing.assert_array_equal(emb.user_vectors, raw.user_factors)
    np.testing.assert_array_equal(emb.item_vectors, raw.item_factors)


def test_progress_callbacks_and_best_iteration_kept(planted: tuple[Interactions, sp.csr_matrix]) -> None:
    train, targets = planted
    calls: list[tuple[int, dict[str, float]]] = []
    # 10 iterations, validate every 3 -> at iterations 3, 6, 9 and the last one, 10.
    # On this data ALS peaks early (measured: recall@10 0.36 at iteration 3, lower afterwards as it fits noise).
    cfg = ALS.model_copy(update={"iterations": 10, "eval_every": 3})
    emb = train_als(
        train, cfg, targets, ks=[10], metric="recall_at_10", on_metrics=lambda m, step: calls.append((step, m))
    )
    loss_steps = [s for s, m in calls if "train_loss" in m]
    val_steps = [s for s, m in calls if "val_recall_at_10" in m]
    assert loss_steps == list(range(1, 11))
    assert val_steps == [3, 6, 9, 10]
    val = {s: m["val_recall_at_10"] for s, m in calls if s in val_steps and "val_recall_at_10" in m}
    best_step = max(val, key=lambda s: (val[s], -s))  # the first of equal maxima
    assert emb.info["best_iteration"] == best_step
    assert emb.info["best_val_metric"] == pytest.approx(val[best_step])
    assert best_step < 10, "this seeded case must exercise the snapshot path"
    assert emb.info["returned_iteration"] == best_step
    # the returned factors are the snapshot: they score exactly the best validation value, not the last one
    assert _recall10(emb, planted) == pytest.approx(val[best_step])
    assert _recall10(emb, planted) > val[10]
    # history: one row per iteration, validation merged into the validated rows
    hist = emb.info["history"]
    assert [int(h["iteration"]) for h in hist] == list(range(1, 11))
    assert "val_recall_at_10" in hist[2] and "val_recall_at_10" not in hist[3]


def test_bpr_reports_train_auc_and_validates(planted: tuple[Interactions, sp.csr_matrix]) -> None:
    train, targets = planted
    calls: list[tuple[int, dict[str, float]]] = []
    cfg = BPR.model_copy(update={"iterations": 20, "eval_every": 10})
    emb = train_bpr(train, cfg, targets, ks=[10], metric="ndcg_at_10", on_metrics=lambda m, s: calls.append((s, m)))
    aucs = [m["train_auc"] for _, m in calls if "train_auc" in m]
    assert len(aucs) == 20 and all(0.0 <= a <= 1.0 for a in aucs)
    assert aucs[-1] > aucs[0]  # it learns
    assert [s for s, m in calls if "val_ndcg_at_10" in m] == [10, 20]
    assert emb.info["best_iteration"] in (10, 20)


def test_no_training_loss_when_disabled(planted: tuple[Interactions, sp.csr_matrix]) -> None:
    train, _ = planted
    calls: list[dict[str, float]] = []
    train_als(train, ALS.model_copy(update={"training_loss": False}), on_metrics=lambda m, s: calls.append(m))
    assert calls == []


def test_val_users_are_sampled_and_seeded() -> None:
    _, targets = _planted()
    a = sample_val_targets(targets, 50, seed=1)
    b = sample_val_targets(targets, 50, seed=1)
    assert a.shape == targets.shape
    assert (np.diff(a.indptr) > 0).sum() == 50
    assert (a != b).nnz == 0  # same seed, same users
    # kept rows are the original rows, untouched
    kept = np.flatnonzero(np.diff(a.indptr))
    assert (a[kept] != targets[kept]).nnz == 0
    assert sample_val_targets(targets, 0, seed=1).nnz == targets.nnz  # 0 keeps everyone


def test_bad_inputs_fail_before_training(planted: tuple[Interactions, sp.csr_matrix]) -> None:
    train, targets = planted
    with pytest.raises(ValueError, match="'ndcg_at_20' is not computed for ks=\\[10\\]"):
        train_als(train, ALS, targets, ks=[10], metric="ndcg_at_20")
    with pytest.raises(ValueError, match="val_targets shape"):
        train_bpr(train, BPR, targets[:10], ks=[10], metric="recall_at_10")


@pytest.mark.skipif(implicit.gpu.HAS_CUDA, reason="checks the CPU-only error")
def test_use_gpu_true_without_cuda_names_the_fix(planted: tuple[Interactions, sp.csr_matrix]) -> None:
    train, _ = planted
    with pytest.raises(ConfigError, match=r"models\.als\.use_gpu .*auto or false"):
        train_als(train, ALS.model_copy(update={"use_gpu": True}))


@pytest.mark.gpu
@pytest.mark.skipif(not implicit.gpu.HAS_CUDA, reason="implicit has no CUDA backend here")
def test_gpu_backend_returns_numpy_factors(planted: tuple[Interactions, sp.csr_matrix]) -> None:
    train, targets = planted
    emb = train_als(
        train, ALS.model_copy(update={"use_gpu": True, "eval_every": 4}), targets, ks=[10], metric="recall_at_10"
    )
    assert emb.info["backend"] == "implicit-gpu"
    assert isinstance(emb.user_vectors, np.ndarray) and emb.user_vectors.shape == (N_USERS, 16)
    assert _recall10(emb, planted) > 0.25


# --------------------------------------------------------------------------------------------------------
# warm start (incremental retrains)


def _emb(
    users: list[str], items: list[str], user_vectors: np.ndarray, item_vectors: np.ndarray, model: str
) -> Embeddings:
    return Embeddings(
        user_vectors=user_vectors.astype(np.float32),
        item_vectors=item_vectors.astype(np.float32),
        users=IdMap(pl.Series("id", users)),
        items=IdMap(pl.Series("id", items)),
        model=model,
    )


def _inter(users: list[str], items: list[str]) -> Interactions:
    m = sp.csr_matrix(np.ones((len(users), len(items)), np.float32))
    return Interactions(m, IdMap(pl.Series("id", users)), IdMap(pl.Series("id", items)), RowReport(), pl.DataFrame())


def test_warm_start_factors_match_rows_by_original_id() -> None:
    # previous run: users a, b, c and items x, y (rows 0..2 / 0..1); now: c moved to row 0, b dropped out,
    # d and e are new; items y, x (swapped) and a new z
    prev = _emb(["a", "b", "c"], ["x", "y"], np.arange(6).reshape(3, 2) + 1.0, np.array([[10.0, 11], [20, 21]]), "als")
    warm = warm_start_factors(prev, _inter(["c", "d", "a", "e"], ["y", "x", "z"]), "als", factors=2, seed=0)
    np.testing.assert_array_equal(warm.user[0], [5.0, 6.0])  # c: previous row 2
    np.testing.assert_array_equal(warm.user[2], [1.0, 2.0])  # a: previous row 0
    np.testing.assert_array_equal(warm.item[:2], [[20.0, 21.0], [10.0, 11.0]])  # y, x by ID, not by position
    # new rows: implicit's own ALS init, U[0, 0.01)
    new = np.concatenate([warm.user[[1, 3]], warm.item[[2]]])
    assert ((new >= 0) & (new < 0.01)).all() and new.std() > 0
    assert (warm.users_reused, warm.items_reused) == (2, 2)
    assert warm.user.dtype == np.float32 and warm.user.flags.c_contiguous

    # BPR: d = factors + 1; a new user's last column is implicit's fixed 1 (the item bias's partner)
    prev_bpr = _emb(["a"], ["x"], np.array([[0.5, 1.0]]), np.array([[0.3, -0.2]]), "bpr")
    warm_bpr = warm_start_factors(prev_bpr, _inter(["a", "d"], ["x"]), "bpr", factors=1, seed=0)
    np.testing.assert_array_equal(warm_bpr.user, [[0.5, 1.0], [warm_bpr.user[1, 0], 1.0]])
    assert abs(warm_bpr.user[1, 0]) <= 0.5  # (U[0, 1) - 0.5) / factors

    with pytest.raises(WarmStartError, match=r"previous als has 2 columns, this fit needs 4 \(factors changed\?\)"):
        warm_start_factors(prev, _inter(["a"], ["x"]), "als", factors=4, seed=0)
    with pytest.raises(WarmStartError, match="of model 'als', not 'bpr'"):
        warm_start_factors(prev, _inter(["a"], ["x"]), "bpr", factors=1, seed=0)


@pytest.fixture(scope="module")
def grown_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Interactions, Interactions, sp.csr_matrix]:
    """A seeded synthetic log (planted topics, 200k events, 1,000 users x 500 items over 90 days) through the real
    ingest: the previous run trained on the first 60% of the time span, this run on the first 85% (ID maps extended
    as the pipeline does), and the last 15% is the test period."""
    from recsys_embed.bench.ingest_suite import ingest_config
    from recsys_embed.data.generate import generate, preset
    from recsys_embed.data.ingest import load_events
    from recsys_embed.data.interactions import build_interactions
    from recsys_embed.data.split import build_targets

    folder = tmp_path_factory.mktemp("log")
    generate(preset("tiny", n_events=200_000), folder)
    cfg = ingest_config(folder)
    events = load_events(cfg).events
    lo, hi = events["ts"].min(), events["ts"].max()
    c1, c2 = lo + (hi - lo) * 0.6, lo + (hi - lo) * 0.85  # type: ignore[operator]
    old, now, test = (
        events.filter(pl.col("ts") < c1),
        events.filter(pl.col("ts") < c2),
        events.filter(pl.col("ts") >= c2),
    )
    prev = build_interactions(old, cfg, RowReport(rows_read=old.height, kept=old.height))
    report = RowReport(rows_read=events.height, kept=events.height)
    train = build_interactions(now, cfg, report, previous=(prev.users, prev.items))
    return prev, train, build_targets(test, train, report, "test").matrix


def test_warm_started_als_reaches_the_cold_quality_in_fewer_iterations(
    grown_log: tuple[Interactions, Interactions, sp.csr_matrix],
) -> None:
    prev_train, train, targets = grown_log
    cfg = ALSConfig(factors=32, iterations=15, eval_every=0, use_gpu=False)
    previous = train_als(prev_train, cfg)
    cold = train_als(train, cfg)
    cold2 = train_als(train, cfg.model_copy(update={"iterations": 2}))
    warm2 = train_als(train, cfg.model_copy(update={"iterations": 2}), warm_start=previous)

    def ndcg(emb: Embeddings) -> float:
        return evaluate(emb, train.matrix, targets, ks=[20])["ndcg_at_20"]

    n_old_users, n_old_items = prev_train.shape
    assert train.shape[0] > n_old_users  # the log grew: new users arrived
    assert warm2.info["warm_start"] is True and cold.info["warm_start"] is False
    assert (warm2.info["warm_start_users"], warm2.info["warm_start_items"]) == (n_old_users, n_old_items)
    # measured: warm 2 iterations 0.2511, cold 15 iterations 0.2506, cold 2 iterations 0.2312
    assert ndcg(warm2) >= 0.99 * ndcg(cold), (ndcg(warm2), ndcg(cold))
    assert ndcg(warm2) > ndcg(cold2) + 0.01, (ndcg(warm2), ndcg(cold2))

    # it started from the previous factors: old items' vectors stay close to the previous ones (ALS factors are
    # defined only up to rotation, so a cold fit's vectors are unrelated to them)
    def mean_cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    old_items = previous.item_vectors
    assert mean_cos(warm2.item_vectors[:n_old_items], old_items) > 0.8
    assert abs(mean_cos(cold.item_vectors[:n_old_items], old_items)) < 0.3


def test_bpr_warm_start_is_used_when_it_fits_and_skipped_with_the_reason_when_not(
    planted: tuple[Interactions, sp.csr_matrix],
) -> None:
    train, _ = planted
    previous = train_bpr(train, BPR)
    warm = train_bpr(train, BPR.model_copy(update={"iterations": 5}), warm_start=previous)
    assert warm.info["warm_start"] is True and warm.info["warm_start_users"] == N_USERS
    # five iterations from a fitted start keep its quality (measured: 0.371, the previous model 0.358; cold: 0.053)
    assert _recall10(warm, planted) > 0.25
    cold5 = train_bpr(train, BPR.model_copy(update={"iterations": 5}))
    assert _recall10(cold5, planted) < 0.15
    wider = train_bpr(train, BPR.model_copy(update={"factors": 8, "iterations": 5}), warm_start=previous)
    assert wider.info["warm_start"] is False
    assert wider.info["warm_start_skipped"] == "previous bpr has 17 columns, this fit needs 9 (factors changed?)"
