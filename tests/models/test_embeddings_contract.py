"""The ``Embeddings`` contract, for every model family behind the factory (``models.MODEL_NAMES``):

- shapes: (n_users, d) and (n_items, d) float32, finite, indexed by the train ID maps;
- ID round-trip: save/load keeps vectors and IDs; the exported top-k maps back to the original IDs and its
  scores are the dot products of the vectors;
- no train-seen item in any user's top-k;
- determinism: two CPU runs under one seed give identical vectors.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed.config import (
    ALSConfig,
    BPRConfig,
    EASEConfig,
    EvalConfig,
    ExportConfig,
    ModelsConfig,
    PopularityConfig,
    TwoTowerConfig,
)
from recsys_embed.models.factory import MODEL_NAMES, train_model
from recsys_embed.serving.export import export_topk, read_export
from recsys_embed.store import load_embeddings, save_embeddings
from recsys_embed.types import Embeddings, IdMap, Interactions, RowReport

N_USERS, N_ITEMS, N_CLUSTERS = 120, 60, 4
K = 5

# Small and CPU-only: the contract does not depend on model size.
MODELS = ModelsConfig(
    popularity=PopularityConfig(),
    als=ALSConfig(factors=8, iterations=4, eval_every=2, use_gpu=False),
    bpr=BPRConfig(factors=8, iterations=20, eval_every=10, use_gpu=False),
    ease=EASEConfig(enabled=True, regularization=10.0),
    two_tower=TwoTowerConfig(
        enabled=True,
        embedding_dim=8,
        hidden_dim=16,
        text_buckets=256,
        max_text_tokens=4,
        history_length=8,
        batch_size=128,
        num_negatives=16,
        max_epochs=3,
        patience=0,
        monitor="recall_at_5",
    ),
)
EVAL = EvalConfig(ks=[K], primary_metric=f"ndcg_at_{K}")


def _log(seed: int = 0) -> tuple[Interactions, sp.csr_matrix, pl.DataFrame]:
    """Users in 4 clusters with 10 timed events each (string user IDs, integer item IDs as in retail logs);
    validation targets: 3 more items of the cluster. Item text names the cluster."""
    rng = np.random.default_rng(seed)
    per = N_ITEMS // N_CLUSTERS
    cluster = np.arange(N_USERS) % N_CLUSTERS
    picks = np.stack([rng.permutation(per)[:13] + c * per for c in cluster])
    rows = np.repeat(np.arange(N_USERS), 10)
    cols = picks[:, :10].ravel()
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    events = pl.DataFrame(
        {
            "user_idx": rows.astype(np.int64),
            "item_idx": cols.astype(np.int64),
            "ts": [t0 + timedelta(hours=int(h)) for h in np.tile(np.arange(10), N_USERS)],
            "weight": np.ones(len(rows)),
        }
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))
    val = sp.csr_matrix(
        (np.ones(N_USERS * 3, np.float32), (np.repeat(np.arange(N_USERS), 3), picks[:, 10:].ravel())),
        shape=(N_USERS, N_ITEMS),
    )
    item_ids = np.arange(1000, 1000 + N_ITEMS, dtype=np.int64)
    train = Interactions(
        matrix=matrix,
        users=IdMap(pl.Series("id", [f"user-{i:03d}" for i in range(N_USERS)])),
        items=IdMap(pl.Series("id", item_ids)),
        report=RowReport(rows_read=len(rows), kept=len(rows)),
        events=events,
    )
    text = pl.DataFrame({"item_id": item_ids.astype(str), "text": [f"group{i // per} thing" for i in range(N_ITEMS)]})
    return train, val, text


@pytest.fixture(scope="module")
def data() -> tuple[Interactions, sp.csr_matrix, pl.DataFrame]:
    return _log()


def _train(name: str, data: tuple[Interactions, sp.csr_matrix, pl.DataFrame], seed: int = 42) -> Embeddings:
    train, val, text = data
    cfg = MODELS.model_copy(deep=True)
    sub = getattr(cfg, name)
    if hasattr(sub, "seed"):
        setattr(cfg, name, sub.model_copy(update={"seed": seed}))
    return train_model(name, train, cfg, EVAL, val, None, text, None)


@pytest.fixture(scope="module", params=MODEL_NAMES)
def trained(request: pytest.FixtureRequest, data: tuple[Interactions, sp.csr_matrix, pl.DataFrame]) -> Embeddings:
    return _train(request.param, data)


def test_every_model_family_is_covered() -> None:
    assert set(MODEL_NAMES) == {"popularity", "ease", "als", "bpr", "two_tower"}


def test_shapes_and_maps(trained: Embeddings, data: tuple[Interactions, sp.csr_matrix, pl.DataFrame]) -> None:
    train = data[0]
    d = trained.dim
    assert trained.user_vectors.shape == (N_USERS, d) and trained.item_vectors.shape == (N_ITEMS, d)
    assert trained.user_vectors.dtype == np.float32 and trained.item_vectors.dtype == np.float32
    assert np.isfinite(trained.user_vectors).all() and np.isfinite(trained.item_vectors).all()
    assert trained.users.ids.equals(train.users.ids) and trained.items.ids.equals(train.items.ids)
    assert trained.scoring in ("dot", "cosine")
    assert trained.model in MODEL_NAMES


def test_id_round_trip_through_store_and_export(
    trained: Embeddings, data: tuple[Interactions, sp.csr_matrix, pl.DataFrame], tmp_path: Path
) -> None:
    train = data[0]
    back = load_embeddings(save_embeddings(trained, tmp_path / "emb"))
    np.testing.assert_array_equal(back.user_vectors, trained.user_vectors)
    np.testing.assert_array_equal(back.item_vectors, trained.item_vectors)
    assert back.users.ids.equals(trained.users.ids) and back.items.ids.equals(trained.items.ids)
    assert back.users.dtype == pl.String and back.items.dtype == pl.Int64  # original ID dtypes survive

    res = export_topk(trained, train.matrix, ExportConfig(k=K), tmp_path / "out", "run-1")
    table = read_export(res.path)
    assert table["user_id"].dtype == pl.String and table["item_id"].dtype == pl.Int64
    u = train.users.lookup(table["user_id"]).to_numpy()
    i = train.items.lookup(table["item_id"]).to_numpy()
    assert not np.isnan(u.astype(float)).any() and not np.isnan(i.astype(float)).any()
    assert table.group_by("user_id").len()["len"].max() == K
    # exported scores are the model's scores of (user, item) mapped back from the original IDs
    uv, iv = trained.scoring_vectors()
    np.testing.assert_allclose(table["score"].to_numpy(), (uv[u] * iv[i]).sum(axis=1), rtol=1e-4, atol=1e-4)


def test_no_seen_item_in_topk(
    trained: Embeddings, data: tuple[Interactions, sp.csr_matrix, pl.DataFrame], tmp_path: Path
) -> None:
    train = data[0]
    table = read_export(export_topk(trained, train.matrix, ExportConfig(k=K), tmp_path, "run-1").path)
    u = train.users.lookup(table["user_id"]).to_numpy().astype(np.int64)
    i = train.items.lookup(table["item_id"]).to_numpy().astype(np.int64)
    assert np.asarray(train.matrix[u, i]).ravel().max() == 0.0
    assert table.height == N_USERS * K  # every user still gets k unseen items (60 items, 10 seen)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_deterministic_under_a_seed_on_cpu(name: str, data: tuple[Interactions, sp.csr_matrix, pl.DataFrame]) -> None:
    a, b = _train(name, data), _train(name, data)
    np.testing.assert_array_equal(a.user_vectors, b.user_vectors)
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
    if name not in ("popularity", "ease"):  # counts and a closed form: no randomness to seed
        c = _train(name, data, seed=7)
        assert not np.array_equal(a.item_vectors, c.item_vectors)
