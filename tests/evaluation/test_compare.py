"""Re-scoring another run's embeddings on this run's split (the champion decision's common exam)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed.evaluation.compare import reindex, rescore
from recsys_embed.evaluation.metrics import evaluate
from recsys_embed.evaluation.topk import topk
from recsys_embed.types import Embeddings, IdMap


def _emb(users: list[str], items: list[str], u: list[list[float]], v: list[list[float]], scoring: str = "dot"):  # type: ignore[no-untyped-def]
    return Embeddings(np.array(u), np.array(v), IdMap(pl.Series(users)), IdMap(pl.Series(items)), "old",
                      scoring=scoring)  # type: ignore[arg-type]  # fmt: skip


def test_reindex_matches_by_original_id_and_sinks_unknown_items() -> None:
    old = _emb(["a", "b"], ["x", "y"], [[1, 0], [0, 1]], [[2, 0], [0, -3]])
    new = reindex(old, IdMap(pl.Series(["b", "c"])), IdMap(pl.Series(["y", "z", "x"])))
    s = new.user_vectors @ new.item_vectors.T
    # user b = (0, 1): y scores 0*0 + 1*(-3) = -3, x scores 0*2 + 1*0 = 0; z is unknown: -1e30
    assert s[0, 0] == pytest.approx(-3.0) and s[0, 2] == pytest.approx(0.0) and s[0, 1] < -1e29
    # user c is unknown to the old model: a zero vector scores 0 on every known item
    assert s[1, 0] == 0.0 and s[1, 2] == 0.0 and s[1, 1] < -1e29
    # even a user whose every known score is negative gets the unknown item last
    assert topk(new, 3).items[0].tolist() == [2, 0, 1]
    assert new.info["reindexed_known_users"] == 1 and new.info["reindexed_known_items"] == 2


def test_reindex_keeps_cosine_scores() -> None:
    old = _emb(["a"], ["x", "y"], [[3, 4]], [[1, 0], [0, 10]], scoring="cosine")
    new = reindex(old, old.users, old.items)
    # cosine: a = (0.6, 0.8); x -> 0.6, y -> 0.8
    np.testing.assert_allclose(new.user_vectors @ new.item_vectors.T, [[0.6, 0.8]], rtol=1e-6)


def test_rescore_on_the_same_split_equals_evaluate() -> None:
    rng = np.random.default_rng(0)
    n_u, n_i = 40, 60
    emb = Embeddings(rng.normal(size=(n_u, 8)), rng.normal(size=(n_i, 8)), IdMap(pl.Series(np.arange(n_u))),
                     IdMap(pl.Series(np.arange(n_i) + 1000)), "m")  # fmt: skip
    seen = sp.random(n_u, n_i, density=0.1, format="csr", random_state=1)
    targets = sp.random(n_u, n_i, density=0.05, format="csr", random_state=2)
    targets = (targets - targets.multiply(seen > 0)).tocsr()
    popularity = np.asarray((seen > 0).sum(axis=0)).ravel()
    direct = evaluate(emb, seen, targets, [5, 10], popularity)
    # this run lists the users in another order (and its matrices follow it): re-indexing must undo it
    perm = rng.permutation(n_u)
    users = IdMap(pl.Series(np.arange(n_u)[perm]))
    again = rescore(emb, users, emb.items, seen[perm], targets[perm], [5, 10])
    assert again == pytest.approx(direct, nan_ok=True)
