"""evaluate: every metric on a hand-worked case, edge cases, and a brute-force cross-check on random data."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed.evaluation.metrics import evaluate, metrics_table, popularity_percentile, selection_metrics
from recsys_embed.types import Embeddings, IdMap


def _emb(user_vectors: np.ndarray, item_vectors: np.ndarray) -> Embeddings:
    n_u, n_i = len(user_vectors), len(item_vectors)
    return Embeddings(
        user_vectors=np.asarray(user_vectors, dtype=np.float32),
        item_vectors=np.asarray(item_vectors, dtype=np.float32),
        users=IdMap(pl.Series("id", [f"u{i}" for i in range(n_u)])),
        items=IdMap(pl.Series("id", [f"i{i}" for i in range(n_i)])),
        model="fixed",
    )


def _csr(rows: list[int], cols: list[int], shape: tuple[int, int]) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)


@pytest.fixture
def tiny() -> tuple[Embeddings, sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    # 3 users, 6 items. Every user scores item i as 6 - i, so the ranking is 0, 1, 2, 3, 4, 5.
    emb = _emb(np.ones((3, 1)), np.array([[6.0], [5.0], [4.0], [3.0], [2.0], [1.0]]))
    # user 0 has seen item 1 -> ranked list 0, 2, 3, 4, 5; user 1 has seen nothing; user 2 has no target.
    seen = _csr([0, 2], [1, 4], (3, 6))
    # targets: user 0 -> {2, 5}; user 1 -> {0}
    targets = _csr([0, 0, 1], [2, 5, 0], (3, 6))
    popularity = np.array([50, 40, 30, 20, 10, 0])
    return emb, seen, targets, popularity


def test_each_metric_on_a_hand_worked_case(tiny: tuple[Embeddings, sp.csr_matrix, sp.csr_matrix, np.ndarray]) -> None:
    emb, seen, targets, popularity = tiny
    m = evaluate(emb, seen, targets, ks=[1, 3], item_popularity=popularity)
    # k = 3. user 0: top-3 = [0, 2, 3], hits [0, 1, 0], |T| = 2.  user 1: top-3 = [0, 1, 2], hits [1, 0, 0], |T| = 1.
    # recall:    u0 1 / min(2, 3) = 0.5;  u1 1 / 1 = 1            -> 0.75
    assert m["recall_at_3"] == pytest.approx(0.75)
    # precision: u0 1/3; u1 1/3                                    -> 1/3
    assert m["precision_at_3"] == pytest.approx(1 / 3)
    # ndcg:      u0 DCG = 1/log2(3) = 0.63093, IDCG = 1 + 1/log2(3) = 1.63093 -> 0.38685; u1 1/1 = 1 -> 0.69343
    assert m["ndcg_at_3"] == pytest.approx((1 / math.log2(3) / (1 + 1 / math.log2(3)) + 1) / 2)
    assert m["ndcg_at_3"] == pytest.approx(0.693426, abs=1e-6)
    # map:       u0 (precision@2 = 1/2) / min(2, 3) = 0.25; u1 (precision@1 = 1) / 1 = 1 -> 0.625
    assert m["map_at_3"] == pytest.approx(0.625)
    # mrr:       u0 first hit at rank 2 -> 0.5; u1 rank 1 -> 1   -> 0.75
    assert m["mrr_at_3"] == pytest.approx(0.75)
    # hit rate:  both users hit                                    -> 1
    assert m["hit_rate_at_3"] == pytest.approx(1.0)
    # coverage:  {0, 2, 3} | {0, 1, 2} = {0, 1, 2, 3}             -> 4 / 6
    assert m["coverage_at_3"] == pytest.approx(4 / 6)
    # popularity percentile (rank - 1) / 5: item 0 -> 1.0, 1 -> 0.8, 2 -> 0.6, 3 -> 0.4.
    # slots: u0 1.0 + 0.6 + 0.4, u1 1.0 + 0.8 + 0.6 = 4.4 over 6 slots -> 0.73333
    assert m["popularity_bias_at_3"] == pytest.approx(4.4 / 6)

    # k = 1: both users get item 0; only u1 hits.
    # recall u0 0, u1 1/min(1, 1) = 1 -> 0.5; precision (0 + 1) / 2 = 0.5; ndcg, map, mrr, hit rate likewise 0.5
    for name in ("recall", "precision", "ndcg", "map", "mrr", "hit_rate"):
        assert m[f"{name}_at_1"] == pytest.approx(0.5), name
    assert m["coverage_at_1"] == pytest.approx(1 / 6)  # only item 0
    assert m["popularity_bias_at_1"] == pytest.approx(1.0)  # item 0 is the most popular
    # user 2 has no target and is not evaluated
    assert m["n_users_evaluated"] == 2.0


def test_recall_is_normalised_by_min_of_targets_and_k() -> None:
    # One user, 5 targets {0..4} and the ranking 0, 1, 2, ...: the top 3 are all hits.
    # recall@3 = 3 / min(5, 3) = 1 (not 3/5); precision@3 = 1; ndcg@3 = 1 (ideal DCG over 3 slots);
    # map@3 = (1 + 1 + 1) / 3 = 1.
    emb = _emb(np.ones((1, 1)), np.arange(10, 0, -1, dtype=np.float32)[:, None])
    m = evaluate(emb, _csr([], [], (1, 10)), _csr([0] * 5, [0, 1, 2, 3, 4], (1, 10)), ks=[3])
    for name in ("recall", "precision", "ndcg", "map", "mrr", "hit_rate"):
        assert m[f"{name}_at_3"] == pytest.approx(1.0), name


def test_seen_items_are_never_hits_and_short_lists_pad_with_misses() -> None:
    # 1 user, 4 items, ranking 0, 1, 2, 3. Seen {0, 1} -> only items 2, 3 can be recommended.
    # Targets {0, 3}: item 0 is seen, so it can never be hit.
    emb = _emb(np.ones((1, 1)), np.array([[4.0], [3.0], [2.0], [1.0]]))
    m = evaluate(emb, _csr([0, 0], [0, 1], (1, 4)), _csr([0, 0], [0, 3], (1, 4)), ks=[10])
    # k = 10 > 2 candidates: list [2, 3, -, -, ...], hits [0, 1].
    # recall = 1 / min(2, 10) = 0.5; precision = 1 / 10 (divided by k, not by the list length)
    assert m["recall_at_10"] == pytest.approx(0.5)
    assert m["precision_at_10"] == pytest.approx(0.1)
    # mrr = 1/2; ndcg = (1/log2(3)) / (1 + 1/log2(3)) = 0.38685
    assert m["mrr_at_10"] == pytest.approx(0.5)
    assert m["ndcg_at_10"] == pytest.approx(0.386853, abs=1e-6)
    # coverage counts only real items: {2, 3} -> 2 / 4
    assert m["coverage_at_10"] == pytest.approx(0.5)


def test_no_user_with_targets_gives_nan_and_zero_users() -> None:
    emb = _emb(np.ones((2, 1)), np.ones((3, 1)))
    m = evaluate(emb, _csr([], [], (2, 3)), _csr([], [], (2, 3)), ks=[5])
    assert m["n_users_evaluated"] == 0.0
    assert math.isnan(m["recall_at_5"]) and math.isnan(m["coverage_at_5"])
    assert "popularity_bias_at_5" not in m  # only with item_popularity


def test_stored_zero_is_not_a_target() -> None:
    # An explicit 0 in the target matrix (e.g. left by a subtraction) must not make a user evaluable.
    emb = _emb(np.ones((2, 1)), np.array([[2.0], [1.0]]))
    targets = sp.csr_matrix((np.array([0.0, 1.0], dtype=np.float32), ([0, 1], [0, 0])), shape=(2, 2))
    m = evaluate(emb, _csr([], [], (2, 2)), targets, ks=[1])
    assert m["n_users_evaluated"] == 1.0  # only user 1
    assert m["recall_at_1"] == pytest.approx(1.0)


def test_duplicate_target_entries_count_once() -> None:
    # A raw CSR storing item 0 twice for the one user: |T| must be 1, not 2.
    # ranking 0, 1 -> recall@2 = 1 / min(1, 2) = 1 and ndcg@2 = 1 / 1 = 1
    # (with |T| = 2 they would be 1/2 and 1 / (1 + 1/log2(3)) = 0.613)
    emb = _emb(np.ones((1, 1)), np.array([[2.0], [1.0]]))
    targets = sp.csr_matrix((np.ones(2, dtype=np.float32), np.array([0, 0]), np.array([0, 2])), shape=(1, 2))
    m = evaluate(emb, _csr([], [], (1, 2)), targets, ks=[2])
    assert m["recall_at_2"] == pytest.approx(1.0)
    assert m["ndcg_at_2"] == pytest.approx(1.0)


def test_shape_mismatch_names_the_matrix() -> None:
    emb = _emb(np.ones((2, 1)), np.ones((3, 1)))
    with pytest.raises(ValueError, match="targets matrix shape"):
        evaluate(emb, _csr([], [], (2, 3)), _csr([], [], (2, 4)), ks=[5])
    with pytest.raises(ValueError, match="ks must be positive"):
        evaluate(emb, _csr([], [], (2, 3)), _csr([], [], (2, 3)), ks=[0])


def test_popularity_percentile_ties_and_bounds() -> None:
    # counts [5, 1, 5, 3]: ranks (average for ties) [3.5, 1, 3.5, 2] -> (rank - 1) / 3 = [0.8333, 0, 0.8333, 0.3333]
    np.testing.assert_allclose(popularity_percentile(np.array([5, 1, 5, 3])), [2.5 / 3, 0.0, 2.5 / 3, 1 / 3])
    np.testing.assert_allclose(popularity_percentile(np.array([7, 7])), [0.5, 0.5])


def _brute_force(
    uvec: np.ndarray, ivec: np.ndarray, seen: sp.csr_matrix, targets: sp.csr_matrix, k: int
) -> dict[str, float]:
    """Per-user Python loops, written from the textbook definitions."""
    per_user: dict[str, list[float]] = {m: [] for m in ("recall", "precision", "ndcg", "map", "mrr", "hit_rate")}
    recommended: set[int] = set()
    for u in range(uvec.shape[0]):
        t = set(targets[u].indices.tolist())
        if not t:
            continue
        scores = ivec.astype(np.float64) @ uvec[u].astype(np.float64)
        scores[seen[u].indices] = -np.inf
        order = [int(i) for i in np.argsort(-scores, kind="stable")[:k] if np.isfinite(scores[i])]
        recommended.update(order)
        hits = [1.0 if i in t else 0.0 for i in order]
        n_rel = min(len(t), k)
        per_user["recall"].append(sum(hits) / n_rel)
        per_user["precision"].append(sum(hits) / k)
        dcg = sum(h / math.log2(j + 2) for j, h in enumerate(hits))
        idcg = sum(1 / math.log2(j + 2) for j in range(n_rel))
        per_user["ndcg"].append(dcg / idcg)
        ap, found = 0.0, 0
        for j, h in enumerate(hits):
            if h:
                found += 1
                ap += found / (j + 1)
        per_user["map"].append(ap / n_rel)
        first = next((j for j, h in enumerate(hits) if h), None)
        per_user["mrr"].append(0.0 if first is None else 1.0 / (first + 1))
        per_user["hit_rate"].append(1.0 if first is not None else 0.0)
    out = {f"{m}_at_{k}": float(np.mean(v)) for m, v in per_user.items()}
    out[f"coverage_at_{k}"] = len(recommended) / ivec.shape[0]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items, d = 120, 40, 4
    uvec = rng.standard_normal((n_users, d)).astype(np.float32)
    ivec = rng.standard_normal((n_items, d)).astype(np.float32)
    seen = sp.csr_matrix((rng.random((n_users, n_items)) < 0.3).astype(np.float32))
    # targets: ~10% of unseen items; some users get none (and are skipped)
    targets = sp.csr_matrix(((rng.random((n_users, n_items)) < 0.1) & (seen.toarray() == 0)).astype(np.float32))
    # a small chunk size so that several chunks are combined
    got = evaluate(_emb(uvec, ivec), seen, targets, ks=[1, 5, 10, 50], batch_users=17)
    assert got["n_users_evaluated"] == float((np.diff(targets.indptr) > 0).sum())
    for k in (1, 5, 10, 50):  # 50 > n_items exercises padded lists
        want = _brute_force(uvec, ivec, seen, targets, k)
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_metrics_table_one_row_per_model_model_first() -> None:
    table = metrics_table({"als": {"recall_at_10": 0.5, "ndcg_at_10": 0.25}, "pop": {"recall_at_10": 0.1, "x": 3}})
    assert table.columns == ["model", "recall_at_10", "ndcg_at_10", "x"]
    assert table["model"].to_list() == ["als", "pop"]
    assert table["recall_at_10"].to_list() == [0.5, 0.1]
    assert table["ndcg_at_10"].to_list() == [0.25, None]  # missing metric -> null
    assert table.schema["x"] == pl.Float64


def test_selection_metrics_are_returned_by_evaluate(
    tiny: tuple[Embeddings, sp.csr_matrix, sp.csr_matrix, np.ndarray],
) -> None:
    emb, seen, targets, _ = tiny
    m = evaluate(emb, seen, targets, ks=[3, 1])
    assert set(selection_metrics([1, 3])) <= set(m)
    assert "n_users_evaluated" not in selection_metrics([1, 3])


@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_ranked_equals_evaluate_on_the_same_lists(seed: int) -> None:
    """A table read back (evaluate_ranked) scores exactly as the harness that ranked it (evaluate)."""
    from recsys_embed.evaluation.metrics import evaluate_ranked
    from recsys_embed.evaluation.topk import topk

    rng = np.random.default_rng(seed)
    n_users, n_items, d = 90, 30, 4
    emb = _emb(rng.standard_normal((n_users, d)), rng.standard_normal((n_items, d)))
    seen = sp.csr_matrix((rng.random((n_users, n_items)) < 0.3).astype(np.float32))
    targets = sp.csr_matrix(((rng.random((n_users, n_items)) < 0.1) & (seen.toarray() == 0)).astype(np.float32))
    want = evaluate(emb, seen, targets, ks=[1, 5, 10])
    lists = topk(emb, 10, seen=seen).items  # (n_users, 10), users in index order
    got = evaluate_ranked(lists, targets, ks=[1, 5, 10])
    assert got == pytest.approx(want, rel=1e-12)
    # a user whose list is missing (all -1) stays evaluated and scores zero
    user = int(np.flatnonzero(np.diff(targets.indptr) > 0)[0])
    only = sp.csr_matrix(targets.multiply(np.arange(n_users)[:, None] == user))
    alone = evaluate_ranked(lists, only, ks=[10])["recall_at_10"]  # that user's own recall
    lists[user] = -1
    dropped = evaluate_ranked(lists, targets, ks=[10])
    n = want["n_users_evaluated"]
    assert dropped["n_users_evaluated"] == n
    assert dropped["recall_at_10"] == pytest.approx(want["recall_at_10"] - alone / n, rel=1e-12)
