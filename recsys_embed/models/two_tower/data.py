"""Training data for the two-tower model: time-ordered user histories and a seeded ``LightningDataModule``.

Data contract. One *training example* per positive train pair ``(u, i)`` (a stored entry of
``train.matrix`` with confidence > 0), stamped with the time of its first positive event. Repeat purchases
of an item are not separate examples: evaluation never asks for an already-seen item, so learning to
re-predict one would spend capacity on a question that is never asked.

The example's *history* is the user's pairs first seen strictly before that time (the same basket is
excluded, as the future is at test time), the most recent ``history_length`` of them, each weighted by
``log1p(confidence)`` (when ``history_confidence``) times ``0.5 ** (age_days / half_life)`` relative to the
most recent history item. At inference a user's history is all their train pairs, so training mimics
"predict what comes next from what came before". Logs without time (or without an event table) get a
seeded random order per user instead.

Everything is prepared as flat NumPy arrays (CSR-like per user, sorted by time) with Polars joins and
sorts; a batch is a handful of vectorised gathers, never a Python loop over rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pytorch_lightning as pl_
import scipy.sparse as sp
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from recsys_embed.types import Interactions

log = logging.getLogger(__name__)

_SECONDS_PER_DAY = 86_400.0


@dataclass
class HistoryConfig:
    """How a history is pooled (a slice of ``TwoTowerConfig``, saved with the model)."""

    length: int = 50
    half_life_days: float | None = 60.0
    confidence: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"length": self.length, "half_life_days": self.half_life_days, "confidence": self.confidence}


@dataclass
class Sequences:
    """Every user's positive pairs sorted by (first time, item): a CSR over users.

    Attributes:
        indptr: int64 (n_users + 1,); user ``u``'s pairs are ``[indptr[u], indptr[u + 1])``.
        user: int64 (P,) user of each pair.
        item: int64 (P,) item index.
        ts: float64 (P,) seconds (first positive event of the pair; a seeded rank when there is no time).
        weight: float32 (P,) history weight before recency: log1p(confidence) or 1.
        basket_start: int64 (P,) first position of the user's pairs with the same ``ts``: the example at
            position ``p`` sees history ``[indptr[u], basket_start[p])``.
        item_count: int64 (n_items,) examples per item (the log-Q frequency).
    """

    indptr: np.ndarray
    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    weight: np.ndarray
    basket_start: np.ndarray
    item_count: np.ndarray

    @property
    def n_examples(self) -> int:
        return int(self.item.shape[0])


def build_sequences(train: Interactions, confidence: bool = True, seed: int = 0) -> Sequences:
    """``Sequences`` from ``train.matrix`` (the positive pairs) and ``train.events`` (their first times).

    Args:
        train: ``matrix`` CSR (n_users x n_items) confidence; ``events`` (user_idx, item_idx, ts, weight) or
            an empty frame. Pairs whose events carry no time are ordered by a seeded random rank.
        confidence: history weight ``log1p(confidence)`` (else 1).
        seed: the random order used where time is missing.
    """
    n_users, n_items = train.shape
    coo = sp.coo_matrix(train.matrix)
    keep = coo.data > 0
    pairs = pl.DataFrame(
        {
            "user_idx": coo.row[keep].astype(np.int64),
            "item_idx": coo.col[keep].astype(np.int64),
            "conf": coo.data[keep].astype(np.float64),
        }
    )
    ev = train.events
    if ev.height and {"user_idx", "item_idx", "ts"} <= set(ev.columns):
        pos = ev.filter(pl.col("weight") > 0) if "weight" in ev.columns else ev
        first = pos.group_by("user_idx", "item_idx").agg(pl.col("ts").min().dt.epoch("us").alias("ts_us"))
        pairs = pairs.join(first, on=["user_idx", "item_idx"], how="left")
        ts = pairs["ts_us"].cast(pl.Float64).to_numpy() / 1e6
    else:
        ts = np.full(pairs.height, np.nan)
    missing = np.isnan(ts)
    if missing.any():
        # no time: a seeded random order within each user (ranks are far below any epoch time)
        ts[missing] = np.random.default_rng(seed).permutation(int(missing.sum())).astype(np.float64)
        log.info("two_tower: %d of %d train pairs have no time; using a seeded random order", missing.sum(), len(ts))
    pairs = pairs.with_columns(pl.Series("ts", ts)).sort("user_idx", "ts", "item_idx")
    pairs = pairs.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("pos"))
    pairs = pairs.with_columns(pl.col("pos").min().over("user_idx", "ts").alias("basket_start"))
    user = pairs["user_idx"].to_numpy()
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=n_users), out=indptr[1:])
    conf = pairs["conf"].to_numpy()
    item = pairs["item_idx"].to_numpy()
    return Sequences(
        indptr=indptr,
        user=user,
        item=item,
        ts=pairs["ts"].to_numpy(),
        weight=(np.log1p(conf) if confidence else np.ones_like(conf)).astype(np.float32),
        basket_start=pairs["basket_start"].to_numpy(),
        item_count=np.bincount(item, minlength=n_items).astype(np.int64),
    )


def gather_history(
    seq_item: np.ndarray,
    seq_ts: np.ndarray,
    seq_weight: np.ndarray,
    start: np.ndarray,
    stop: np.ndarray,
    cfg: HistoryConfig,
    pad_item: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The last ``cfg.length`` entries of ``[start, stop)`` per row, most recent first, with pooling weights.

    Args:
        seq_item, seq_ts, seq_weight: (P,) flat time-sorted sequences (as ``Sequences``).
        start, stop: int64 (B,) ranges into them.
        cfg: history length, recency half-life, (confidence weights are already in ``seq_weight``).
        pad_item: the item index written where a row has fewer entries.

    Returns:
        (int64 (B, L) items, float32 (B, L) weights; 0 on padding). Weights are unnormalised:
        ``seq_weight * 0.5 ** ((ts_newest - ts) / half_life)``, so the newest item weighs ``seq_weight``.
    """
    length = cfg.length
    idx = stop[:, None] - 1 - np.arange(length, dtype=np.int64)[None, :]
    valid = idx >= start[:, None]
    safe = np.where(valid, idx, 0)
    if seq_item.shape[0] == 0:
        return np.full(idx.shape, pad_item, dtype=np.int64), np.zeros(idx.shape, dtype=np.float32)
    items = np.where(valid, seq_item[safe], pad_item)
    weight = np.where(valid, seq_weight[safe], 0.0)
    if cfg.half_life_days is not None:
        newest = seq_ts[np.maximum(stop - 1, 0)]
        age_days = (newest[:, None] - seq_ts[safe]) / _SECONDS_PER_DAY
        weight = weight * np.exp2(-np.maximum(age_days, 0.0) / cfg.half_life_days)
    return items.astype(np.int64), np.where(valid, weight, 0.0).astype(np.float32)


