"""The pipeline's stages as file-in/file-out functions that return small JSON-able records.

Each stage reads its inputs from paths, writes its outputs atomically, and returns a record of paths
and small numbers. ``flows/`` wraps each one in a Prefect task; the CLI and tests can call them
directly. Heavy data never travels between stages in memory (a known Prefect memory trap).

Layout under ``<output_root>/<name>/``::

    cache/ingest-<key>/         events, quarantine, item texts, record.json
    cache/split-<key>/          train matrix, ID maps, validation/test targets, record.json
    cache/train-<m>-<key>/      one model's embeddings (Parquet) + meta + record.json (+ artifacts/: encoder)
    runs/<run>/split/           the run's split: hard links to cache/split-<key>/ (record.json: its own paths)
    runs/<run>/models/<m>/      the run's model: hard links to cache/train-<m>-<key>/ (the two-tower encoder
                                goes to runs/<run>/models/two_tower_encoder/)
    runs/<run>/exports/<m>/     topk/ and similar_items/ tables (recomputed by every run)
    runs/<run>/summary.json     the run manifest, written last: a run folder without it did not finish
    latest.json                 the last successful run (for ``recommend`` / ``similar``)

Resume: every folder above is committed with ``io.staged_table`` (a hidden staging folder renamed into place
with ``_SUCCESS``), so a killed run leaves only hidden leftovers (``sweep_leftovers`` removes them) and
complete folders. The ``cache/`` folders are content-addressed: their key hashes everything that shapes
their content (``ingest_cache_key``, ``split_cache_key``, ``train_cache_key``; the config slices carry the
seeds), and a stage whose committed cache folder exists is read back instead of recomputed. So re-running a
killed (or finished) run with the same log and config recomputes only what had not been committed. This
check lives here, not in Prefect, so it holds for any caller. Cached files are shared by hard links:
treat everything under ``cache/`` and ``runs/`` as read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
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
    MlflowSettings,
    ModelsConfig,
    RegistryConfig,
    SplitConfig,
    TuningConfig,
)
from recsys_embed.faults import checkpoint
from recsys_embed.io import SUCCESS_MARKER, is_complete_table, staged_table, write_json_atomic, write_parquet_atomic
from recsys_embed.models import OnMetrics, train_model, warm_start_source
from recsys_embed.store import load_csr, load_embeddings, save_csr, save_embeddings
from recsys_embed.types import Candidate, Embeddings, IdMap, Interactions, RowReport

log = logging.getLogger(__name__)

Record = dict[str, Any]

# Part of every split/train cache key: bump it when what a cached folder holds changes shape.
CACHE_VERSION = 1
ARTIFACTS = "artifacts"  # a cached model's extra files (the two-tower encoder), beside its embeddings


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _files_digest(paths: list[Path]) -> str:
    """Content hash of files (folders: every file below them, by relative path) for cache keys."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    return h.hexdigest()[:16]


def _relocate(obj: Any, moves: list[tuple[str, str]]) -> Any:
    """``obj`` (a JSON-able record) with every path under a ``moves`` source rewritten to its destination."""
    if isinstance(obj, str):
        for src, dst in moves:
            if obj == src or obj.startswith(src + os.sep):
                return dst + obj[len(src) :]
        return obj
    if isinstance(obj, dict):
        return {k: _relocate(v, moves) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocate(v, moves) for v in obj]
    return obj


def _load_record(folder: Path) -> Record:
    """A committed cache folder's ``record.json``, its paths moved to where the folder is now."""
    record: Record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
    return dict(_relocate(record, [(record["folder"], str(folder))]))


def _link_copy(src: Path, dst: Path, moves: list[tuple[str, str]], skip: str | None = None) -> None:
    """Commit ``dst`` as a copy of the committed folder ``src`` (without its subfolder ``skip``).

    Files are hard links (no extra disk; fall back to a copy across file systems); a JSON file that holds a
    path under a ``moves`` source is rewritten (a new file, so the cached one is untouched) to point at the copy.
    """
    with staged_table(dst) as stage:
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = f.relative_to(src)
            if rel == Path(SUCCESS_MARKER) or (skip is not None and rel.parts[0] == skip):
                continue
            out = stage / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix == ".json":
                obj = json.loads(f.read_text(encoding="utf-8"))
                moved = _relocate(obj, moves)
                if moved != obj:
                    write_json_atomic(moved, out)
                    continue
            try:
                os.link(f, out)
            except OSError:
                shutil.copy2(f, out)


