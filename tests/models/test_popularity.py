"""popularity: item vectors are distinct-user counts, and it ranks through the shared evaluate/top-k path."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed.evaluation.metrics import evaluate
from recsys_embed.evaluation.topk import topk
from recsys_embed.models.popularity import item_popularity, train_popularity
from recsys_embed.types import IdMap, Interactions, RowReport


def _interactions(m: sp.csr_matrix) -> Interactions:
    coo = m.tocoo()
    return Interactions(
        matrix=m,
        users=IdMap(pl.Series("id", [f"u{i}" for i in range(m.shape[0])])),
        items=IdMap(pl.Series("id", [100 + i for i in range(m.shape[1])])),
        report=RowReport(rows_read=m.nnz, kept=m.nnz),
        events=pl.DataFrame({"user_idx": coo.row.astype(np.int64), "item_idx": coo.col.astype(np.int64)}),
    )


@pytest.fixture
def train() -> Interactions:
    # 4 users x 4 items; confidences differ but popularity counts users, not weight.
    # item 0: users 0, 1, 2 -> 3;  item 1: user 3 with confidence 9 -> 1;  item 2: users 0, 3 -> 2;  item 3: nobody -> 0
    dense = np.array(
        [
            [1.0, 0.0, 5.0, 0.0],
            [2.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 9.0, 1.0, 0.0],
        ],
        dtype=np.float32,
    )
    return _interactions(sp.csr_matrix(dense))


def test_item_vectors_are_distinct_user_counts(train: Interactions) -> None:
    emb = train_popularity(train)
    np.testing.assert_array_equal(emb.item_vectors[:, 0], [3, 1, 2, 0])
    np.testing.assert_array_equal(emb.user_vectors, np.ones((4, 1), dtype=np.float32))
    assert (emb.model, emb.scoring, emb.dim) == ("popularity", "dot", 1)
    assert emb.users is train.users and emb.items is train.items
    np.testing.assert_array_equal(item_popularity(train.matrix), [3, 1, 2, 0])


def test_recommends_most_popular_unseen_items(train: Interactions) -> None:
    emb = train_popularity(train)
    top = topk(emb, 2, seen=train.matrix)
    # popularity order 0 (3) > 2 (2) > 1 (1) > 3 (0)
    # user 0 saw {0, 2} -> [1, 3]; user 1 saw {0} -> [2, 1]; user 3 saw {1, 2} -> [0, 3]
    assert top.items[0].tolist() == [1, 3]
    assert top.items[1].tolist() == [2, 1]
    assert top.items[3].tolist() == [0, 3]


def test_goes_through_evaluate_unchanged(train: Interactions) -> None:
    emb = train_popularity(train)
    # user 1 (saw item 0) holds out item 2, the most popular item it has not seen -> recall@1 = 1
    # user 2 (saw item 0) holds out item 1, ranked second after item 2 -> recall@1 = 0
    targets = sp.csr_matrix((np.ones(2, dtype=np.float32), ([1, 2], [2, 1])), shape=(4, 4))
    m = evaluate(emb, train.matrix, targets, ks=[1], item_popularity=item_popularity(train.matrix))
    assert m["recall_at_1"] == pytest.approx(0.5)
    # both users are recommended item 2, popularity percentile (rank 3 of 4 - 1) / 3 = 2/3
    assert m["popularity_bias_at_1"] == pytest.approx(2 / 3)
