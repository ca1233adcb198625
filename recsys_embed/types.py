"""The contracts every stage speaks: ``IdMap``, ``RowReport``, ``Interactions`` and ``Embeddings``.

- ``Interactions``: CSR (users x items, float32 confidence) + ID maps + row report + event table.
- ``Embeddings``: user vectors, item vectors, ID maps, model name, scoring rule. Evaluation and export
  accept any ``Embeddings`` and always map back to the original IDs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
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


# Where a ``filtered`` rule belongs. Ingest's own rules (item filters, the rating threshold, ``until``) are every
# rule not named here. Rows that leave later move out of ``kept`` too (``filter_out``), so the report balances at
# every step, but they are not ingest's: the CLI, the summary and MLflow show them apart.
MATRIX_RULES = ("cancelled_out", "kcore_user", "kcore_item")
"""Rules of ``data.interactions.build_interactions``: rows dropped while building a matrix from kept events."""
HELD_OUT_WINDOWS = ("val", "test")
HELD_OUT_BUCKETS = ("seen_in_train", "cold_user", "cold_item", "cancelled_out")
"""``data.split.build_targets``'s buckets (rules ``<window>_<bucket>``) of held-out rows that are not evaluation
targets; a target row stays in ``kept``. A test keeps these equal to ``split.TARGET_BUCKETS[1:]``."""
_WINDOW_NAMES = {"fit": "fit window", "val": "validation", "test": "test"}


def rule_stage(rule: str) -> Literal["ingest", "matrix", "held_out"]:
    """The stage a ``filtered`` rule comes from: ``ingest``, ``matrix`` (``MATRIX_RULES``) or ``held_out``
    (``<window>_<bucket>`` of ``HELD_OUT_WINDOWS`` x ``HELD_OUT_BUCKETS``)."""
    if rule in MATRIX_RULES:
        return "matrix"
    window, _, bucket = rule.partition("_")
    if window in HELD_OUT_WINDOWS and bucket in HELD_OUT_BUCKETS:
        return "held_out"
    return "ingest"


@dataclass
class RowReport:
    """Where every input row went. Invariant: ``rows_read == kept + duplicates + quarantined + filtered``.

    In memory ``kept`` counts the rows still in use at this point (after a split: train matrix entries and
    evaluation targets): a later stage moves the rows it drops or holds out from ``kept`` into ``filtered`` via
    ``filter_out``, so the balance holds at every step. What a person reads is ingest's balance, the same at every
    stage: ``ingest_kept`` (rows that passed ingest) with ``ingest_filtered``, and apart from it the rows of the
    kept that the matrix dropped (``matrix_dropped``) and that the split held out without making them evaluation
    targets (``held_out``). ``to_dict`` (the manifest's ``accounting``) and ``metrics`` speak that view;
    ``from_dict`` reads both it and the older in-memory form.
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

    def _stage(self, stage: str) -> Counter[str]:
        return Counter({r: n for r, n in self.filtered.items() if rule_stage(r) == stage})

    @property
    def ingest_filtered(self) -> Counter[str]:
        """Rows ingest's own rules removed (item filters, rating threshold, ``until``), by rule."""
        return self._stage("ingest")

    @property
    def matrix_dropped(self) -> Counter[str]:
        """Kept rows dropped while building the (train) matrix: ``cancelled_out``, ``kcore_user``, ``kcore_item``."""
        return self._stage("matrix")

    def held_out(self, window: str) -> Counter[str]:
        """Kept rows of held-out ``window`` ("val" / "test") that are not evaluation targets, by bucket."""
        prefix = window + "_"
        return Counter({r[len(prefix) :]: n for r, n in self._stage("held_out").items() if r.startswith(prefix)})

    @property
    def ingest_kept(self) -> int:
        """Rows that passed ingest (read - duplicates - quarantined - ingest's filters): the "kept" people read, the
        same before and after the matrix and the split."""
        return self.kept + self.n_filtered - sum(self.ingest_filtered.values())

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
        """The JSON form (ingest, split and the manifest's ``accounting``): ingest's balance
        (``rows_read == kept + duplicates + quarantined_total + filtered_total``, ``kept`` = ``ingest_kept``), then
        ``matrix_dropped``, ``held_out`` (window -> bucket -> rows) and ``in_use`` (``kept`` minus both)."""
        ingest = self.ingest_filtered
        return {
            "rows_read": self.rows_read,
            "kept": self.ingest_kept,
            "duplicates": self.duplicates,
            "quarantined": dict(sorted(self.quarantined.items())),
            "quarantined_total": self.n_quarantined,
            "filtered": dict(sorted(ingest.items())),
            "filtered_total": sum(ingest.values()),
            "balanced": self.is_balanced(),
            "matrix_dropped": dict(sorted(self.matrix_dropped.items())),
            "held_out": {w: dict(sorted(h.items())) for w in HELD_OUT_WINDOWS if (h := self.held_out(w))},
            "in_use": self.kept,
            "sources": self.sources,
            **self.details,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RowReport:
        """Inverse of ``to_dict`` (stages hand the report to each other as JSON); reads the older form too, where
        ``kept`` was the in-memory count and ``filtered`` held every rule."""
        known = {"rows_read", "kept", "duplicates", "quarantined", "quarantined_total", "filtered",
                 "filtered_total", "balanced", "sources", "matrix_dropped", "held_out", "in_use"}  # fmt: skip
        filtered = Counter({k: int(v) for k, v in d.get("filtered", {}).items()})
        kept = int(d["kept"])
        if "in_use" in d:  # to_dict's form: kept is ingest's; the later stages' rows are listed apart
            filtered.update({k: int(v) for k, v in d.get("matrix_dropped", {}).items()})
            for window, buckets in d.get("held_out", {}).items():
                filtered.update({f"{window}_{b}": int(v) for b, v in buckets.items()})
            kept = int(d["in_use"])
        return cls(
            rows_read=int(d["rows_read"]),
            kept=kept,
            duplicates=int(d["duplicates"]),
            quarantined=Counter({k: int(v) for k, v in d.get("quarantined", {}).items()}),
            filtered=+filtered,
            sources=dict(d.get("sources", {})),
            details={k: v for k, v in d.items() if k not in known},
        )

    def metrics(self, prefix: str = "rows") -> dict[str, float]:
        """Flat numeric view for MLflow (names are MLflow-legal): ingest's balance (``rows_kept`` = ``ingest_kept``),
        ``rows_dropped_<rule>`` by the matrix, ``rows_held_out_<window>_<bucket>``, ``rows_in_use``, details."""
        ingest = self.ingest_filtered
        out: dict[str, float] = {
            f"{prefix}_read": self.rows_read,
            f"{prefix}_kept": self.ingest_kept,
            f"{prefix}_duplicates": self.duplicates,
            f"{prefix}_quarantined": self.n_quarantined,
            f"{prefix}_filtered": sum(ingest.values()),
            f"{prefix}_in_use": self.kept,
        }
        for reason, n in self.quarantined.items():
            out[f"{prefix}_quarantined_{reason}"] = n
        for rule, n in ingest.items():
            out[f"{prefix}_filtered_{rule}"] = n
        for rule, n in self.matrix_dropped.items():
            out[f"{prefix}_dropped_{rule}"] = n
        for window in HELD_OUT_WINDOWS:
            for bucket, n in self.held_out(window).items():
                out[f"{prefix}_held_out_{window}_{bucket}"] = n
        for k, v in self.details.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{prefix}_{k}"] = v
        return out

    def windows(self, split_info: Mapping[str, Any] | None) -> dict[str, dict[str, int]] | None:
        """Each split window's kept rows and where they went, from the split's ``rows_fit`` / ``rows_val`` /
        ``rows_test`` (its ``info``, the manifest's ``split``); None without a split, or when those rows do not add
        up to ``ingest_kept`` (then ``format`` shows the stages without the windows).

        Returns ``{"fit": {"rows", "train", <matrix rule>...}, "val": {"rows", "target", <bucket>...}, "test":
        ...}``: ``train`` rows are in the train matrix, ``target`` rows are the window's evaluation targets."""
        info = split_info or {}
        rows: dict[str, int] = {}
        for w in ("fit", *HELD_OUT_WINDOWS):
            n = info.get(f"rows_{w}")
            if not isinstance(n, int) or isinstance(n, bool):
                return None
            rows[w] = n
        if sum(rows.values()) != self.ingest_kept:
            return None
        dropped = self.matrix_dropped
        out: dict[str, dict[str, int]] = {"fit": {"rows": rows["fit"], "train": rows["fit"] - sum(dropped.values()),
                                                  **dropped}}  # fmt: skip
        for w in HELD_OUT_WINDOWS:
            held = self.held_out(w)
            if rows[w]:
                out[w] = {"rows": rows[w], "target": rows[w] - sum(held.values()), **held}
        return out

    def format(self, split_info: Mapping[str, Any] | None = None) -> str:
        """A human-readable summary (the CLI prints it): ingest's balance, then what became of the kept rows (with
        ``split_info``, a table of the split's windows: train matrix rows, evaluation targets and the other held-out
        rows by bucket; without, the matrix's drops and the held-out rows), then the matrix's shape."""
        w = max(len(f"{self.rows_read:,}"), 9)

        def why(counts: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {n:,}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

        ingest = self.ingest_filtered
        status = "balanced" if self.is_balanced() else "NOT BALANCED (a bug: please report it)"
        lines = [
            f"  read         {self.rows_read:>{w},}",
            f"  duplicates   {self.duplicates:>{w},}",
            f"  quarantined  {self.n_quarantined:>{w},}   {why(self.quarantined)}".rstrip(),
            f"  filtered     {sum(ingest.values()):>{w},}   {why(ingest)}".rstrip(),
            f"  kept         {self.ingest_kept:>{w},}   {status}: read = kept + duplicates + quarantined + filtered",
        ]
        windows = self.windows(split_info)
        dropped, held = self.matrix_dropped, {h: self.held_out(h) for h in HELD_OUT_WINDOWS}
        if windows:  # one row per window: its rows, those in use (train matrix rows / targets), the rest by bucket
            buckets = [b for b in (*MATRIX_RULES, *HELD_OUT_BUCKETS) if any(p.get(b) for p in windows.values())]
            buckets = list(dict.fromkeys(buckets))  # cancelled_out is both a matrix rule and a held-out bucket
            head = ["rows", "train/target", *buckets]
            cw = [max(len(h), w) for h in head]
            lines.append("  of the kept  " + "  ".join(f"{h:>{c}}" for h, c in zip(head, cw, strict=True)))
            for name, part in windows.items():
                cells = [part["rows"], part["train"] if name == "fit" else part["target"], *(part.get(b, 0) for b in
                                                                                              buckets)]  # fmt: skip
                text = "  ".join(f"{n:>{c},}" if n else f"{'':>{c}}" for n, c in zip(cells, cw, strict=True))
                lines.append(f"    {_WINDOW_NAMES[name]:<11}{text}".rstrip())
        elif sum(dropped.values()) or any(held.values()):
            lines.append("  of the kept:")
            if sum(dropped.values()):
                lines.append(f"    dropped    {sum(dropped.values()):>{w},}   building the matrix: {why(dropped)}")
            for h, counts in held.items():
                if counts:
                    lines.append(f"    {_WINDOW_NAMES[h]:<11}{sum(counts.values()):>{w},}   held out, not targets: "
                                 f"{why(counts)}")  # fmt: skip
            lines.append(f"    in use     {self.kept:>{w},}   in the matrix" + (" or evaluation targets" if any(
                held.values()) else ""))  # fmt: skip
        d = self.details
        if "users" in d and "items" in d:
            shape = f"  matrix       {d['users']:,} users x {d['items']:,} items"
            if "nnz" in d:
                shape += f", {d['nnz']:,} pairs"
            if isinstance(d.get("density"), float):
                shape += f" (density {d['density']:.2%})"
            lines.append(shape)
        evals = [f"{_WINDOW_NAMES[h]} {d[f'{h}_target_pairs']:,} pairs of {d.get(f'{h}_warm_users', 0):,} warm users"
                 for h in HELD_OUT_WINDOWS if f"{h}_target_pairs" in d]  # fmt: skip
        if evals:
            lines.append("  targets      " + "; ".join(evals))
        shown = {"users", "items", "nnz", "density", "kcore_iterations"}
        shown |= {f"{h}_{k}" for h in HELD_OUT_WINDOWS for k in ("target_pairs", "warm_users", "cold_users")}
        other = [f"{k} {v:,}" for k, v in d.items()
                 if k not in shown and isinstance(v, int | float) and not isinstance(v, bool)]  # fmt: skip
        if other:
            lines.append("  also         " + ", ".join(other))
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
        item_text: optional ``item_text.parquet`` (``item_id``, ``text``): the registered model answers with each
            item's text (``item_texts``); None: IDs only.
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
    item_text: str | None = None