# Hidden names ``io`` gives what it has not committed yet: ``.<name>.staging-<8 hex>`` (a table being
# written), ``.<name>.old-<8 hex>`` (the table it replaces), ``.<name>.tmp-<8 hex>`` (a file being written).
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>staging|old|tmp)-[0-9a-f]{8}$")


def sweep_leftovers(root: Path) -> list[str]:
    """Remove what killed writers left below ``root``: staging folders, temporary files, replaced tables.

    Only call it while holding the output folder's run lock (``lock.run_lock``): then nothing is being written
    there. A replaced table whose successor never landed (killed between ``staged_table``'s two renames) is
    put back instead of removed. Returns the paths removed or restored; readers never saw any of them as a
    committed table (hidden names, no ``_SUCCESS``).
    """
    root = Path(root)
    done: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            m = _LEFTOVER.match(name)
            if not m:
                continue
            path = Path(dirpath) / name
            target = path.with_name(m["target"])
            if m["kind"] == "old" and not target.exists():
                os.replace(path, target)
                done.append(f"{path} -> {target} (restored)")
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                done.append(str(path))
            else:
                path.unlink(missing_ok=True)
                done.append(str(path))
            if name in dirnames:
                dirnames.remove(name)  # gone or restored: do not walk into it
    if done:
        log.warning("removed %d leftover(s) of a killed run below %s: %s", len(done), root, "; ".join(done))
    return done


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
        checkpoint("ingest")  # everything written, nothing committed yet
    record["cached"] = False
    return record


def _quarantine_summary(q: pl.DataFrame) -> list[dict[str, Any]]:
    if q.height == 0 or "reason" not in q.columns:
        return []
    counts = q.group_by("reason").len().sort("len", descending=True)
    return [{"reason": r, "rows": int(n)} for r, n in counts.iter_rows()]


def split_cache_key(ingest: Record, ingest_cfg: IngestConfig, cfg: SplitConfig) -> str:
    """Cache key of a split: the ingest's key (log fingerprint + ingest config), the ingest config it is built
    with (k-core, confidence, ID-map settings), the split config (``cfg.seed`` included), and the content of
    ``ingest_cfg.id_maps_from`` when set. An incremental ingest's key names its run, so its split is never reused.
    """
    maps = None
    if ingest_cfg.id_maps_from:
        from recsys_embed.interactions import ITEM_MAP_FILE, USER_MAP_FILE

        folder = Path(ingest_cfg.id_maps_from)
        maps = _files_digest([folder / USER_MAP_FILE, folder / ITEM_MAP_FILE])
    return _hash({"v": CACHE_VERSION, "stage": "split", "ingest": ingest["key"],
                  "ingest_cfg": ingest_cfg.model_dump(mode="json"), "split": cfg.model_dump(mode="json"),
                  "id_maps": maps})  # fmt: skip


def run_split(
    ingest: Record, ingest_cfg: IngestConfig, cfg: SplitConfig, out_dir: Path, cache_root: Path | None = None
) -> Record:
    """Split clean events, build the train ``Interactions`` from the fit part only, and the targets.

    Everything fitted (ID maps, k-core, confidence, time decay) sees only events before the cutoff. The split is
    committed as the table folder ``out_dir``. With ``cache_root`` it is computed once into
    ``<cache_root>/split-<split_cache_key>/`` and ``out_dir`` is a hard-linked copy; an unchanged ingest and split
    config reuse the cached folder (``record["cached"]``).
    """
    out_dir = Path(out_dir)
    if cache_root is None:
        record = _split_into(out_dir, None, ingest, ingest_cfg, cfg)
        record["cached"] = False
        return record
    key = split_cache_key(ingest, ingest_cfg, cfg)
    folder = Path(cache_root) / f"split-{key}"
    cached = is_complete_table(folder)
    if cached:
        log.info("split: events and split config unchanged, reusing %s", folder)
        record = _load_record(folder)
    else:
        record = _split_into(folder, key, ingest, ingest_cfg, cfg)
    moves = [(str(folder), str(out_dir))]
    _link_copy(folder, out_dir, moves)
    record = _relocate(record, moves)
    record["cached"] = cached
    return record


