"""Export tables: contents against the scorer and brute force, original IDs, atomic commit, partitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

import recsys_embed.serving.export as export_mod
from recsys_embed.config import ExportConfig
from recsys_embed.errors import DataWarning
from recsys_embed.io import SUCCESS_MARKER
from recsys_embed.serving.export import export_similar_items, export_topk, read_export
from recsys_embed.types import Embeddings, IdMap

N_USERS, N_ITEMS, DIM = 120, 90, 6


def _emb(user_ids: pl.Series, item_ids: pl.Series, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    return Embeddings(
        user_vectors=rng.standard_normal((len(user_ids), DIM)),
        item_vectors=rng.standard_normal((len(item_ids), DIM)),
        users=IdMap(user_ids),
        items=IdMap(item_ids),
        model="als",
    )


@pytest.fixture
def emb() -> Embeddings:
    """String user IDs, integer item IDs (a common retail shape)."""
    users = pl.Series("id", [f"u{i:03d}" for i in range(N_USERS)])
    items = pl.Series("id", np.arange(1000, 1000 + N_ITEMS, dtype=np.int64))
    return _emb(users, items)


@pytest.fixture
def seen() -> sp.csr_matrix:
    """Every user has seen 3..10 items; the last 20 users are cold (no train items)."""
    rng = np.random.default_rng(1)
    rows, cols = [], []
    for u in range(N_USERS - 20):
        picked = rng.choice(N_ITEMS, size=int(rng.integers(3, 11)), replace=False)
        rows += [u] * len(picked)
        cols += picked.tolist()
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))


def _index_of(ids: pl.Series, emb_map: IdMap) -> np.ndarray:
    return emb_map.lookup(ids).to_numpy()


def test_topk_table_contract(emb: Embeddings, seen: sp.csr_matrix, tmp_path: Path) -> None:
    cfg = ExportConfig(k=7, chunk_users=32)
    res = export_topk(emb, seen, cfg, tmp_path, run_id="run-1")
    table_dir = tmp_path / "topk"
    assert (table_dir / SUCCESS_MARKER).exists()
    df = read_export(table_dir)
    assert df.schema == pl.Schema(
        {"user_id": pl.String, "rank": pl.Int32, "item_id": pl.Int64, "score": pl.Float32, "source": pl.String,
         "model": pl.String, "run_id": pl.String}
    )  # fmt: skip
    assert df["source"].unique().to_list() == ["model"]  # plain embeddings: no fallback users
    assert res.rows == df.height == N_USERS * 7 and res.users == N_USERS
    assert res.path == str(table_dir) and all(Path(f).exists() for f in res.files)
    # every user exactly k rows, ranks 1..k, scores non-increasing by rank
    per_user = df.group_by("user_id").agg(pl.col("rank").sort(), pl.col("score").sort_by("rank"))
    assert per_user.height == N_USERS
    assert all(r == list(range(1, 8)) for r in per_user["rank"].to_list())
    assert all(np.all(np.diff(s) <= 0) for s in per_user["score"].to_list())
    # original IDs, and no train-seen item
    assert set(df["user_id"].unique().to_list()) == set(emb.users.ids.to_list())
    assert df["item_id"].is_in(emb.items.ids.implode()).all()
    u = _index_of(df["user_id"], emb.users)
    i = _index_of(df["item_id"], emb.items)
    assert np.asarray(seen[u, i]).ravel().sum() == 0
    # the scores are the model's dot products
    np.testing.assert_allclose(
        df["score"].to_numpy(), np.einsum("nd,nd->n", emb.user_vectors[u], emb.item_vectors[i]), rtol=1e-4, atol=1e-5
    )
    assert (df["model"] == "als").all() and (df["run_id"] == "run-1").all()


def test_topk_ranks_match_brute_force_and_int_user_ids(seen: sp.csr_matrix, tmp_path: Path) -> None:
    user_ids = pl.Series("id", np.arange(5000, 5000 + N_USERS) * 7)
    emb = _emb(user_ids, pl.Series("id", [f"sku-{i}" for i in range(N_ITEMS)]))
    df = read_export(export_topk(emb, seen, ExportConfig(k=5), tmp_path, "r").path)
    assert df["user_id"].dtype == pl.Int64 and df["item_id"].dtype == pl.String
    scores = emb.user_vectors @ emb.item_vectors.T
    scores[seen.toarray() != 0] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    got = df.sort(["user_id", "rank"])
    expected_items = emb.items.decode(best.ravel()).to_list()
    expected_users = emb.users.decode(np.repeat(np.arange(N_USERS), 5)).to_list()
    assert got["user_id"].to_list() == expected_users
    assert got["item_id"].to_list() == expected_items


def test_users_subset_and_fewer_candidates_than_k(emb: Embeddings, tmp_path: Path) -> None:
    # user 0 has seen all but 2 items: 2 rows, not k; user 3 has seen every item: no rows
    dense = np.zeros((N_USERS, N_ITEMS), dtype=np.float32)
    dense[0, 2:] = 1
    dense[3, :] = 1
    seen = sp.csr_matrix(dense)
    res = export_topk(emb, seen, ExportConfig(k=5), tmp_path, "r", users=np.array([0, 3, 7]))
    df = read_export(res.path)
    counts = dict(df.group_by("user_id").len().iter_rows())
    assert counts == {"u000": 2, "u007": 5}
    assert res.users == 2 and res.rows == 7
    assert set(df.filter(pl.col("user_id") == "u000")["item_id"].to_list()) == {1000, 1001}
    with pytest.raises(ValueError, match="duplicate"):
        export_topk(emb, seen, ExportConfig(k=5), tmp_path, "r", users=np.array([1, 1]))


def test_allow_and_deny_lists_use_original_ids(emb: Embeddings, seen: sp.csr_matrix, tmp_path: Path) -> None:
    allow = [str(x) for x in range(1000, 1030)]
    cfg = ExportConfig(k=6, allow_items=[*allow, "999999"], deny_items=["1000", "1001", "not-an-id"])
    with pytest.warns(DataWarning) as record:
        df = read_export(export_topk(emb, seen, cfg, tmp_path, "r").path)
    messages = [str(w.message) for w in record]
    assert any("allow_items" in m and "'999999'" in m for m in messages)
    assert any("deny_items" in m and "'not-an-id'" in m for m in messages)
    items = set(df["item_id"].to_list())
    assert items <= set(range(1002, 1030))
    assert len(items) > 6  # not one global list: per-user rankings inside the allowed set


def test_empty_allow_list_gives_an_empty_committed_table(emb: Embeddings, seen: sp.csr_matrix, tmp_path: Path) -> None:
    cfg = ExportConfig(k=3, allow_items=["1005"], deny_items=["1005"], write_csv=True)
    with pytest.warns(DataWarning, match="no item is admissible"):
        res = export_topk(emb, seen, cfg, tmp_path, "r")
    df = read_export(res.path)
    assert df.height == 0 and res.rows == 0 and res.users == 0
    assert df.columns == ["user_id", "rank", "item_id", "score", "source", "model", "run_id"]
    assert pl.read_csv(tmp_path / "topk.csv").columns == df.columns


def test_partitioned_output(emb: Embeddings, seen: sp.csr_matrix, tmp_path: Path) -> None:
    cfg = ExportConfig(k=4, chunk_users=25, rows_per_file=150)
    res = export_topk(emb, seen, cfg, tmp_path, "r")
    parts = sorted((tmp_path / "topk").glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(4)]  # 480 rows = 150+150+150+30
    assert [pl.read_parquet(p).height for p in parts] == [150, 150, 150, 30]
    assert res.files == [str(p) for p in parts]
    whole = read_export(export_topk(emb, seen, ExportConfig(k=4), tmp_path, "r", name="single").path)
    assert read_export(res.path).equals(whole)


def test_csv_alongside_matches_parquet(emb: Embeddings, seen: sp.csr_matrix, tmp_path: Path) -> None:
    res = export_topk(emb, seen, ExportConfig(k=3, chunk_users=16, write_csv=True), tmp_path, "r")
    assert res.files[-1] == str(tmp_path / "topk.csv")
    csv = pl.read_csv(tmp_path / "topk.csv", schema_overrides={"rank": pl.Int32, "score": pl.Float32})
    assert csv.equals(read_export(res.path))


def test_failure_mid_write_keeps_the_previous_table(
    emb: Embeddings, seen: sp.csr_matrix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ExportConfig(k=4, chunk_users=10, rows_per_file=40, write_csv=True)
    before = read_export(export_topk(emb, seen, cfg, tmp_path, "run-old").path)
    csv_before = (tmp_path / "topk.csv").read_bytes()

    real_write = export_mod._write_part
    calls = {"n": 0}

    def failing_write(frame: pl.DataFrame, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # fault injection: the disk fills up on the third part file
            raise OSError(28, "No space left on device")
        real_write(frame, path)

    monkeypatch.setattr(export_mod, "_write_part", failing_write)
    with pytest.raises(OSError, match="No space left"):
        export_topk(emb, seen, cfg, tmp_path, "run-new")
    assert calls["n"] == 3
    after = read_export(tmp_path / "topk")
    assert after.equals(before) and (after["run_id"] == "run-old").all()
    assert (tmp_path / "topk.csv").read_bytes() == csv_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topk", "topk.csv"]  # no staging folder, no temp CSV


def test_read_export_refuses_uncommitted_tables(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_export(tmp_path / "missing")
    half = tmp_path / "half"
    half.mkdir()
    pl.DataFrame({"a": [1]}).write_parquet(half / "part-00000.parquet")
    with pytest.raises(FileNotFoundError, match="not committed"):
        read_export(half)


def test_similar_items_match_brute_force(emb: Embeddings, tmp_path: Path) -> None:
    res = export_similar_items(emb, ExportConfig(similar_k=5, chunk_users=17, rows_per_file=100), tmp_path, "r")
    assert (tmp_path / "similar_items" / SUCCESS_MARKER).exists() and len(res.files) > 1
    df = read_export(res.path).sort(["item_id", "rank"])
    assert df.columns == ["item_id", "rank", "similar_item_id", "score", "model", "run_id"]
    v = emb.item_vectors.astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cos = v @ v.T
    np.fill_diagonal(cos, -np.inf)
    best = np.argsort(-cos, axis=1, kind="stable")[:, :5]
    assert df["item_id"].to_list() == np.repeat(emb.items.ids.to_numpy(), 5).tolist()
    assert df["similar_item_id"].to_list() == emb.items.decode(best.ravel()).to_list()
    np.testing.assert_allclose(df["score"].to_numpy(), np.take_along_axis(cos, best, 1).ravel(), atol=1e-5)
    assert (df["item_id"] != df["similar_item_id"]).all()
    assert res.users == N_ITEMS and res.rows == N_ITEMS * 5


def test_similar_items_respect_deny_list(emb: Embeddings, tmp_path: Path) -> None:
    cfg = ExportConfig(similar_k=4, deny_items=["1000", "1001", "1002"])
    df = read_export(export_similar_items(emb, cfg, tmp_path, "r").path)
    assert not df["similar_item_id"].is_in([1000, 1001, 1002]).any()
    assert df["item_id"].n_unique() == N_ITEMS  # denied items still get their own similar list


def test_tables_carry_the_item_text(emb: Embeddings, seen: sp.csr_matrix, tmp_path: Path) -> None:
    """With the log's item texts (ingest.columns.item_text), each ID column has its text beside it: looked up by
    item, null where the log has none, IDs the model does not know ignored, IDs given as strings matched."""
    text = pl.DataFrame({"item_id": ["1000", "1001", "1003", "99999"], "text": ["RED MUG", "BLUE MUG", None, "gone"]})
    table = read_export(export_topk(emb, seen, ExportConfig(k=5), tmp_path, "run-1", item_text=text).path)
    assert table.columns == ["user_id", "rank", "item_id", "item_text", "score", "source", "model", "run_id"]
    want = {1000: "RED MUG", 1001: "BLUE MUG"}  # 1003: null text; every other item: no text
    for item, got in table.select("item_id", "item_text").unique().iter_rows():
        assert got == want.get(item), item
    plain = read_export(export_topk(emb, seen, ExportConfig(k=5), tmp_path / "plain", "run-1").path)
    assert plain.columns == [c for c in table.columns if c != "item_text"]
    assert plain.select("user_id", "rank", "item_id").equals(table.select("user_id", "rank", "item_id"))

    sim = read_export(export_similar_items(emb, ExportConfig(similar_k=4), tmp_path, "run-1", item_text=text).path)
    assert sim.columns == ["item_id", "item_text", "rank", "similar_item_id", "similar_item_text", "score", "model",
                           "run_id"]  # fmt: skip
    for item, item_text, similar, similar_text in sim.select(
        "item_id", "item_text", "similar_item_id", "similar_item_text"
    ).iter_rows():
        assert item_text == want.get(item) and similar_text == want.get(similar)