class ExampleBatches(Dataset[dict[str, torch.Tensor]]):
    """Training examples; ``dataset[list_of_positions]`` returns one whole batch (vectorised).

    A batch: ``user`` (B,), ``item`` (B,) the positive, ``hist_items`` (B, L), ``hist_weights`` (B, L).
    """

    def __init__(self, seq: Sequences, cfg: HistoryConfig, n_items: int) -> None:
        self.seq, self.cfg, self.pad = seq, cfg, n_items

    def __len__(self) -> int:
        return self.seq.n_examples

    def __getitem__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        p = np.asarray(positions, dtype=np.int64)
        s = self.seq
        user = s.user[p]
        items, weights = gather_history(s.item, s.ts, s.weight, s.indptr[user], s.basket_start[p], self.cfg, self.pad)
        return {
            "user": torch.from_numpy(user),
            "item": torch.from_numpy(s.item[p]),
            "hist_items": torch.from_numpy(items),
            "hist_weights": torch.from_numpy(weights),
        }


class UserBatches(Dataset[dict[str, torch.Tensor]]):
    """Users with their whole train history (for validation and the final user vectors)."""

    def __init__(self, seq: Sequences, users: np.ndarray, cfg: HistoryConfig, n_items: int) -> None:
        self.seq, self.users, self.cfg, self.pad = seq, np.asarray(users, dtype=np.int64), cfg, n_items

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def __getitem__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        u = self.users[np.asarray(positions, dtype=np.int64)]
        s = self.seq
        items, weights = gather_history(s.item, s.ts, s.weight, s.indptr[u], s.indptr[u + 1], self.cfg, self.pad)
        return {
            "user": torch.from_numpy(u),
            "hist_items": torch.from_numpy(items),
            "hist_weights": torch.from_numpy(weights),
        }


def batch_loader(
    dataset: ExampleBatches | UserBatches, batch_size: int, shuffle: bool, seed: int, drop_last: bool, workers: int = 0
) -> DataLoader[Any]:
    """A loader whose dataset builds whole batches from lists of positions (``batch_size=None``)."""
    base: RandomSampler | SequentialSampler
    n = len(dataset)
    if shuffle:
        base = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    else:
        base = SequentialSampler(range(n))
    return DataLoader(
        dataset,
        sampler=BatchSampler(base, batch_size=batch_size, drop_last=drop_last),
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


class TwoTowerDataModule(pl_.LightningDataModule):
    """Seeded loaders over the prepared ``Sequences``.

    ``setup()`` assigns the splits: ``fit`` = every training example (shuffled, seeded, last partial batch
    dropped so that every step sees ``batch_size`` in-batch negatives unless the data is smaller), and the
    validation users (those with validation targets) with their full train histories.
    """

    def __init__(
        self,
        seq: Sequences,
        n_items: int,
        history: HistoryConfig,
        batch_size: int,
        val_users: np.ndarray | None,
        seed: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.seq, self.n_items, self.history = seq, n_items, history
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.val_users = val_users
        self.train_set: ExampleBatches | None = None
        self.val_set: UserBatches | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = ExampleBatches(self.seq, self.history, self.n_items)
        if stage in (None, "fit", "validate") and self.val_users is not None and len(self.val_users):
            self.val_set = UserBatches(self.seq, self.val_users, self.history, self.n_items)

    @property
    def drop_last(self) -> bool:
        return self.seq.n_examples > self.batch_size

    def train_dataloader(self) -> DataLoader[Any]:
        assert self.train_set is not None, "call setup('fit') first"
        return batch_loader(self.train_set, self.batch_size, True, self.seed, self.drop_last, self.num_workers)

    def val_dataloader(self) -> DataLoader[Any]:
        if self.val_set is None:
            return []  # type: ignore[return-value]
        return batch_loader(self.val_set, 4 * self.batch_size, False, self.seed, False, self.num_workers)
