"""The shared top-k scorer against a brute-force float64 reference."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

import recsys_embed.evaluation.topk as topk_module
from recsys_embed.evaluation.topk import TopK, iter_topk, topk
from recsys_embed.types import Embeddings, IdMap


def _emb(u: np.ndarray, v: np.ndarray, scoring: str = "dot") -> Embeddings:
    return Embeddings(
        user_vectors=u,
        item_vectors=v,
        users=IdMap(pl.Series(np.arange(len(u)))),
        items=IdMap(pl.Series(np.arange(len(v)))),
        model="test",
        scoring=scoring,  # type: ignore[arg-type]
    )


def _reference(
    emb: Embeddings,
    k: int,
    users: np.ndarray,
    seen: sp.csr_matrix | None,
    allow: np.ndarray | None = None,
    deny: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64: full score matrix, exclusions to -inf, order by (-score, item index)."""
    uv, iv = emb.scoring_vectors()
    s = uv[users].astype(np.float64) @ iv.astype(np.float64).T
    if seen is not None:
        s[seen[users].toarray() != 0] = -np.inf
    if allow is not None:
        outside = np.ones(s.shape[1], dtype=bool)
        outside[allow] = False
        s[:, outside] = -np.inf
    if deny is not None:
        s[:, deny] = -np.inf
    k = min(k, s.shape[1])
    cols = np.arange(s.shape[1])
    order = np.stack([np.lexsort((cols, -row))[:k] for row in s])
    scores = np.take_along_axis(s, order, axis=1)
    items = np.where(np.isneginf(scores), -1, order)
    return items, scores


def _check_against_reference(got: TopK, ref_items: np.ndarray, ref_scores: np.ndarray, full: np.ndarray) -> None:
    """Same scores as the reference; every returned item really has its score; -1 exactly where -inf."""
    assert got.items.shape == ref_items.shape
    np.testing.assert_allclose(got.scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got.items == -1, np.isneginf(got.scores))
    assert np.array_equal(got.items == -1, ref_items == -1)
    rows = np.repeat(np.arange(len(got.users))[:, None], got.items.shape[1], axis=1)
    ok = got.items >= 0
    np.testing.assert_allclose(full[rows[ok], got.items[ok]], got.scores[ok], rtol=1e-5, atol=1e-5)
    for r in range(len(got.users)):  # no item twice in a row
        picked = got.items[r][got.items[r] >= 0]
        assert len(np.unique(picked)) == len(picked)
    assert np.all(np.diff(got.scores, axis=1) <= 0)


def _full_scores(emb: Embeddings, users: np.ndarray) -> np.ndarray:
    uv, iv = emb.scoring_vectors()
    return uv[users].astype(np.float64) @ iv.astype(np.float64).T


