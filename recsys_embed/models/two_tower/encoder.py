"""Embed users and items that arrived after training, with the trained towers; save and load them.

``TwoTowerEncoder`` bundles what inference needs: the module's weights (towers, feature tables, temperature),
the feature encodings (hashing parameters, categorical vocabularies, numeric standardisation), the
history pooling rule and the train ID maps. ``save(folder)`` writes::

    two_tower.pt          torch state_dict (weights + feature-table buffers)
    two_tower.json        config, shapes, feature specs, history rule, hash version
    user_map.parquet      train user IDs (row = index)
    item_map.parquet      train item IDs

and ``TwoTowerEncoder.load(folder)`` restores it on CPU in a fresh process. Vectors follow the
``Embeddings`` contract of the trained model: item vectors are unit length, user vectors are unit length
times 1 / temperature, and the score is their dot product.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys_embed.config import TwoTowerConfig
from recsys_embed.io import atomic_path, write_json_atomic
from recsys_embed.models.two_tower.data import HistoryConfig, gather_history
from recsys_embed.models.two_tower.features import HASH_VERSION, TabularSpec, align, hash_tokens
from recsys_embed.models.two_tower.module import FeatureTables, TwoTowerModule
from recsys_embed.types import IdMap

log = logging.getLogger(__name__)

WEIGHTS_FILE = "two_tower.pt"
META_FILE = "two_tower.json"


@dataclass
class ItemContent:
    """How raw item rows become item-tower inputs (a part of the saved encoder)."""

    text_column: str | None
    item_spec: TabularSpec
    sentence_dim: int = 0

    def encode(self, frame: pl.DataFrame, cfg: TwoTowerConfig, n_tokens: int) -> FeatureTables:
        """Features of ``frame``'s rows (n rows -> tables of n + 1 rows, the last one padding)."""
        n = frame.height
        tables = FeatureTables.empty(
            n, n_tokens, len(self.item_spec.categorical), self.item_spec.n_numeric, self.sentence_dim, cfg.text_buckets
        )
        if n_tokens and self.text_column and self.text_column in frame.columns:
            tok, _ = hash_tokens(frame[self.text_column], cfg.text_buckets, n_tokens, cfg.text_bigrams)
            tables.tokens[:n] = torch.from_numpy(tok)
        codes, values = self.item_spec.encode(frame, n)
        tables.codes[:n], tables.values[:n] = torch.from_numpy(codes), torch.from_numpy(values)
        if self.sentence_dim and self.text_column and self.text_column in frame.columns:
            from recsys_embed.models.two_tower.sentence import encode_texts

            tables.sentence[:n] = torch.from_numpy(encode_texts(frame[self.text_column]))
        return tables