def _split_into(folder: Path, key: str | None, ingest: Record, ingest_cfg: IngestConfig, cfg: SplitConfig) -> Record:
    """Compute the split and commit it as the table folder ``folder``; its record (paths under ``folder``)."""
    from recsys_embed.interactions import build_interactions, load_id_maps, save_id_maps
    from recsys_embed.split import build_targets, split_events

    events = pl.read_parquet(ingest["events"])
    report = RowReport.from_dict(ingest["report"])
    parts = split_events(events, cfg)
    previous = load_id_maps(ingest_cfg.id_maps_from) if ingest_cfg.id_maps_from else None
    train = build_interactions(parts.fit, ingest_cfg, report, previous=previous)
    with staged_table(folder) as stage:
        save_csr(train.matrix, stage / "train.npz")
        checkpoint("split")  # mid-split: the train matrix is written, maps and targets are not
        write_parquet_atomic(train.events, stage / "train_events.parquet")
        save_id_maps(train.users, train.items, stage)
        record: Record = {"split": parts.info, "n_users": train.shape[0], "n_items": train.shape[1]}
        for label, frame in (("val", parts.val), ("test", parts.test)):
            if frame.height == 0:
                record[f"{label}_targets"] = None
                continue
            targets = build_targets(frame, train, report, label)
            save_csr(targets.matrix, stage / f"{label}_targets.npz")
            write_parquet_atomic(targets.cold_users.to_frame("user_id"), stage / f"{label}_cold_users.parquet")
            record[f"{label}_targets"] = str(folder / f"{label}_targets.npz")
            record[f"{label}_counts"] = targets.counts
            record[f"{label}_warm_users"] = targets.n_warm_users
            record[f"{label}_cold_users"] = int(targets.cold_users.len())
        report.details.update(users=train.shape[0], items=train.shape[1], nnz=int(train.matrix.nnz),
                              density=train.density)  # fmt: skip
        report.check()
        record.update(
            key=key,
            folder=str(folder),
            train=str(folder / "train.npz"),
            train_events=str(folder / "train_events.parquet"),
            item_text=ingest.get("item_text"),
            user_map=str(folder / "user_map.parquet"),
            item_map=str(folder / "item_map.parquet"),
            report=report.to_dict(),
        )
        write_json_atomic(record, stage / "record.json")
    return record


def load_train(split: Record, with_events: bool = False) -> Interactions:
    """The train ``Interactions`` of a split record; the event table (user_idx, item_idx, ts, weight) is
    read only when asked for (models that weigh history by recency need it)."""
    matrix = load_csr(split["train"])
    users = IdMap.load(split["user_map"])
    items = IdMap.load(split["item_map"])
    events = pl.read_parquet(split["train_events"]) if with_events else pl.DataFrame()
    return Interactions(matrix, users, items, RowReport.from_dict(split["report"]), events)


def train_cache_key(
    name: str, split: Record, models_cfg: ModelsConfig, eval_cfg: EvalConfig, warm_start: Path | None = None
) -> str:
    """Cache key of one model's training: the split's key, the model's config slice (its ``seed`` included),
    what the trainer reads of the eval config (``ks``, ``primary_metric``: best-iteration selection), and the
    content of the warm-start source when there is one."""
    return _hash({"v": CACHE_VERSION, "stage": "train", "model": name, "split": split["key"],
                  "config": getattr(models_cfg, name).model_dump(mode="json"),
                  "eval": {"ks": eval_cfg.ks, "primary_metric": eval_cfg.primary_metric},
                  "warm_start": _files_digest([warm_start]) if warm_start is not None else None})  # fmt: skip


