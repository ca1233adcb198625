"""The pipeline's stages as file-in/file-out functions that return small JSON-able records.

Each stage reads its inputs from paths, writes its outputs atomically, and returns a record of paths
and small numbers. ``flows/`` wraps each one in a Prefect task; the CLI and tests can call them
directly. Heavy data never travels between stages in memory (a known Prefect memory trap).

Layout under ``<output_root>/<name>/``::

    cache/ingest-<key>/      events, quarantine, item texts, record.json (reused when log + config unchanged)
    runs/<run>/split/        train matrix, ID maps, validation/test targets, record.json
    runs/<run>/models/<m>/   embeddings (Parquet) + meta
    runs/<run>/exports/<m>/  topk/ and similar_items/ tables (committed with _SUCCESS)
    runs/<run>/summary.json  the run manifest
    latest.json              the last successful run (for ``recommend`` / ``similar``)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_embed.config import (
    DatabaseExportConfig,
    EvalConfig,
    ExportConfig,
    IngestConfig,
    ModelsConfig,
    SplitConfig,
)
from recsys_embed.io import is_complete_table, staged_table, write_json_atomic, write_parquet_atomic
from recsys_embed.models import OnMetrics, train_model
from recsys_embed.store import load_csr, load_embeddings, save_csr, save_embeddings
from recsys_embed.types import IdMap, Interactions, RowReport

log = logging.getLogger(__name__)

Record = dict[str, Any]


def ingest_cache_key(fingerprint: str, cfg: IngestConfig) -> str:
    """Cache key of an ingest: the data fingerprint plus the ingest config (anything else changes nothing)."""
    blob = json.dumps({"data": fingerprint, "ingest": cfg.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def input_fingerprint(cfg: IngestConfig) -> str:
    from recsys_embed.sources import fingerprint, resolve_files

    return fingerprint(resolve_files(cfg.source))


def run_ingest(cfg: IngestConfig, cache_root: Path) -> Record:
    """Read, validate, dedup and rule-filter the log; persist clean events + quarantine under the cache.

    An unchanged log with an unchanged ingest config is read back from the cache instead of re-ingested.
    """
    from recsys_embed.ingest import load_events, write_quarantine

    key = ingest_cache_key(input_fingerprint(cfg), cfg)
    folder = Path(cache_root) / f"ingest-{key}"
    if is_complete_table(folder):
        record: Record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
        record["cached"] = True
        log.info("ingest: log and config unchanged, reusing %s", folder)
        return record
    t0 = time.perf_counter()
    ev = load_events(cfg)
    with staged_table(folder) as stage:
        write_parquet_atomic(ev.events, stage / "events.parquet")
        write_quarantine(ev.quarantine, stage / "quarantine.parquet")
        if ev.item_text is not None:
            write_parquet_atomic(ev.item_text, stage / "item_text.parquet")
        record = {
            "key": key,
            "folder": str(folder),
            "events": str(folder / "events.parquet"),
            "quarantine": str(folder / "quarantine.parquet"),
            "item_text": str(folder / "item_text.parquet") if ev.item_text is not None else None,
            "files": ev.files,
            "fingerprint": ev.fingerprint,
            "report": ev.report.to_dict(),
            "quarantine_summary": _quarantine_summary(ev.quarantine),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json_atomic(record, stage / "record.json")
    record["cached"] = False
    return record


def _quarantine_summary(q: pl.DataFrame) -> list[dict[str, Any]]:
    if q.height == 0 or "reason" not in q.columns:
        return []
    counts = q.group_by("reason").len().sort("len", descending=True)
    return [{"reason": r, "rows": int(n)} for r, n in counts.iter_rows()]


def run_split(ingest: Record, ingest_cfg: IngestConfig, cfg: SplitConfig, out_dir: Path) -> Record:
    """Split clean events, build the train ``Interactions`` from the fit part only, and the targets.

    Everything fitted (ID maps, k-core, confidence, time decay) sees only events before the cutoff.
    """
    from recsys_embed.interactions import build_interactions, load_id_maps, save_id_maps
    from recsys_embed.split import build_targets, split_events

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    events = pl.read_parquet(ingest["events"])
    report = RowReport.from_dict(ingest["report"])
    parts = split_events(events, cfg)
    previous = load_id_maps(ingest_cfg.id_maps_from) if ingest_cfg.id_maps_from else None
    train = build_interactions(parts.fit, ingest_cfg, report, previous=previous)
    save_csr(train.matrix, out_dir / "train.npz")
    write_parquet_atomic(train.events, out_dir / "train_events.parquet")
    save_id_maps(train.users, train.items, out_dir)
    record: Record = {"split": parts.info, "n_users": train.shape[0], "n_items": train.shape[1]}
    for label, frame in (("val", parts.val), ("test", parts.test)):
        if frame.height == 0:
            record[f"{label}_targets"] = None
            continue
        targets = build_targets(frame, train, report, label)
        save_csr(targets.matrix, out_dir / f"{label}_targets.npz")
        write_parquet_atomic(targets.cold_users.to_frame("user_id"), out_dir / f"{label}_cold_users.parquet")
        record[f"{label}_targets"] = str(out_dir / f"{label}_targets.npz")
        record[f"{label}_counts"] = targets.counts
        record[f"{label}_warm_users"] = targets.n_warm_users
        record[f"{label}_cold_users"] = int(targets.cold_users.len())
    report.details.update(users=train.shape[0], items=train.shape[1], nnz=int(train.matrix.nnz), density=train.density)
    report.check()
    record.update(
        train=str(out_dir / "train.npz"),
        train_events=str(out_dir / "train_events.parquet"),
        item_text=ingest.get("item_text"),
        user_map=str(out_dir / "user_map.parquet"),
        item_map=str(out_dir / "item_map.parquet"),
        report=report.to_dict(),
    )
    write_json_atomic(record, out_dir / "record.json")
    return record


def load_train(split: Record, with_events: bool = False) -> Interactions:
    """The train ``Interactions`` of a split record; the event table (user_idx, item_idx, ts, weight) is
    read only when asked for (models that weigh history by recency need it)."""
    matrix = load_csr(split["train"])
    users = IdMap.load(split["user_map"])
    items = IdMap.load(split["item_map"])
    events = pl.read_parquet(split["train_events"]) if with_events else pl.DataFrame()
    return Interactions(matrix, users, items, RowReport.from_dict(split["report"]), events)


def run_train(
    name: str,
    split: Record,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    out_dir: Path,
    on_metrics: OnMetrics | None = None,
    lightning_logger: Any | None = None,
) -> Record:
    """Train one model on the split's train matrix; validation targets drive best-iteration selection.

    ``lightning_logger`` (e.g. ``tracking.lightning_logger``) is handed to Lightning-trained models only.
    """
    needs_history = name == "two_tower"
    train = load_train(split, with_events=needs_history)
    val = load_csr(split["val_targets"]) if split.get("val_targets") else None
    item_text = pl.read_parquet(split["item_text"]) if needs_history and split.get("item_text") else None
    if needs_history and models_cfg.two_tower.artifact_dir is None:
        # keep the encoder (weights + feature tables) beside the run's embeddings, not in a temp folder
        tt = models_cfg.two_tower.model_copy(update={"artifact_dir": str(Path(out_dir) / f"{name}_encoder")})
        models_cfg = models_cfg.model_copy(update={"two_tower": tt})
    t0 = time.perf_counter()
    emb = train_model(name, train, models_cfg, eval_cfg, val, on_metrics, item_text, lightning_logger)
    seconds = time.perf_counter() - t0
    folder = save_embeddings(emb, Path(out_dir) / name)
    info = {k: v for k, v in emb.info.items() if k != "history"}
    return {
        "model": name,
        "embeddings": str(folder),
        "train_seconds": round(seconds, 3),
        "info": info,
        "history": emb.info.get("history", []),
    }


def run_evaluate(model: Record, split: Record, cfg: EvalConfig) -> dict[str, float]:
    """Test metrics of one model (warm users; train-seen items excluded)."""
    from recsys_embed.evaluate import evaluate

    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    targets = load_csr(split["test_targets"])
    popularity = np.asarray((seen > 0).sum(axis=0)).ravel()
    return evaluate(emb, seen, targets, cfg.ks, popularity, cfg.batch_users)


def run_export(model: Record, split: Record, cfg: ExportConfig, out_dir: Path, run_id: str) -> Record:
    """Top-k for every train user and similar items, as committed Parquet tables."""
    from recsys_embed.export import export_similar_items, export_topk

    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    folder = Path(out_dir) / model["model"]
    topk = export_topk(emb, seen, cfg, folder, run_id)
    record: Record = {"model": model["model"], "topk": topk.path, "topk_rows": topk.rows, "topk_users": topk.users}
    if emb.dim > 1:  # popularity has no meaningful item-item similarity
        sim = export_similar_items(emb, cfg, folder, run_id)
        record.update(similar_items=sim.path, similar_rows=sim.rows)
    return record


def run_db_export(
    export: Record, cfg: DatabaseExportConfig, root: Path, run_id: str, model_version: str | None
) -> Record:
    """Copy one model's committed top-k (and similar-items) tables into the configured database.

    The URI comes from ``$<cfg.uri_env>``, else ``cfg.uri``, else SQLite ``<root>/recommendations.db``. The
    returned record holds the URI redacted, never the secret.
    """
    import os

    from recsys_embed.dbexport import export_table, redact, resolve_uri
    from recsys_embed.errors import ConfigError

    uri = cfg.uri
    if cfg.uri_env:
        uri = os.environ.get(cfg.uri_env) or None
        if uri is None:
            raise ConfigError(
                f"export.database.uri_env names ${cfg.uri_env}, which is unset or empty; export it "
                "(e.g. postgresql://user:password@host:5432/db) or set export.database.uri"
            )
    uri = resolve_uri(uri or f"sqlite:///{(Path(root) / 'recommendations.db').resolve().as_posix()}")
    record: Record = {"uri": redact(uri), "model": export["model"], "model_version": model_version, "tables": {}}
    res = export_table(export["topk"], uri, cfg.topk_table, model_version, cfg.batch_rows, ("user_id", "rank"))
    record["tables"][cfg.topk_table] = res.rows
    if export.get("similar_items"):
        res = export_table(export["similar_items"], uri, cfg.similar_table, model_version, cfg.batch_rows,
                           ("item_id", "rank"))  # fmt: skip
        record["tables"][cfg.similar_table] = res.rows
    record["run_id"] = run_id
    return record