class TwoTowerEncoder:
    """Trained towers + feature encodings: embed known and new users and items without retraining."""

    def __init__(
        self,
        module: TwoTowerModule,
        users: IdMap,
        items: IdMap,
        content: ItemContent,
        user_spec: TabularSpec,
        history: HistoryConfig,
    ) -> None:
        self.module = module.eval()
        self.users, self.items = users, items
        self.content, self.user_spec, self.history = content, user_spec, history
        self.cfg: TwoTowerConfig = module.cfg

    @property
    def scale(self) -> float:
        """1 / temperature: user vectors are scaled by it, so the dot product is the trained logit."""
        return float(self.module.task.scale.detach().cpu())

    # ------------------------------------------------------------------------------------------------
    # Items

    @torch.no_grad()
    def item_vectors(self, items: pl.DataFrame, id_column: str = "item_id") -> np.ndarray:
        """Vectors of ``items`` (one row each: ``id_column``, the text column, configured feature columns).

        Train items get their trained vector (ID + stored features, as in the exported embeddings); new
        items are embedded from the given content alone (the tower's "unknown item" ID slot).

        Returns:
            float32 (n, d) unit vectors, in row order.
        """
        if id_column not in items.columns:
            raise ValueError(f"items frame lacks the ID column {id_column!r} (found: {items.columns})")
        known = self.items.lookup(items[id_column])
        known_mask = known.is_not_null().to_numpy()
        idx = known.fill_null(-1).to_numpy().astype(np.int64)
        out = np.zeros((items.height, self.cfg.embedding_dim), dtype=np.float32)
        m = self.module
        if known_mask.any():
            out[known_mask] = m.embed_items(torch.from_numpy(idx[known_mask])).float().numpy()
        new = ~known_mask
        if new.any():
            tables = self.content.encode(items.filter(pl.Series(new)), self.cfg, int(m.item_tokens.shape[1]))
            n_new = int(new.sum())
            ids = torch.full((n_new,), m.n_items, dtype=torch.int64)
            vec = m.item_tower(ids, tables.tokens[:n_new], tables.codes[:n_new], tables.values[:n_new],
                               tables.sentence[:n_new])  # fmt: skip
            out[new] = vec.float().numpy()
            log.info("two_tower encoder: %d of %d items are new and were embedded from content", n_new, items.height)
        return out

    # ------------------------------------------------------------------------------------------------
    # Users

    @torch.no_grad()
    def user_vectors(
        self,
        history: pl.DataFrame,
        user_column: str = "user_id",
        item_column: str = "item_id",
        ts_column: str | None = "ts",
        weight_column: str | None = None,
        new_items: pl.DataFrame | None = None,
        user_features: pl.DataFrame | None = None,
    ) -> tuple[pl.Series, np.ndarray]:
        """Vectors of the users in ``history`` (one row per event), from their history alone.

        Args:
            history: events with ``user_column``, ``item_column``, optionally ``ts_column`` (datetime or
                seconds) and ``weight_column`` (confidence; default 1 per event). Rows with weight <= 0 count
                against the pair's confidence like cancellations do in training.
            new_items: content rows (``item_id``, text, features) of history items that are not train items;
                without it, such items are ignored (logged).
            user_features: ``user_id`` + configured user feature columns (optional).

        Returns:
            (user IDs in sorted order, float32 (n_users, d) vectors = unit vector / temperature). Users known
            at training time keep their ID embedding; new users use the "unknown user" slot.
        """
        for c in (user_column, item_column):
            if c not in history.columns:
                raise ValueError(f"history lacks column {c!r} (found: {history.columns})")
        m = self.module
        ev = history.select(
            pl.col(user_column).alias("user"),
            pl.col(item_column).alias("item"),
            (pl.col(weight_column).cast(pl.Float64) if weight_column else pl.lit(1.0)).alias("w"),
            _seconds(history, ts_column).alias("ts"),
        )
        vec_table = m.all_item_vectors()[: m.n_items]
        item_idx = self.items.lookup(ev["item"])
        if new_items is not None and new_items.height:
            extra_ids = new_items["item_id"].cast(self.items.dtype, strict=False)
            extra_map = IdMap(extra_ids.filter(self.items.lookup(extra_ids).is_null()).unique(maintain_order=True))
            extra_idx = extra_map.lookup(ev["item"]) + m.n_items
            item_idx = item_idx.fill_null(extra_idx)
            rows = align(new_items.with_columns(extra_ids.alias("item_id")), extra_map.ids, "item_id")
            assert rows is not None
            vec_table = torch.cat([vec_table, torch.from_numpy(self.item_vectors(rows))])
        dropped = int(item_idx.null_count())
        if dropped:
            log.warning("two_tower encoder: %d history rows name items unknown to the model; ignored", dropped)
        pad = int(vec_table.shape[0])
        vec_table = torch.cat([vec_table, torch.zeros((1, vec_table.shape[1]))])
        ev = ev.with_columns(item_idx.alias("item_idx")).drop_nulls("item_idx")
        pairs = (
            ev.group_by("user", "item_idx")
            .agg(pl.col("w").sum().alias("conf"), pl.col("ts").filter(pl.col("w") > 0).min().alias("ts"))
            .filter(pl.col("conf") > 0)
        )
        user_ids = history[user_column].unique().sort()
        # history in the training layout: per user, sorted by (first time, item)
        pairs = pairs.with_columns(pl.col("ts").fill_null(0.0)).sort("user", "ts", "item_idx")
        umap = IdMap(user_ids)
        local = umap.lookup(pairs["user"]).to_numpy().astype(np.int64)
        indptr = np.zeros(len(umap) + 1, dtype=np.int64)
        np.cumsum(np.bincount(local, minlength=len(umap)), out=indptr[1:])
        conf = pairs["conf"].to_numpy()
        weight = (np.log1p(conf) if self.history.confidence else np.ones_like(conf)).astype(np.float32)
        items, weights = gather_history(
            pairs["item_idx"].to_numpy().astype(np.int64), pairs["ts"].to_numpy(), weight, indptr[:-1], indptr[1:],
            self.history, pad,
        )  # fmt: skip
        known_users = self.users.lookup(user_ids)
        uidx = known_users.fill_null(m.n_users).to_numpy().astype(np.int64)
        hist = m.user_tower.read_history(vec_table, torch.from_numpy(items), torch.from_numpy(weights))
        codes, values = self._user_tabular(user_ids, uidx, user_features)
        u = m.user_tower(torch.from_numpy(uidx), hist, codes, values)
        return user_ids, (u.float() * self.scale).numpy()

    def _user_tabular(
        self, user_ids: pl.Series, uidx: np.ndarray, frame: pl.DataFrame | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        if frame is None:
            idx = torch.from_numpy(uidx)
            return m.user_codes[idx], m.user_values[idx]
        rows = align(frame, user_ids, "user_id")
        codes, values = self.user_spec.encode(rows, user_ids.len())
        return torch.from_numpy(codes), torch.from_numpy(values)

    # ------------------------------------------------------------------------------------------------
    # Persistence

    def save(self, folder: str | Path) -> Path:
        """Write the encoder to ``folder`` (see the module docstring); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        m = self.module
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            torch.save({k: v.detach().cpu() for k, v in m.state_dict().items()}, tmp)
        meta = {
            "config": self.cfg.model_dump(mode="json"),
            "n_users": m.n_users,
            "n_items": m.n_items,
            "shapes": {k: list(v.shape) for k, v in m.state_dict().items() if k.startswith(("item_", "user_"))},
            "item_spec": self.content.item_spec.to_dict(),
            "user_spec": self.user_spec.to_dict(),
            "text_column": self.content.text_column,
            "sentence_dim": self.content.sentence_dim,
            "history": self.history.to_dict(),
            "hash_version": HASH_VERSION,
        }
        write_json_atomic(meta, folder / META_FILE)
        self.users.save(folder / "user_map.parquet")
        self.items.save(folder / "item_map.parquet")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TwoTowerEncoder:
        """Inverse of ``save`` (CPU, eval mode)."""
        folder = Path(folder)
        meta: dict[str, Any] = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("hash_version") != HASH_VERSION:
            raise ValueError(
                f"two-tower encoder in '{folder}' used text hashing {meta.get('hash_version')!r}, this version uses "
                f"{HASH_VERSION!r}; retrain the model with this recsys-embed version"
            )
        cfg = TwoTowerConfig.model_validate(meta["config"])
        shapes = meta["shapes"]
        item_spec, user_spec = TabularSpec.from_dict(meta["item_spec"]), TabularSpec.from_dict(meta["user_spec"])
        n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
        items = FeatureTables.empty(
            n_items, shapes["item_tokens"][1], shapes["item_codes"][1], shapes["item_values"][1],
            shapes["item_sentence"][1], cfg.text_buckets,
        )  # fmt: skip
        users = FeatureTables.empty(n_users, 0, shapes["user_codes"][1], shapes["user_values"][1])
        module = TwoTowerModule(
            cfg, n_users, n_items, np.ones(n_items, dtype=np.int64), items, users,
            item_spec.cardinalities, user_spec.cardinalities,
        )  # fmt: skip
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        h = meta["history"]
        history = HistoryConfig(int(h["length"]), h["half_life_days"], bool(h["confidence"]))
        content = ItemContent(meta["text_column"], item_spec, int(meta.get("sentence_dim", 0)))
        return cls(
            module, IdMap.load(folder / "user_map.parquet"), IdMap.load(folder / "item_map.parquet"), content,
            user_spec, history,
        )  # fmt: skip


def warm_start_module(
    module: TwoTowerModule,
    folder: str | Path,
    users: IdMap,
    items: IdMap,
    item_spec: TabularSpec,
    user_spec: TabularSpec,
) -> dict[str, Any]:
    """Initialise ``module``'s trainable weights from a saved encoder (an earlier run's ``save``), in place.

    - ID embedding tables (``item_tower.ids``, ``user_tower.ids``) are matched row by row through the ID maps:
      an ID the earlier run knew starts from its old row (wherever it sits now), a new ID keeps its fresh init,
      and the "unknown" row is carried over. Categorical tables are matched the same way by vocabulary value.
    - Every other trainable tensor (MLPs, text-token table, numeric maps) is copied when its shape is unchanged
      and the text hashing is the same version; otherwise it keeps its fresh init.
    - Buffers (feature tables, log-Q counts) and frozen parameters (a fixed temperature) are never copied:
      they describe this run's data and config.

    Returns:
        ``info`` entries: ``warm_start`` (True when at least one tensor was copied), ``warm_start_tensors``
        (copied / total), ``warm_start_users`` / ``warm_start_items`` (ID rows reused), and
        ``warm_start_skipped`` (why, when nothing or not everything could be used).
    """
    folder = Path(folder)
    meta: dict[str, Any] = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    state: dict[str, torch.Tensor] = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    same_hash = meta.get("hash_version") == HASH_VERSION
    old_item_spec, old_user_spec = TabularSpec.from_dict(meta["item_spec"]), TabularSpec.from_dict(meta["user_spec"])
    # rows of each table: (new IDs, old IDs, leading special rows, trailing special rows)
    id_rows: dict[str, tuple[pl.Series, pl.Series, int, int]] = {
        "item_tower.ids.weight": (items.ids, IdMap.load(folder / "item_map.parquet").ids, 0, 1),
        "user_tower.ids.weight": (users.ids, IdMap.load(folder / "user_map.parquet").ids, 0, 1),
    }
    source = {k: v for k, v in state.items() if ".tab.cat." not in k}  # old tensor of each new parameter
    towers = (("item_tower", item_spec, old_item_spec), ("user_tower", user_spec, old_user_spec))
    for tower, new_spec, old_spec in towers:
        old_cols = list(old_spec.categorical)
        for j, (col, vocab) in enumerate(new_spec.categorical.items()):
            old_key = f"{tower}.tab.cat.{old_cols.index(col)}.weight" if col in old_cols else ""
            if old_key in state:  # the same column, wherever it sat before
                key = f"{tower}.tab.cat.{j}.weight"
                source[key] = state[old_key]
                old_vocab = old_spec.categorical[col]
                id_rows[key] = (pl.Series(vocab, dtype=pl.String), pl.Series(old_vocab, dtype=pl.String), 1, 0)
    copied, skipped, reused = 0, [], {"users": 0, "items": 0}
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in params:
            old = source.get(name)
            if old is None or old.ndim != p.ndim or old.shape[1:] != p.shape[1:]:
                skipped.append(name)
                continue
            if name in id_rows:
                new_ids, old_ids, lead, trail = id_rows[name]
                if old.shape[0] != len(old_ids) + lead + trail:
                    skipped.append(name)
                    continue
                pos = IdMap(new_ids).lookup(old_ids.cast(new_ids.dtype, strict=False))
                hit = pos.is_not_null().to_numpy()
                new_rows = torch.from_numpy(pos.to_numpy()[hit].astype(np.int64) + lead)
                old_rows = torch.from_numpy(np.flatnonzero(hit).astype(np.int64) + lead)
                p[new_rows] = old[old_rows].to(p.dtype)
                for k in range(lead):  # leading special rows (categorical "unknown" = row 0)
                    p[k] = old[k].to(p.dtype)
                for k in range(1, trail + 1):  # trailing special rows (the ID tables' "unknown" = last row)
                    p[-k] = old[-k].to(p.dtype)
                if name.startswith("user_tower.ids"):
                    reused["users"] = int(hit.sum())
                elif name.startswith("item_tower.ids"):
                    reused["items"] = int(hit.sum())
            elif old.shape != p.shape or (name.startswith("item_tower.text") and not same_hash):
                skipped.append(name)
                continue
            else:
                p.copy_(old.to(p.dtype))
            copied += 1
    info: dict[str, Any] = {
        "warm_start": copied > 0,
        "warm_start_tensors": f"{copied}/{len(params)}",
        "warm_start_users": reused["users"],
        "warm_start_items": reused["items"],
    }
    if skipped:
        info["warm_start_skipped"] = f"kept a fresh init for {', '.join(skipped)} (new, or its shape changed)"
    log.info("two_tower: warm start from %s: %d of %d weight tensors copied, %d users and %d items keep their "
             "ID rows%s", folder, copied, len(params), reused["users"], reused["items"],
             f"; fresh: {', '.join(skipped)}" if skipped else "")  # fmt: skip
    return info


def _seconds(frame: pl.DataFrame, column: str | None) -> pl.Expr:
    """``column`` as float seconds (datetimes via epoch microseconds); 0 when absent."""
    if column is None or column not in frame.columns:
        return pl.lit(0.0)
    if frame.schema[column].is_temporal():
        return pl.col(column).dt.epoch("us").cast(pl.Float64) / 1e6
    return pl.col(column).cast(pl.Float64)
