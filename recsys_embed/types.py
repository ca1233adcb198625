"""The contracts every stage speaks: ``IdMap``, ``RowReport``, ``Interactions`` and ``Embeddings``.

- ``Interactions``: CSR (users x items, float32 confidence) + ID maps + row report + event table.
- ``Embeddings``: user vectors, item vectors, ID maps, model name, scoring rule. Evaluation and export
  accept any ``Embeddings`` and always map back to the original IDs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_embed.errors import AccountingError

INDEX_DTYPE = pl.Int64
"""Contiguous indices are stored as Int64 in Parquet and frames (cheap, and never overflows)."""


@dataclass(frozen=True)
class IdMap:
    """Original ID <-> contiguous index. ``ids[i]`` is the original ID of index ``i`` (original dtype)."""

    ids: pl.Series

    def __len__(self) -> int:
        return self.ids.len()

    @property
    def dtype(self) -> pl.DataType:
        return self.ids.dtype

    @classmethod
    def from_ids(cls, ids: pl.Series, previous: IdMap | None = None) -> IdMap:
        """Build a map from IDs (any order, duplicates allowed). New IDs are appended after ``previous``'s,
        in sorted order so that the result does not depend on row order; existing indices never change."""
        uniq = ids.drop_nulls().unique().sort()
        if previous is None:
            return cls(uniq.rename("id"))
        prev = previous.ids
        if uniq.dtype != prev.dtype:
            uniq = uniq.cast(prev.dtype)
        new = uniq.filter(~uniq.is_in(prev.implode()))
        return cls(pl.concat([prev, new.rename(prev.name)]).rename("id"))

    def to_frame(self) -> pl.DataFrame:
        return pl.DataFrame({"index": np.arange(len(self), dtype=np.int64), "id": self.ids})

    def lookup(self, ids: pl.Series) -> pl.Series:
        """Indices for ``ids`` (null where unknown), in the order given."""
        frame = self.to_frame()
        probe = pl.DataFrame({"id": ids.cast(self.dtype, strict=False)}).with_row_index("_pos")
        out = probe.join(frame, on="id", how="left").sort("_pos")
        return out["index"]

    def decode(self, index: np.ndarray) -> pl.Series:
        """Original IDs for an integer index array."""
        return self.ids.gather(np.asarray(index, dtype=np.int64))

    def save(self, path: str | Path) -> None:
        from recsys_embed.io import write_parquet_atomic

        write_parquet_atomic(self.to_frame(), path)

    @classmethod
    def load(cls, path: str | Path) -> IdMap:
        frame = pl.read_parquet(path).sort("index")
        if not np.array_equal(frame["index"].to_numpy(), np.arange(frame.height)):
            raise ValueError(f"ID map '{path}' is not contiguous 0..n-1; it was not written by recsys-embed")
        return cls(frame["id"])


@dataclass
class RowReport:
    """Where every input row went. Invariant: ``rows_read == kept + duplicates + quarantined + filtered``.

    ``kept`` is the number of rows that contribute to an output (a train matrix entry, or an evaluation
    target). Rows that leave at a later stage move from ``kept`` into ``filtered``/``split`` buckets via
    ``move``, so the balance holds at every step.
    """

    rows_read: int = 0
    kept: int = 0
    duplicates: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    # Informational (not part of the balance): per-source row counts, matrix shape, split sizes.
    sources: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())

    @property
    def n_filtered(self) -> int:
        return sum(self.filtered.values())

    def is_balanced(self) -> bool:
        return self.rows_read == self.kept + self.duplicates + self.n_quarantined + self.n_filtered

    def check(self) -> RowReport:
        """Raise ``AccountingError`` unless every row is accounted for."""
        if not self.is_balanced():
            raise AccountingError(
                f"row accounting does not balance: read {self.rows_read:,} != kept {self.kept:,} + "
                f"duplicates {self.duplicates:,} + quarantined {self.n_quarantined:,} + filtered "
                f"{self.n_filtered:,}; this is a bug in recsys-embed, please report it with the input"
            )
        return self

    def filter_out(self, rule: str, n: int) -> None:
        """Move ``n`` kept rows to ``filtered[rule]``."""
        if n:
            self.kept -= n
            self.filtered[rule] += n

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "kept": self.kept,
            "duplicates": self.duplicates,
            "quarantined": dict(sorted(self.quarantined.items())),
            "quarantined_total": self.n_quarantined,
            "filtered": dict(sorted(self.filtered.items())),
            "filtered_total": self.n_filtered,
            "balanced": self.is_balanced(),
            "sources": self.sources,
            **self.details,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RowReport:
        """Inverse of ``to_dict`` (stages hand the report to each other as JSON)."""
        known = {"rows_read", "kept", "duplicates", "quarantined", "quarantined_total", "filtered",
                 "filtered_total", "balanced", "sources"}
        return cls(
            rows_read=int(d["rows_read"]),
            kept=int(d["kept"]),
            duplicates=int(d["duplicates"]),
            quarantined=Counter({k: int(v) for k, v in d.get("quarantined", {}).items()}),
            filtered=Counter({k: int(v) for k, v in d.get("filtered", {}).items()}),
            sources=dict(d.get("sources", {})),
            details={k: v for k, v in d.items() if k not in known},
        )

    def metrics(self, prefix: str = "rows") -> dict[str, float]:
        """Flat numeric view for MLflow (names are MLflow-legal)."""
        out: dict[str, float] = {
            f"{prefix}_read": self.rows_read,
            f"{prefix}_kept": self.kept,
            f"{prefix}_duplicates": self.duplicates,
            f"{prefix}_quarantined": self.n_quarantined,
            f"{prefix}_filtered": self.n_filtered,
        }
        for reason, n in self.quarantined.items():
            out[f"{prefix}_quarantined_{reason}"] = n
        for rule, n in self.filtered.items():
            out[f"{prefix}_filtered_{rule}"] = n
        for k, v in self.details.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{prefix}_{k}"] = v
        return out

    def format(self) -> str:
        """A human-readable multi-line summary (the CLI prints it)."""
        w = max(len(f"{self.rows_read:,}"), 9)
        lines = [
            f"  rows read      {self.rows_read:>{w},}",
            f"  kept           {self.kept:>{w},}",
            f"  duplicates     {self.duplicates:>{w},}",
            f"  quarantined    {self.n_quarantined:>{w},}",
        ]
        lines += [f"    {r:<26}{n:>{w},}" for r, n in sorted(self.quarantined.items())]
        lines.append(f"  filtered       {self.n_filtered:>{w},}")
        lines += [f"    {r:<26}{n:>{w},}" for r, n in sorted(self.filtered.items())]
        status = "balanced" if self.is_balanced() else "NOT BALANCED"
        lines.append(f"  accounting     {status}")
        for k, v in self.details.items():
            if isinstance(v, float):
                lines.append(f"  {k:<15}{v:>{w}.6f}")
            elif isinstance(v, int):
                lines.append(f"  {k:<15}{v:>{w},}")
        return "\n".join(lines)


@dataclass
class Interactions:
    """The model input.

    Attributes:
        matrix: CSR, shape (n_users, n_items), float32 confidence > 0, one entry per (user, item).
        users, items: ID maps; row ``u`` is ``users.ids[u]``, column ``i`` is ``items.ids[i]``.
        report: the row accounting up to this point.
        events: the event table behind the matrix, columns ``user_idx``, ``item_idx`` (Int64),
            ``ts`` (Datetime[us, UTC], null when the log has no time), ``weight`` (Float64, signed).
    """

    matrix: sp.csr_matrix
    users: IdMap
    items: IdMap
    report: RowReport
    events: pl.DataFrame

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.matrix.shape[0]), int(self.matrix.shape[1]))

    @property
    def density(self) -> float:
        n_u, n_i = self.shape
        return float(self.matrix.nnz) / float(max(n_u * n_i, 1))


Scoring = Literal["dot", "cosine"]


@dataclass
class Embeddings:
    """What every model returns; evaluation and export accept any ``Embeddings``.

    Attributes:
        user_vectors: float32, shape (n_users, d), row ``u`` for ``users.ids[u]``.
        item_vectors: float32, shape (n_items, d), row ``i`` for ``items.ids[i]``.
        users, items: the ID maps the vectors are indexed by (the train maps).
        model: a short name ("als", "bpr", "popularity", "two_tower", ...).
        scoring: "dot" scores ``user_vectors @ item_vectors.T``; "cosine" normalises both first.
        info: small facts about training (backend, best iteration, timings) for the manifest.
    """

    user_vectors: np.ndarray
    item_vectors: np.ndarray
    users: IdMap
    items: IdMap
    model: str
    scoring: Scoring = "dot"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.user_vectors = np.ascontiguousarray(self.user_vectors, dtype=np.float32)
        self.item_vectors = np.ascontiguousarray(self.item_vectors, dtype=np.float32)
        if self.user_vectors.ndim != 2 or self.item_vectors.ndim != 2:
            raise ValueError("user_vectors and item_vectors must be 2-D")
        if self.user_vectors.shape[1] != self.item_vectors.shape[1]:
            raise ValueError(
                f"{self.model}: user dim {self.user_vectors.shape[1]} != item dim {self.item_vectors.shape[1]}"
            )
        if self.user_vectors.shape[0] != len(self.users):
            raise ValueError(f"{self.model}: {self.user_vectors.shape[0]} user vectors for {len(self.users)} users")
        if self.item_vectors.shape[0] != len(self.items):
            raise ValueError(f"{self.model}: {self.item_vectors.shape[0]} item vectors for {len(self.items)} items")

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    def scoring_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(user, item) matrices whose dot product is the score (normalised for cosine)."""
        if self.scoring == "dot":
            return self.user_vectors, self.item_vectors

        def _norm(x: np.ndarray) -> np.ndarray:
            n = np.linalg.norm(x, axis=1, keepdims=True)
            return (x / np.maximum(n, 1e-12)).astype(np.float32)

        return _norm(self.user_vectors), _norm(self.item_vectors)