def run_train(
    name: str,
    split: Record,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    out_dir: Path,
    on_metrics: OnMetrics | None = None,
    lightning_logger: Any | None = None,
    warm_start_from: str | None = None,
    cache_root: Path | None = None,
) -> Record:
    """Train one model on the split's train matrix; validation targets drive best-iteration selection.

    The embeddings are committed as the table folder ``out_dir/<name>`` (the two-tower encoder as
    ``out_dir/two_tower_encoder``). With ``cache_root`` (and a cached split, whose record has a ``key``) the model
    is trained once into ``<cache_root>/train-<name>-<train_cache_key>/`` and ``out_dir/<name>`` is a hard-linked
    copy; an unchanged split and config slice reuse it (``record["cached"]``), replaying the training history
    into ``on_metrics``.

    ``lightning_logger`` (e.g. ``tracking.lightning_logger``) is handed to Lightning-trained models only; pass a
    zero-argument function to create it only when the model is actually trained.
    ``warm_start_from``: an earlier run's models folder (its ``out_dir``) to warm-start from (``models.train_model``).
    """
    target = Path(out_dir) / name
    encoder_dir = Path(out_dir) / f"{name}_encoder"
    if cache_root is None or not split.get("key"):
        record = _train_into(target, None, name, split, models_cfg, eval_cfg, on_metrics, lightning_logger,
                             warm_start_from, encoder_dir)  # fmt: skip
        record["cached"] = False
        return record
    source = warm_start_source(name, warm_start_from) if models_cfg.warm_start else None
    key = train_cache_key(name, split, models_cfg, eval_cfg, source)
    folder = Path(cache_root) / f"train-{name}-{key}"
    cached = is_complete_table(folder)
    if cached:
        log.info("train %s: split and config unchanged, reusing %s", name, folder)
        record = _load_record(folder)
        if on_metrics is not None:
            _replay_history(record.get("history", []), on_metrics)
    else:
        record = _train_into(folder, key, name, split, models_cfg, eval_cfg, on_metrics, lightning_logger,
                             warm_start_from, None)  # fmt: skip
    moves = [(str(folder / ARTIFACTS), str(encoder_dir)), (str(folder), str(target))]
    if (folder / ARTIFACTS).is_dir():
        _link_copy(folder / ARTIFACTS, encoder_dir, moves)
    _link_copy(folder, target, moves, skip=ARTIFACTS)
    record = _relocate(record, moves)
    record["cached"] = cached
    return record


def _train_into(
    folder: Path,
    key: str | None,
    name: str,
    split: Record,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    on_metrics: OnMetrics | None,
    lightning_logger: Any | None,
    warm_start_from: str | None,
    encoder_dir: Path | None,
) -> Record:
    """Train and commit the embeddings as the table folder ``folder``; the two-tower encoder goes to
    ``encoder_dir`` (None: ``folder/artifacts``, committed with it). Returns the record (paths under ``folder``)."""
    needs_history = name == "two_tower"
    train = load_train(split, with_events=needs_history)
    val = load_csr(split["val_targets"]) if split.get("val_targets") else None
    item_text = pl.read_parquet(split["item_text"]) if needs_history and split.get("item_text") else None
    with staged_table(folder) as stage:
        if needs_history and models_cfg.two_tower.artifact_dir is None:
            # keep the encoder (weights + feature tables) with the embeddings, not in a temp folder
            artifacts = str(encoder_dir if encoder_dir is not None else stage / ARTIFACTS)
            tt = models_cfg.two_tower.model_copy(update={"artifact_dir": artifacts})
            models_cfg = models_cfg.model_copy(update={"two_tower": tt})
        logger = lightning_logger() if needs_history and callable(lightning_logger) else lightning_logger
        t0 = time.perf_counter()
        emb = train_model(name, train, models_cfg, eval_cfg, val, on_metrics, item_text, logger, warm_start_from)
        seconds = time.perf_counter() - t0
        checkpoint(f"train:{name}")  # fitted, nothing saved yet
        emb.info.update(_relocate(emb.info, [(str(stage), str(folder))]))  # files in the stage are read at folder
        save_embeddings(emb, stage)
        record: Record = {
            "model": name,
            "key": key,
            "folder": str(folder),
            "embeddings": str(folder),
            "train_seconds": round(seconds, 3),
            "info": {k: v for k, v in emb.info.items() if k != "history"},
            "history": emb.info.get("history", []),
        }
        write_json_atomic(record, stage / "record.json")
    return record