@pytest.mark.parametrize("seed", range(8))
def test_random_cases_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items, d = int(rng.integers(1, 300)), int(rng.integers(1, 4000)), int(rng.integers(1, 12))
    k = int(rng.integers(1, 40))
    scoring = "cosine" if seed % 2 else "dot"
    emb = _emb(rng.standard_normal((n_users, d)), rng.standard_normal((n_items, d)), scoring)
    seen = sp.random(n_users, n_items, density=float(rng.random()) * 0.6, format="csr", random_state=seed)
    users = np.arange(n_users) if seed % 3 else rng.permutation(n_users)[: max(1, n_users // 2)]
    allow = rng.choice(n_items, size=max(1, n_items // 3), replace=False) if seed % 4 == 0 else None
    deny = rng.choice(n_items, size=max(1, n_items // 5), replace=False) if seed % 4 == 1 else None
    got = topk(emb, k, users, seen, chunk_users=int(rng.integers(1, 200)), allow_items=allow, deny_items=deny)
    ref_items, ref_scores = _reference(emb, k, users, seen, allow, deny)
    assert np.array_equal(got.users, users)
    _check_against_reference(got, ref_items, ref_scores, _full_scores(emb, users))
    if allow is not None:
        assert np.isin(got.items[got.items >= 0], allow).all()
    if deny is not None:
        assert not np.isin(got.items, deny).any()


def test_blocked_threshold_path_is_exact_for_a_large_catalog() -> None:
    # 5,000 items and k=10 use 64-item strided blocks; the result must still be the exact top-k
    rng = np.random.default_rng(7)
    emb = _emb(rng.standard_normal((700, 16)), rng.standard_normal((5000, 16)))
    seen = sp.random(700, 5000, density=0.05, format="csr", random_state=1)
    got = topk(emb, 10, seen=seen, chunk_users=256, threads=2)
    users = np.arange(700)
    _check_against_reference(got, *_reference(emb, 10, users, seen), _full_scores(emb, users))


def test_ties_are_broken_by_the_lower_item_index() -> None:
    # Integer vectors make every score exact. User 0 = [1, 0]: items score their first coordinate:
    # items 0..5 -> [2, 1, 2, 0, 2, 1]; top-4 by (score desc, index asc) = [0, 2, 4, 1].
    u = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    v = np.array([[2, 0], [1, 3], [2, 3], [0, 0], [2, 1], [1, 3]], dtype=np.float32)
    got = topk(_emb(u, v), 4)
    assert got.items[0].tolist() == [0, 2, 4, 1]
    assert got.scores[0].tolist() == [2.0, 2.0, 2.0, 1.0]
    # user 1 = [0, 1]: scores [0, 3, 3, 0, 1, 3] -> [1, 2, 5, 4]
    assert got.items[1].tolist() == [1, 2, 5, 4]


@pytest.mark.parametrize("tie_guard", [8, 10**9])
def test_ties_on_a_large_catalog_are_exact_and_deterministic(tie_guard: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # many exact ties (vectors with entries in {-1, 0, 1}) through the blocked path, compared item by item
    monkeypatch.setattr(topk_module, "_TIE_GUARD", tie_guard)
    rng = np.random.default_rng(3)
    emb = _emb(rng.integers(-1, 2, (300, 4)).astype(np.float32), rng.integers(-1, 2, (3000, 4)).astype(np.float32))
    seen = sp.random(300, 3000, density=0.1, format="csr", random_state=2)
    got = topk(emb, 15, seen=seen, chunk_users=64, threads=2)
    ref_items, ref_scores = _reference(emb, 15, np.arange(300), seen)
    assert np.array_equal(got.items, ref_items)
    assert np.array_equal(got.scores, ref_scores.astype(np.float32))


def test_fewer_admissible_items_than_k_leave_minus_one_slots() -> None:
    rng = np.random.default_rng(0)
    emb = _emb(rng.standard_normal((3, 4)), rng.standard_normal((6, 4)))
    # user 0 has seen 4 of 6 items, user 1 all 6, user 2 none
    seen = sp.csr_matrix(np.array([[1, 1, 0, 1, 1, 0], [1] * 6, [0] * 6], dtype=np.float32))
    got = topk(emb, 5, seen=seen)
    assert sorted(got.items[0, :2].tolist()) == [2, 5] and got.items[0, 2:].tolist() == [-1, -1, -1]
    assert np.isneginf(got.scores[0, 2:]).all()
    assert (got.items[1] == -1).all()
    assert (got.items[2] >= 0).all()
    assert topk(emb, 50).items.shape == (3, 6)  # k is capped at the number of items


def test_chunking_and_threads_do_not_change_results() -> None:
    rng = np.random.default_rng(11)
    emb = _emb(rng.standard_normal((500, 8)), rng.standard_normal((2000, 8)))
    seen = sp.random(500, 2000, density=0.1, format="csr", random_state=4)
    users = rng.permutation(500)
    base = topk(emb, 12, users, seen, chunk_users=500, threads=1)
    for chunk, threads in [(1, 1), (37, 2), (128, 3), (10_000, 2)]:
        other = topk(emb, 12, users, seen, chunk_users=chunk, threads=threads)
        assert np.array_equal(other.users, base.users)
        assert np.array_equal(other.items, base.items)
        # BLAS may pick another kernel for another chunk height (a one-row chunk is a matrix-vector product), so
        # scores can differ in the last bits on some CPUs (seen on this 2-core box); the ranking may not
        np.testing.assert_allclose(other.scores, base.scores, rtol=1e-6, atol=1e-6)


def test_iter_topk_yields_bounded_chunks_in_user_order() -> None:
    rng = np.random.default_rng(1)
    emb = _emb(rng.standard_normal((250, 4)), rng.standard_normal((40, 4)))
    chunks = list(iter_topk(emb, 5, chunk_users=100))
    assert [len(c.users) for c in chunks] == [100, 100, 50]
    assert np.array_equal(np.concatenate([c.users for c in chunks]), np.arange(250))
    assert all(c.items.dtype == np.int64 and c.scores.dtype == np.float32 for c in chunks)


def test_no_admissible_item_at_all() -> None:
    rng = np.random.default_rng(2)
    emb = _emb(rng.standard_normal((4, 3)), rng.standard_normal((10, 3)))
    got = topk(emb, 3, deny_items=np.arange(10))
    assert (got.items == -1).all() and np.isneginf(got.scores).all()
    empty = topk(emb, 3, users=np.empty(0, dtype=np.int64))
    assert empty.items.shape == (0, 3)


def test_bad_inputs_name_the_culprit() -> None:
    rng = np.random.default_rng(0)
    emb = _emb(rng.standard_normal((5, 3)), rng.standard_normal((7, 3)))
    with pytest.raises(ValueError, match="users holds indices outside"):
        topk(emb, 2, users=np.array([0, 5]))
    with pytest.raises(ValueError, match="seen matrix shape"):
        topk(emb, 2, seen=sp.csr_matrix((5, 6)))
    with pytest.raises(ValueError, match="deny_items holds indices outside"):
        topk(emb, 2, deny_items=np.array([7]))
    bad = rng.standard_normal((5, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        topk(_emb(bad, rng.standard_normal((7, 3))), 2)


@pytest.mark.parametrize("tie_guard", [8, 10**9])  # with and without the tie-heavy path
def test_all_tied_rows_take_the_lowest_indices(tie_guard: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A zero user vector ties every item at score 0 (every item passes the threshold): the k slots go to
    # the lowest admissible indices. User 1 has seen items 0..4, so its top-3 are 5, 6, 7.
    monkeypatch.setattr(topk_module, "_TIE_GUARD", tie_guard)
    rng = np.random.default_rng(5)
    u = np.zeros((3, 8), dtype=np.float32)
    u[2] = rng.standard_normal(8)
    emb = _emb(u, rng.standard_normal((6000, 8)))
    seen = sp.csr_matrix((np.ones(5, np.float32), ([1] * 5, list(range(5)))), shape=(3, 6000))
    got = topk(emb, 3, seen=seen, deny_items=np.array([1]))
    assert got.items[0].tolist() == [0, 2, 3]
    assert got.items[1].tolist() == [5, 6, 7]
    assert got.scores[:2].tolist() == [[0.0] * 3] * 2
    ref_items, _ = _reference(emb, 3, np.array([2]), seen, deny=np.array([1]))
    assert np.array_equal(got.items[2:], ref_items)
