"""Lightning glue: wires the towers (``towers``) to the task (``task``) and to the Trainer's hooks.

Nothing here defines a feature, a layer or a loss. A training step:

1. the items a step needs (positives, history items, uniform negatives) are deduplicated and run through
   the item tower once (``dense_unique``), so a history item costs one tower call per step, not per row;
2. the user tower pools the history vectors (and, with ``user_encoder: attention``, reads the most recent ones
   with recency-aware attention) and adds the user ID (and features);
3. ``RetrievalTask`` computes the sampled-softmax loss.

Validation embeds the validation users (the DataModule's val loader), gathers them across DDP ranks,
embeds every item, and scores them with the shared ``evaluate`` harness (full-corpus retrieval);
``val_<metric>`` drives early stopping and the best checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytorch_lightning as pl_
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from recsys_embed.config import TwoTowerConfig
from recsys_embed.io import write_json_atomic
from recsys_embed.models.two_tower.task import FullCorpusMetrics, RetrievalTask, TaskOutput
from recsys_embed.models.two_tower.towers import HistoryAttention, ItemTower, UserTower

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, float], int], None]


@dataclass
class FeatureTables:
    """Per-entity feature tensors; row ``n`` (one past the last entity) is the all-unknown padding row.

    Attributes:
        tokens: int64 (n + 1, T) hashed text tokens (padding id = text_buckets); (n + 1, 0) without text.
        codes: int64 (n + 1, C) categorical codes (0 = unknown).
        values: float32 (n + 1, N) standardised numeric features.
        sentence: float32 (n + 1, S) fixed sentence embeddings (S = 0 without).
    """

    tokens: Tensor
    codes: Tensor
    values: Tensor
    sentence: Tensor

    @classmethod
    def empty(
        cls, n: int, tokens: int = 0, codes: int = 0, values: int = 0, sentence: int = 0, pad: int = 0
    ) -> FeatureTables:
        return cls(
            torch.full((n + 1, tokens), pad, dtype=torch.int64),
            torch.zeros((n + 1, codes), dtype=torch.int64),
            torch.zeros((n + 1, values), dtype=torch.float32),
            torch.zeros((n + 1, sentence), dtype=torch.float32),
        )


def dense_unique(ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Distinct values of ``ids`` (any shape, values in ``[0, n)``) and the inverse map, without sorting.

    Returns:
        (uniq (U,) ascending, inv (same shape as ids) with ``uniq[inv] == ids``). O(n + len(ids)): a presence
        mask and its cumulative sum (``torch.unique`` sorts, which costs far more on CPU).
    """
    present = torch.zeros(n, dtype=torch.bool, device=ids.device)
    present[ids.reshape(-1)] = True
    uniq = present.nonzero().squeeze(1)
    rank = torch.cumsum(present, 0) - 1
    return uniq, rank[ids]


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 down to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    module: TwoTowerModule, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and a per-step warmup + cosine schedule (``warmup_cosine``)."""
    cfg = module.cfg
    params = [p for p in module.parameters() if p.requires_grad]
    # fused: one kernel over each tensor instead of ~10 passes (CPU and CUDA; measured 5.6 -> 1.1 ms per step on
    # one CPU thread at the default size)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    total = max(1, total_steps)
    warmup = int(cfg.warmup_fraction * total)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))


class TwoTowerModule(pl_.LightningModule):
    """The two towers + the retrieval task under Lightning.

    Args:
        cfg: the two-tower config slice (hyperparameters; logged via ``save_hyperparameters``).
        n_users, n_items: train users/items (ID-embedding rows; index n = unknown).
        item_count: int64 (n_items,) training examples per item (log-Q).
        items, users: feature tables (``FeatureTables``), ``n_items + 1`` / ``n_users + 1`` rows.
        item_cardinalities, user_cardinalities: embedding rows per categorical column (``TabularSpec``).
        metrics: full-corpus validation metrics (None: no validation).
    """

    item_tokens: Tensor
    item_codes: Tensor
    item_values: Tensor
    item_sentence: Tensor
    user_codes: Tensor
    user_values: Tensor

    def __init__(
        self,
        cfg: TwoTowerConfig,
        n_users: int,
        n_items: int,
        item_count: np.ndarray,
        items: FeatureTables,
        users: FeatureTables,
        item_cardinalities: list[int] | None = None,
        user_cardinalities: list[int] | None = None,
        metrics: FullCorpusMetrics | None = None,
    ) -> None:
        super().__init__()
        hp = {**cfg.model_dump(mode="json"), "n_users": n_users, "n_items": n_items}
        self.save_hyperparameters(hp, ignore=["cfg", "item_count", "items", "users", "metrics"])
        self.cfg, self.n_users, self.n_items = cfg, n_users, n_items
        text_buckets = cfg.text_buckets if items.tokens.shape[1] else 0
        self.item_tower = ItemTower(
            n_items,
            cfg.embedding_dim,
            cfg.hidden_dim,
            text_buckets,
            list(item_cardinalities or []),
            int(items.values.shape[1]),
            int(items.sentence.shape[1]),
            cfg.item_id_dropout,
        )
        self.user_tower = UserTower(
            n_users,
            cfg.embedding_dim,
            cfg.hidden_dim,
            list(user_cardinalities or []),
            int(users.values.shape[1]),
            cfg.user_id_dropout,
            HistoryAttention(cfg.embedding_dim, cfg.attention_length, cfg.attention_heads)
            if cfg.user_encoder == "attention"
            else None,
        )
        self.task = RetrievalTask(
            item_count, cfg.batch_size, cfg.temperature, cfg.learn_temperature, cfg.logq_correction, cfg.num_negatives
        )
        # feature tables travel with the module (device moves, checkpoints)
        self.register_buffer("item_tokens", items.tokens)
        self.register_buffer("item_codes", items.codes)
        self.register_buffer("item_values", items.values)
        self.register_buffer("item_sentence", items.sentence)
        self.register_buffer("user_codes", users.codes)
        self.register_buffer("user_values", users.values)
        self.val_metrics = metrics
        self.on_epoch: EpochCallback | None = None
        self.history: list[dict[str, float]] = []
        self.record_path: Path | None = None
        self.train_seconds = 0.0
        self.train_samples = 0
        self._epoch: dict[str, Any] = {}
        self._val_rows: list[tuple[Tensor, Tensor]] = []
        self._last_val: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------
    # Embedding (used by training, validation, export and the encoder for new users/items)

    def embed_items(self, idx: Tensor) -> Tensor:
        """(n,) item indices (``n_items`` = unknown/padding) -> (n, d) unit vectors from the stored features."""
        return self.item_tower(
            idx, self.item_tokens[idx], self.item_codes[idx], self.item_values[idx], self.item_sentence[idx]
        )

    def embed_users(
        self, users: Tensor, hist_items: Tensor, hist_weights: Tensor, item_vectors: Tensor | None = None
    ) -> Tensor:
        """(B,) user indices (``n_users`` = new user), (B, L) history items (``n_items`` = padding) and
        weights -> (B, d) unit vectors. ``item_vectors`` (>= n_items + 1, d), when given, holds the history
        items' vectors (e.g. ``all_item_vectors()``) instead of running the item tower."""
        if item_vectors is None:
            uniq, inv = dense_unique(hist_items, self.n_items + 1)
            item_vectors, hist_items = self.embed_items(uniq), inv
        history = self.user_tower.read_history(item_vectors, hist_items, hist_weights)
        return self.user_tower(users, history, self.user_codes[users], self.user_values[users])

    @torch.no_grad()
    def all_item_vectors(self, chunk: int = 65_536) -> Tensor:
        """(n_items + 1, d) float32 unit vectors of every item (+ the padding row), in eval mode."""
        idx = torch.arange(self.n_items + 1, device=self.device)
        return torch.cat([self.embed_items(idx[i : i + chunk]).float() for i in range(0, len(idx), chunk)])

    # ------------------------------------------------------------------------------------------------
    # Training

    def setup(self, stage: str) -> None:
        # every process sets its own pool: DDP processes do not inherit ``train.torch_threads`` (Lightning's
        # launchers give them cores / processes unless OMP_NUM_THREADS is set); a no-op in the calling process
        if self.cfg.torch_threads > 0:
            torch.set_num_threads(self.cfg.torch_threads)

    def loss(self, batch: dict[str, Tensor]) -> TaskOutput:
        """The task's output for one training batch (``ExampleBatches``): pure computation, no logging."""
        user, item, hist, weights = batch["user"], batch["item"], batch["hist_items"], batch["hist_weights"]
        b = item.shape[0]
        neg = self.task.sample_negatives(item.device)
        parts = [item, hist.reshape(-1)] + ([] if neg is None else [neg])
        # every item the step needs runs through the item tower once
        uniq, inv = dense_unique(torch.cat(parts), self.n_items + 1)
        vecs = self.embed_items(uniq)
        pos_v = vecs[inv[:b]]
        neg_v = None if neg is None else vecs[inv[b + hist.numel() :]]
        history = self.user_tower.read_history(vecs, inv[b : b + hist.numel()].view_as(hist), weights)
        u = self.user_tower(user, history, self.user_codes[user], self.user_values[user])
        return self.task(u, pos_v, item, neg_v, neg)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.loss(batch)
        b = int(batch["item"].shape[0])
        # epoch means, all-reduced over DDP ranks once per epoch (a no-op on one device)
        self.log("train_loss", out.loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=b, sync_dist=True)
        self.log("train_batch_accuracy", out.accuracy, on_step=False, on_epoch=True, batch_size=b, sync_dist=True)
        ep = self._epoch
        ep["loss"] = ep.get("loss", 0.0) + out.loss.detach() * b
        ep["n"] = ep.get("n", 0) + b
        return out.loss

    def on_train_epoch_start(self) -> None:
        self._epoch = {"t0": time.perf_counter(), "val_seconds": 0.0}
        self._last_val = {}

    def on_train_epoch_end(self) -> None:
        ep = self._epoch
        n = int(ep.get("n", 0))
        seconds = time.perf_counter() - ep["t0"] - ep["val_seconds"]
        self.train_seconds += seconds
        self.train_samples += n * self.trainer.world_size
        row: dict[str, float] = {"epoch": float(self.current_epoch + 1)}
        if n:
            row["train_loss"] = float(ep["loss"]) / n  # (train_batch_accuracy goes to the logger only)
        # the history feeds the training-curve plot: loss on one axis, validation recall/NDCG on the other
        row.update({k: v for k, v in self._last_val.items() if k.startswith(("val_recall", "val_ndcg"))})
        self.history.append(row)
        if self.record_path is not None and self.global_rank == 0:
            # on disk too: with a spawning strategy (ddp_spawn) this process's attributes never reach the caller
            write_json_atomic(
                {"history": self.history, "train_samples": self.train_samples, "train_seconds": self.train_seconds},
                self.record_path,
            )
        self._log_epoch(row, n / seconds if seconds > 0 else float("nan"))
        if self.on_epoch is not None and self.global_rank == 0:
            self.on_epoch({k: v for k, v in row.items() if k != "epoch"}, self.current_epoch + 1)

    @rank_zero_only
    def _log_epoch(self, row: dict[str, float], samples_per_second: float) -> None:
        shown = " ".join(f"{k} {v:.5g}" for k, v in row.items() if k != "epoch")
        log.debug(
            "two_tower epoch %d/%d: %s (%.0f samples/s)",
            int(row["epoch"]), self.trainer.max_epochs or -1, shown, samples_per_second,
        )  # fmt: skip

    def configure_optimizers(self) -> Any:
        opt, sched = make_optimizer(self, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------
    # Validation: full-corpus retrieval

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []
        self._val_t0 = time.perf_counter()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        u = self.embed_users(batch["user"], batch["hist_items"], batch["hist_weights"])
        self._val_rows.append((batch["user"], u.float() * self.task.scale.detach()))

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics is None or not self._val_rows:
            return
        idx = self._gather_rows(torch.cat([r[0] for r in self._val_rows]))
        vec = self._gather_rows(torch.cat([r[1] for r in self._val_rows]))
        self._val_rows = []
        idx_np = idx.cpu().numpy()
        idx_np, first = np.unique(idx_np, return_index=True)  # DDP samplers may repeat users to even out ranks
        items = self.all_item_vectors()[: self.n_items].cpu().numpy()
        metrics = self.val_metrics(idx_np, vec.cpu().numpy()[first], items)
        val = {f"val_{k}": float(v) for k, v in metrics.items() if k != "n_users_evaluated"}
        # every rank computed the same numbers from the gathered vectors (the all-reduce keeps Lightning's
        # distributed bookkeeping happy and changes nothing). For early stopping and the checkpoint only:
        self.log_dict(val, sync_dist=True, logger=False)
        # ...the loggers get them here, once, from rank 0. Through self.log they would be a flush of their own,
        # to which Lightning adds its "epoch" key a second time at the same step as the train epoch-end flush.
        if self.trainer.is_global_zero:
            step = max(self.global_step - 1, 0)  # the step Lightning gives epoch-end metrics: the last batch's
            for logger in self.loggers:
                logger.log_metrics(val, step=step)
        self._last_val = val
        seconds = time.perf_counter() - self._val_t0
        if "val_seconds" in self._epoch:
            self._epoch["val_seconds"] += seconds

    def _gather_rows(self, x: Tensor) -> Tensor:
        """Concatenate ``x`` (rows) over DDP ranks (ranks may hold different row counts)."""
        if self.trainer.world_size <= 1:
            return x
        size = torch.tensor([x.shape[0]], device=x.device)
        sizes = cast(Tensor, self.all_gather(size)).reshape(-1)
        most = int(sizes.max())
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = cast(Tensor, self.all_gather(padded))
        return torch.cat([gathered[r, : int(s)] for r, s in enumerate(sizes.tolist())])