def run_tune(
    split: Record,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    cfg: TuningConfig,
    cache_root: Path,
    storage_file: Path,
) -> Record:
    """Search the hyperparameters of every model ``tuning`` covers, on the split's validation window only.

    Reads the train matrix (once, shared by every trial) and the validation targets; never the test targets.
    The studies live in the Optuna SQLite storage ``storage_file`` (a killed search resumes there). The result is
    committed as ``<cache_root>/tune-<key>/`` (record, each model's ``trials.csv`` and plots), the key hashing the
    split's key, the models' and eval config and the tuning config, so an unchanged log and config reuse it.

    Returns:
        ``tuning.tune_models``'s record (``models``: best params, values, counts, trials table and plots per
        model) with ``seconds`` (the whole stage, data loading included), ``key``, ``folder``, ``cached`` and
        ``skipped`` (model -> why it was not searched).
    """
    from recsys_embed.models import runnable_models
    from recsys_embed.tuning import TuneData, tune_models, tuned_models

    t0 = time.perf_counter()
    runnable = runnable_models(models_cfg, split["n_users"], split["n_items"], warn=False)  # the flow warns
    names = tuned_models(models_cfg, cfg, runnable)
    skipped: dict[str, str] = {}
    if models_cfg.ease.enabled and "ease" not in runnable:
        from recsys_embed.ease import fits

        skipped["ease"] = fits(split["n_users"], split["n_items"], models_cfg.ease) or "not runnable"
    if not split.get("val_targets"):
        skipped.update(dict.fromkeys(names, "no validation window (split.val_quantile is null)"))
        log.warning("tuning: the split has no validation window; no model is searched (set split.val_quantile)")
        names = []
    key = _hash({"v": CACHE_VERSION, "stage": "tune", "split": split.get("key"), "models": names,
                 "models_cfg": models_cfg.model_dump(mode="json"), "tuning": cfg.model_dump(mode="json"),
                 "eval": {"ks": eval_cfg.ks, "primary_metric": eval_cfg.primary_metric}})  # fmt: skip
    folder = Path(cache_root) / f"tune-{key}"
    if is_complete_table(folder):
        log.info("tuning: split and config unchanged, reusing %s", folder)
        record = _load_record(folder)
        record["cached"] = True
        return record
    with staged_table(folder) as stage:
        if names:
            train = load_train(split, with_events="two_tower" in names)
            item_text = pl.read_parquet(split["item_text"]) if "two_tower" in names and split.get("item_text") else None
            data = TuneData(train, load_csr(split["val_targets"]), item_text)
            record = tune_models(data, names, models_cfg, eval_cfg, cfg, Path(storage_file), stage, split.get("key"))
        else:
            record = {"metric": cfg.metric or eval_cfg.primary_metric, "storage": None, "seconds": 0.0, "models": {}}
        record = _relocate(record, [(str(stage), str(folder))])
        record.update(key=key, folder=str(folder), skipped=skipped, seconds=round(time.perf_counter() - t0, 3))
        write_json_atomic(record, stage / "record.json")
    record["cached"] = False
    return record


