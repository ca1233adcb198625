"""Approximate top-k through faiss: same contract as exact search, recall loss measured, heavy users exact."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed.config import SearchConfig
from recsys_embed.evaluation.topk import topk
from recsys_embed.types import Embeddings, IdMap

faiss = pytest.importorskip("faiss", reason="faiss is the optional [faiss] extra")

from recsys_embed.serving.ann import iter_topk_ann, recall_against_exact, searcher  # noqa: E402


def _clustered(n_users: int, n_items: int, d: int = 16, seed: int = 0) -> Embeddings:
    """Item vectors around 50 centers and users near random centers: the structure ANN indexes exploit."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, d))
    items = centers[rng.integers(0, 50, n_items)] + 0.3 * rng.normal(size=(n_items, d))
    users = centers[rng.integers(0, 50, n_users)] + 0.3 * rng.normal(size=(n_users, d))
    return Embeddings(
        user_vectors=users,
        item_vectors=items,
        users=IdMap(pl.Series(np.arange(n_users))),
        items=IdMap(pl.Series(np.arange(n_items))),
        model="test",
    )


def _seen(n_users: int, n_items: int, per_user: int, seed: int = 1) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n_users), per_user)
    cols = rng.integers(0, n_items, n_users * per_user)
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))


def _all(chunks):  # type: ignore[no-untyped-def]
    parts = list(chunks)
    return (np.concatenate([p.users for p in parts]), np.concatenate([p.items for p in parts]),
            np.concatenate([p.scores for p in parts]))  # fmt: skip


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_keeps_the_topk_contract(kind: str) -> None:
    emb = _clustered(300, 3000)
    seen = _seen(300, 3000, 30)
    cfg = SearchConfig(kind=kind)  # type: ignore[arg-type]
    users, items, scores = _all(iter_topk_ann(emb, 20, seen=seen, chunk_users=128, search=cfg))
    assert np.array_equal(users, np.arange(300)) and items.shape == (300, 20)
    assert (items >= 0).all(), "every user has >= 20 unseen items, so no padding"
    assert not np.isin(np.arange(300)[:, None] * 3000 + items,
                       seen.nonzero()[0] * 3000 + seen.nonzero()[1]).any(), "no train-seen item"  # fmt: skip
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "scores never increase with rank"
    assert all(len(set(row)) == 20 for row in items.tolist()), "no item twice in a list"
    # every returned score is the true dot product of that user and item
    uv, iv = emb.scoring_vectors()
    np.testing.assert_allclose(scores, np.einsum("ud,ukd->uk", uv, iv[items]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_recall_against_exact_is_measured_and_high_on_clustered_vectors(kind: str) -> None:
    emb = _clustered(500, 5000)
    seen = _seen(500, 5000, 10)
    recall = recall_against_exact(emb, 20, SearchConfig(kind=kind), seen, sample_users=300)  # type: ignore[arg-type]
    assert 0.8 <= recall <= 1.0
    starved = SearchConfig(kind="ivf", nlist=200, nprobe=1)
    assert recall_against_exact(emb, 20, starved, seen, sample_users=300) < recall, "fewer probed cells lose recall"


def test_heavy_users_fall_back_to_exact_ranking() -> None:
    """A user who saw most of the catalog: the capped candidate list cannot hold 20 unseen items, so that user is
    ranked exactly and still gets a full list equal to exact search."""
    emb = _clustered(50, 400)
    seen = _seen(50, 400, 2).tolil()
    seen[7, :380] = 1.0  # user 7 saw 380 of 400 items: exactly 20 are left
    seen = seen.tocsr()
    cfg = SearchConfig(kind="hnsw", max_candidates=40)
    _, items, _ = _all(iter_topk_ann(emb, 20, seen=seen, search=cfg))
    exact = topk(emb, 20, seen=seen)
    assert (items[7] >= 0).all()
    assert sorted(items[7].tolist()) == sorted(exact.items[7].tolist()) == list(range(380, 400))


def test_exact_kind_is_the_exact_scorer_and_allow_deny_are_respected() -> None:
    emb = _clustered(100, 1000)
    seen = _seen(100, 1000, 5)
    exact = topk(emb, 10, seen=seen)
    _, items, _ = _all(searcher(SearchConfig())(emb, 10, seen=seen))
    assert np.array_equal(items, exact.items)
    allow = np.arange(0, 1000, 2)
    deny = np.array([0, 2, 4])
    _, items, _ = _all(searcher(SearchConfig(kind="hnsw"))(emb, 10, seen=seen, allow_items=allow,
                                                       deny_items=deny))  # fmt: skip
    assert (items % 2 == 0).all() and not np.isin(items, deny).any()


def test_export_with_an_index_writes_the_table_and_reports_its_recall(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from recsys_embed.config import ExportConfig
    from recsys_embed.io import read_table
    from recsys_embed.pipeline.shipping import search_quality
    from recsys_embed.serving.export import export_topk

    emb = _clustered(200, 2000)
    seen = _seen(200, 2000, 10)
    cfg = ExportConfig(k=10, search=SearchConfig(kind="hnsw"))
    res = export_topk(emb, seen, cfg, tmp_path, "run-1")
    table = read_table(res.path)
    assert table.height == 200 * 10 and res.users == 200
    quality = search_quality(emb, seen, cfg)
    assert quality["search"] == "hnsw" and 0.8 <= quality["ann_recall_at_k"] <= 1.0
    assert search_quality(emb, seen, ExportConfig(k=10)) == {}, "exact search reports nothing to lose"