def check_trainable(train: Interactions, val_targets: sp.csr_matrix | None, name: str) -> None:
    """Raise ``ValueError`` (naming the model and the fix) if ``train`` is empty or ``val_targets`` is not
    indexed like it. Every model family checks its inputs with this."""
    if train.matrix.nnz == 0:
        raise ValueError(f"{name}: the train matrix {train.shape} has no interactions; check ingest and split")
    if val_targets is not None and val_targets.shape != train.shape:
        raise ValueError(
            f"{name}: val_targets shape {val_targets.shape} != train matrix shape {train.shape}; "
            "build the validation targets over the train ID maps"
        )


@dataclass(frozen=True)
class Candidate:
    """A run's best model as the registry sees it: what is shipped, how its recipe scored, what it was fitted on.

    Attributes:
        model: the model family ("als", "two_tower", ...).
        model_run_id: its nested MLflow run (the pyfunc is logged there).
        pipeline_run_id: the parent MLflow run of the pipeline run.
        embeddings: the saved ``Embeddings`` folder that is shipped (the production refit's served vectors).
        seen: the CSR (``.npz``) of items never recommended (the user's whole kept history).
        metrics: the recipe's held-out metrics from the evaluation fit: ``val_*`` (validation window, what
            selection and the champion decision read) and ``test_*`` (reported only).
        val_per_user: ``.npy`` of the primary metric per validation user (the paired champion comparison).
        recipe: hash of the model family and its config slice (hyperparameters, seeds, iteration budget; not the
            machine settings: ``shipping.recipe``).
        recipe_config: that config slice as JSON (a later run re-fits the recipe from it).
        run_key: hash of the data identity and the whole config: an identical run registers nothing.
        tags: version tags, read by the champion decision: ``pipeline``; the data identity
            (``shipping.data_identity``: ``data_fingerprint``, ``data_until``, ``data_window_start`` /
            ``data_window_end``, ``training_window_first`` / ``training_window_last`` (the last event decides
            "newer data"), ``training_rows``, ``training_fit``, ``data_identity``); where the metrics were measured
            (``shipping.evaluation_windows``: ``fit_window``, ``validation_window``, ``test_window``).
        fallback: optional ``.npy`` of one bool per user index: True where the user's rows come from the
            popularity fallback (the registered model answers them with ``source="fallback"``); None: none.
        popularity: optional ``.npy`` of one score per item index, the registered model's answer for users it
            does not know; None: distinct users per item in ``seen``.
    """

    model: str
    model_run_id: str
    pipeline_run_id: str
    embeddings: str
    seen: str
    metrics: dict[str, float]
    val_per_user: str | None = None
    recipe: str = ""
    recipe_config: str = ""
    run_key: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    fallback: str | None = None
    popularity: str | None = None