def _replay_history(history: list[dict[str, Any]], on_metrics: OnMetrics) -> None:
    """Send a reused model's training curves to ``on_metrics`` (one call per iteration/epoch)."""
    for i, row in enumerate(history, 1):
        step = int(row.get("iteration", row.get("epoch", i)))
        metrics = {k: float(v) for k, v in row.items() if k not in ("iteration", "epoch", "seconds")
                   and isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
        if metrics:
            on_metrics(metrics, step)


def run_evaluate(model: Record, split: Record, cfg: EvalConfig) -> dict[str, float]:
    """Test metrics of one model (warm users; train-seen items excluded)."""
    from recsys_embed.evaluate import evaluate

    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    targets = load_csr(split["test_targets"])
    popularity = np.asarray((seen > 0).sum(axis=0)).ravel()
    metrics = evaluate(emb, seen, targets, cfg.ks, popularity, cfg.batch_users)
    checkpoint(f"evaluate:{model['model']}")  # computed, not yet returned (nothing of it is persisted)
    return metrics


def run_export(model: Record, split: Record, cfg: ExportConfig, out_dir: Path, run_id: str) -> Record:
    """Top-k for every train user and similar items, as committed Parquet tables."""
    from recsys_embed.export import export_similar_items, export_topk

    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    folder = Path(out_dir) / model["model"]
    topk = export_topk(emb, seen, cfg, folder, run_id)
    record: Record = {"model": model["model"], "topk": topk.path, "topk_rows": topk.rows, "topk_users": topk.users}
    record.update(search_quality(emb, seen, cfg))
    checkpoint(f"export:{model['model']}")  # mid-export: top-k committed, similar items not written yet
    if emb.dim > 1:  # popularity has no meaningful item-item similarity
        sim = export_similar_items(emb, cfg, folder, run_id)
        record.update(similar_items=sim.path, similar_rows=sim.rows)
    return record


# The same export, sharded (``recsys_embed.shards``): plan once, one call per shard (anywhere that sees these
# paths), commit once, similar items beside them. Together they return what ``run_export`` returns.


def run_export_plan(model: Record, cfg: ExportConfig, out_dir: Path, n_shards: int) -> Record:
    """Plan the sharded top-k table ``out_dir/<model>/topk`` in at most ``n_shards`` shards; the plan record."""
    from recsys_embed.shards import plan_topk_shards

    n_users = len(load_embeddings(model["embeddings"]).users)
    return plan_topk_shards(n_users, cfg.chunk_users, n_shards, Path(out_dir) / model["model"] / "topk").to_dict()


def run_export_shard(model: Record, split: Record, cfg: ExportConfig, plan: Record, index: int, run_id: str) -> Record:
    """Write shard ``index`` of ``plan`` (``shards.export_topk_shard``); its result (rows, users, parts)."""
    from dataclasses import asdict

    from recsys_embed.shards import ShardPlan, export_topk_shard

    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    return asdict(export_topk_shard(emb, seen, cfg, ShardPlan.from_dict(plan), index, run_id))


def run_export_commit(model: Record, split: Record, cfg: ExportConfig, plan: Record) -> Record:
    """Check every shard of ``plan`` and commit the top-k table; the ``topk`` part of ``run_export``'s record."""
    from recsys_embed.shards import ShardPlan, commit_topk_shards

    res = commit_topk_shards(ShardPlan.from_dict(plan), cfg)
    record: Record = {"model": model["model"], "topk": res.path, "topk_rows": res.rows, "topk_users": res.users,
                      "topk_shards": len(plan["shards"])}  # fmt: skip
    if cfg.search.kind != "exact":
        record.update(search_quality(load_embeddings(model["embeddings"]), load_csr(split["train"]), cfg))
    return record


def search_quality(emb: Embeddings, seen: Any, cfg: ExportConfig) -> Record:
    """For an approximate search (``export.search.kind`` hnsw / ivf): its recall@k against exact search on a
    seeded user sample, as ``{"search": kind, "ann_recall_at_k": r}``; empty for exact search."""
    if cfg.search.kind == "exact":
        return {}
    from recsys_embed.ann import recall_against_exact

    recall = recall_against_exact(emb, cfg.k, cfg.search, seen, cfg.search.recall_sample_users)
    log.info("export: %s search recall@%d against exact = %.4f (%s)", cfg.search.kind, cfg.k, recall, emb.model)
    return {"search": cfg.search.kind, "ann_recall_at_k": round(recall, 6)}


def run_export_similar(model: Record, cfg: ExportConfig, out_dir: Path, run_id: str) -> Record:
    """The similar-items table of ``run_export`` alone (empty record for popularity, which has none)."""
    from recsys_embed.export import export_similar_items

    emb = load_embeddings(model["embeddings"])
    if emb.dim <= 1:
        return {}
    sim = export_similar_items(emb, cfg, Path(out_dir) / model["model"], run_id)
    return {"similar_items": sim.path, "similar_rows": sim.rows}


def run_db_export(
    export: Record, cfg: DatabaseExportConfig, root: Path, run_id: str, model_version: str | None
) -> Record:
    """Copy one model's committed top-k (and similar-items) tables into the configured database.

    The URI comes from ``$<cfg.uri_env>``, else ``cfg.uri``, else SQLite ``<root>/recommendations.db``. The
    returned record holds the URI redacted, never the secret.
    """
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
    checkpoint("db-export")  # the top-k table is swapped in, the similar-items table not yet
    if export.get("similar_items"):
        res = export_table(export["similar_items"], uri, cfg.similar_table, model_version, cfg.batch_rows,
                           ("item_id", "rank"))  # fmt: skip
        record["tables"][cfg.similar_table] = res.rows
    record["run_id"] = run_id
    return record


def run_register(
    settings: MlflowSettings,
    candidate: Candidate,
    export_cfg: ExportConfig,
    cfg: RegistryConfig,
    eval_cfg: EvalConfig,
    split: Record | None = None,
) -> Record:
    """Register the run's best model (``registry.register_best``, judged on ``eval_cfg.primary_metric`` unless
    ``registry.metric`` names another); the decision record.

    With ``split``, the current champion is re-scored on this split's test targets (``compare.rescore``) so that
    both sides of the champion decision sit the same exam.

    Not cached: a re-run after a kill registers again (a new version; ``champion`` moves only on a real gain).
    """
    from recsys_embed.registry import register_best

    rescore = None
    if split is not None and split.get("test_targets"):
        from recsys_embed.compare import rescore as rescore_on

        train, targets = load_csr(split["train"]), load_csr(split["test_targets"])
        users, items = IdMap.load(split["user_map"]), IdMap.load(split["item_map"])

        def rescore(emb: Embeddings) -> dict[str, float]:
            return rescore_on(emb, users, items, train, targets, eval_cfg.ks, eval_cfg.batch_users)

    decision = register_best(settings, candidate, export_cfg, cfg, eval_cfg.primary_metric, rescore)
    checkpoint("register")  # the version is registered, the run has not finished
    return decision
