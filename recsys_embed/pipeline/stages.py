"""The pipeline's stages as file-in/file-out functions that return small JSON-able records.

Each stage reads its inputs from paths, writes its outputs atomically, and returns a record of paths
and small numbers. ``flows/`` wraps each one in a Prefect task; the CLI and tests can call them
directly. Heavy data never travels between stages in memory (a known Prefect memory trap).

Layout under ``<output_root>/<name>/``::

    cache/ingest-<key>/         events, quarantine, item texts, record.json
    cache/split-<key>/          train matrix, ID maps, validation/test targets, record.json
    cache/train-<m>-<key>/      one model's embeddings (Parquet) + meta + record.json (+ artifacts/: encoder)
    cache/full-<key>/           every kept event for the production refit: matrix, extended maps, history filter
    cache/refit-<m>-<key>/      one shipped model refit on every kept event (same layout as train-)
    runs/<run>/split/           the run's split: hard links to cache/split-<key>/ (record.json: its own paths)
    runs/<run>/models/<m>/      the run's model: hard links to cache/train-<m>-<key>/ (the two-tower encoder
                                goes to runs/<run>/models/two_tower_encoder/)
    runs/<run>/selection/       per-user validation metric of each model (selection, champion comparison)
    runs/<run>/full/, refit/<m>/  hard links to cache/full-<key>/ and cache/refit-<m>-<key>/
    runs/<run>/served/<m>/      the shipped model's served vectors (refit model + popularity fallback)
    runs/<run>/exports/<m>/     topk/ and similar_items/ tables of the shipped models (recomputed by every run)
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from recsys_embed.config import (
    EvalConfig,
    IngestConfig,
    ModelsConfig,
    SplitConfig,
    TuningConfig,
)
from recsys_embed.errors import ConfigError, IngestError
from recsys_embed.faults import checkpoint
from recsys_embed.io import (
    SUCCESS_MARKER,
    atomic_path,
    is_complete_table,
    staged_table,
    write_json_atomic,
    write_parquet_atomic,
)
from recsys_embed.models.factory import OnMetrics, train_model, warm_start_source
from recsys_embed.pipeline.records import (
    IngestRecord,
    ModelRecord,
    SelectionRecord,
    SplitRecord,
    TuneRecord,
    ValidationRecord,
)
from recsys_embed.store import load_csr, load_embeddings, save_csr, save_embeddings
from recsys_embed.types import IdMap, Interactions, RowReport

log = logging.getLogger(__name__)


# Part of every split/train cache key: bump it when what a cached folder holds changes shape.
CACHE_VERSION = 2
ARTIFACTS = "artifacts"  # a cached model's extra files (the two-tower encoder), beside its embeddings


def content_hash(obj: Any) -> str:
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


def _required(path: str | None, what: str) -> str:
    """A record's optional path that the caller needs (a split without that window is a caller's bug)."""
    if path is None:
        raise ValueError(f"the split has no {what} (split.val_quantile / test_quantile null?)")
    return path


def _load_record(folder: Path) -> Any:
    """A committed cache folder's ``record.json``, its paths moved to where the folder is now."""
    record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
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
    from recsys_embed.data.sources import fingerprint, resolve_files

    return fingerprint(resolve_files(cfg.source))


def run_ingest(cfg: IngestConfig, cache_root: Path) -> IngestRecord:
    """Read, validate, dedup and rule-filter the log; persist clean events + quarantine under the cache.

    An unchanged log with an unchanged ingest config is read back from the cache instead of re-ingested.
    """
    from recsys_embed.data.ingest import load_events, write_quarantine

    key = ingest_cache_key(input_fingerprint(cfg), cfg)
    folder = Path(cache_root) / f"ingest-{key}"
    if is_complete_table(folder):
        record: IngestRecord = json.loads((folder / "record.json").read_text(encoding="utf-8"))
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


def split_cache_key(ingest: IngestRecord, ingest_cfg: IngestConfig, cfg: SplitConfig) -> str:
    """Cache key of a split: the ingest's key (log fingerprint + ingest config), the ingest config it is built
    with (k-core, confidence, ID-map settings), the split config (``cfg.seed`` included), and the content of
    ``ingest_cfg.id_maps_from`` when set. An incremental ingest's key names its run, so its split is never reused.
    """
    maps = None
    if ingest_cfg.id_maps_from:
        from recsys_embed.data.interactions import ITEM_MAP_FILE, USER_MAP_FILE

        folder = Path(ingest_cfg.id_maps_from)
        maps = _files_digest([folder / USER_MAP_FILE, folder / ITEM_MAP_FILE])
    return content_hash({"v": CACHE_VERSION, "stage": "split", "ingest": ingest["key"],
                  "ingest_cfg": ingest_cfg.model_dump(mode="json"), "split": cfg.model_dump(mode="json"),
                  "id_maps": maps})  # fmt: skip


def run_split(
    ingest: IngestRecord, ingest_cfg: IngestConfig, cfg: SplitConfig, out_dir: Path, cache_root: Path | None = None
) -> SplitRecord:
    """Split clean events, build the train ``Interactions`` from the fit part only, and the targets.

    Everything fitted (ID maps, k-core, confidence, time decay) sees only events before the cutoff. The split is
    committed as the table folder ``out_dir``. With ``cache_root`` it is computed once into
    ``<cache_root>/split-<split_cache_key>/`` and ``out_dir`` is a hard-linked copy; an unchanged ingest and split
    config reuse the cached folder (``record["cached"]``).
    """
    return _cached_split(
        "split", lambda: split_cache_key(ingest, ingest_cfg, cfg),
        lambda folder, key: _split_into(folder, key, ingest, ingest_cfg, cfg), out_dir, cache_root,
    )  # fmt: skip


def _cached_split(
    prefix: str,
    cache_key: Callable[[], str],
    build: Callable[[Path, str | None], SplitRecord],
    out_dir: Path,
    cache_root: Path | None,
) -> SplitRecord:
    """A split-shaped stage (``run_split``, ``run_full``): ``build`` into ``out_dir`` without a cache; else once
    into ``<cache_root>/<prefix>-<key>/`` (reused when complete) and a hard-linked copy committed at ``out_dir``,
    the record's paths moved to it."""
    out_dir = Path(out_dir)
    if cache_root is None:
        record = build(out_dir, None)
        record["cached"] = False
        return record
    key = cache_key()
    folder = Path(cache_root) / f"{prefix}-{key}"
    cached = is_complete_table(folder)
    if cached:
        log.info("%s: its inputs and config are unchanged, reusing %s", prefix, folder)
        record = _load_record(folder)
    else:
        record = build(folder, key)
    moves = [(str(folder), str(out_dir))]
    _link_copy(folder, out_dir, moves)
    moved: SplitRecord = _relocate(record, moves)
    moved["cached"] = cached
    return moved


def _split_into(
    folder: Path, key: str | None, ingest: IngestRecord, ingest_cfg: IngestConfig, cfg: SplitConfig
) -> SplitRecord:
    """Compute the split and commit it as the table folder ``folder``; its record (paths under ``folder``)."""
    from recsys_embed.data.interactions import build_interactions, load_id_maps, save_id_maps
    from recsys_embed.data.split import build_targets, evidence, split_events

    events = pl.read_parquet(ingest["events"])
    if (n_items := events["item_id"].n_unique()) < 2:  # nothing to rank: stop before splitting and training
        raise IngestError(f"the log has {n_items} distinct item{'' if n_items == 1 else 's'} after filtering "
                          f"({events.height:,} kept events); a recommender needs at least 2 items to rank: check that "
                          "ingest.columns.item names the item column and that ingest.item_filters, window_start, "
                          "window_end or until do not drop the others")  # fmt: skip
    previous = load_id_maps(ingest_cfg.id_maps_from) if ingest_cfg.id_maps_from else None
    rule: str = cfg.method
    report = RowReport.from_dict(ingest["report"])
    parts = split_events(events, cfg)
    train = build_interactions(parts.fit, ingest_cfg, report, previous=previous)
    targets = {label: build_targets(frame, train, report, label) if frame.height else None
               for label, frame in (("val", parts.val), ("test", parts.test))}  # fmt: skip
    short = [why for label, t in targets.items()
             if (why := evidence(label, _choice_users(label, t, cfg), cfg.min_eval_users))]  # fmt: skip
    if short and cfg.method == "auto":
        log.warning("split: %s; auto falls back to a per-user split (last_n=%d)", "; ".join(short), cfg.last_n)
        per_user = cfg.model_copy(update={"method": "last_n"})
        report = RowReport.from_dict(ingest["report"])
        parts = split_events(events, per_user)
        train = build_interactions(parts.fit, ingest_cfg, report, previous=previous)
        targets = {label: build_targets(frame, train, report, label) if frame.height else None
                   for label, frame in (("val", parts.val), ("test", parts.test))}  # fmt: skip
        rule = f"auto: last_n (temporal rejected: {'; '.join(short)})"
        short = [why for label, t in targets.items()
                 if (why := evidence(label, _choice_users(label, t, cfg), cfg.min_eval_users))]  # fmt: skip
    elif cfg.method == "auto":
        rule = f"auto: temporal (val and test windows each hold >= {cfg.min_eval_users:,} warm users)"
    val_short = [why for why in short if why.startswith("the val window")]
    if val_short and cfg.method != "auto" and targets["val"] is not None:  # no window (val_quantile null): no choice
        raise ConfigError(
            f"split.method={cfg.method!r}: {val_short[0]}, so the model shipped would be chosen on noise. Use "
            "split.method: auto (it falls back to a per-user split, holding out each user's last event), or "
            "last_n; or lower split.min_eval_users knowingly to choose on this window anyway"
        )
    for why in short:
        if cfg.method == "auto":  # already per user: the log has too few users for a firmer choice
            log.warning("split: %s, even holding out each user's last event; the choice rests on them (a log "
                        "with more users gives a firmer one)", why)  # fmt: skip
        else:
            log.warning("split: %s; a choice made on it is noise: lower split.min_eval_users only knowingly, or "
                        "use split.method=auto / last_n", why)  # fmt: skip
    search_val, select_val = _selection_halves(targets["val"].matrix if targets["val"] else None, cfg)
    parts.info.update(rule=rule, evidence_warnings=short)
    if select_val is not None:
        parts.info["selection_rule"] = (
            f"validation users split by seed {cfg.seed}: {_users(select_val):,} chosen on (selection, registry), "
            f"{_users(search_val):,} searched on (tuning trials, best iteration); split.select_share="
            f"{cfg.select_share:g}")  # fmt: skip
    if (n_fit := int(np.count_nonzero(np.diff(train.matrix.tocsc().indptr)))) < 2:
        raise ConfigError(f"the fit window holds {n_fit} distinct item(s) of the log's {n_items:,} after the k-core "
                          "(ingest.min_item_interactions / min_user_interactions) and the split; a recommender "
                          "needs at least 2: lower the k-core minimums or move the split")  # fmt: skip
    with staged_table(folder) as stage:
        save_csr(train.matrix, stage / "train.npz")
        checkpoint("split")  # mid-split: the train matrix is written, maps and targets are not
        write_parquet_atomic(train.events, stage / "train_events.parquet")
        save_id_maps(train.users, train.items, stage)
        record: SplitRecord = {
            "train": str(folder / "train.npz"), "split": parts.info, "n_users": train.shape[0],
            "n_items": train.shape[1], "val_targets": None, "test_targets": None,
        }  # fmt: skip
        for label, tg in targets.items():
            if tg is None:
                continue
            save_csr(tg.matrix if label != "val" else search_val, stage / f"{label}_targets.npz")
            write_parquet_atomic(tg.cold_users.to_frame("user_id"), stage / f"{label}_cold_users.parquet")
            path, cold = str(folder / f"{label}_targets.npz"), int(tg.cold_users.len())
            if label == "val":
                record.update({"val_targets": path, "val_counts": tg.counts, "val_warm_users": tg.n_warm_users,
                               "val_cold_users": cold, "select_targets": None})  # fmt: skip
                if select_val is not None:
                    save_csr(select_val, stage / "select_targets.npz")
                    record.update({"select_targets": str(folder / "select_targets.npz"),
                                   "select_users": _users(select_val), "search_users": _users(search_val)})
            else:
                record.update({"test_targets": path, "test_counts": tg.counts, "test_warm_users": tg.n_warm_users,
                               "test_cold_users": cold})  # fmt: skip
        report.details.update(users=train.shape[0], items=train.shape[1], nnz=int(train.matrix.nnz),
                              density=train.density)  # fmt: skip
        report.check()
        record.update({
            "full_users": int(events["user_id"].n_unique()),  # the refit's catalog, bounded above (memory checks)
            "full_items": int(events["item_id"].n_unique()),
            "key": key,
            "folder": str(folder),
            "train": str(folder / "train.npz"),
            "train_events": str(folder / "train_events.parquet"),
            "item_text": ingest.get("item_text"),
            "user_map": str(folder / "user_map.parquet"),
            "item_map": str(folder / "item_map.parquet"),
            "report": report.to_dict(),
        })  # fmt: skip
        write_json_atomic(record, stage / "record.json")
    return record


def _choice_users(label: str, targets: Any, cfg: SplitConfig) -> int:
    """Warm users a window's figures rest on: the test window's all; the validation window's selection part
    (``split.select_share`` of them, see ``_selection_halves``), which the model choice reads."""
    n = int(targets.n_warm_users) if targets is not None else 0
    if label == "val" and cfg.select_share > 0:
        return round(cfg.select_share * n)
    return n


def _users(matrix: Any) -> int:
    """Users (rows) with at least one stored target."""
    return int(np.count_nonzero(np.diff(matrix.indptr)))


def _selection_halves(val: Any, cfg: SplitConfig) -> tuple[Any, Any]:
    """The validation targets split by user into (search, select) parts of the same shape.

    A seeded permutation of the warm validation users puts ``round(select_share x users)`` of them in the
    selection part (the model choice and the registry's paired test read it) and the rest in the search part
    (tuning trials and best-iteration early stopping read it), so nothing the search maximised is scored again
    when choosing. ``select_share`` 0 (or no validation window): (val, None), one set of users for both.
    """
    if val is None or cfg.select_share == 0:
        return val, None
    warm = np.flatnonzero(np.diff(val.indptr))
    n_select = round(cfg.select_share * warm.size)
    if n_select == 0 or n_select == warm.size:
        return val, None
    chosen = np.random.default_rng([cfg.seed, 7919]).permutation(warm)[:n_select]
    mask = np.zeros(val.shape[0], dtype=bool)
    mask[chosen] = True
    import scipy.sparse as sp

    keep = sp.diags(mask.astype(np.float32))
    select = (keep @ val).tocsr()
    search = (sp.diags((~mask).astype(np.float32)) @ val).tocsr()
    select.eliminate_zeros()
    search.eliminate_zeros()
    return search.astype(np.float32), select.astype(np.float32)


def uses_events(name: str, models_cfg: ModelsConfig) -> bool:
    """Whether model ``name`` reads the train event table (the two-tower's history, EASE's recency weights)."""
    return name == "two_tower" or (name == "ease" and models_cfg.ease.half_life_days is not None)


def load_train(split: SplitRecord, with_events: bool = False) -> Interactions:
    """The train ``Interactions`` of a split record; the event table (user_idx, item_idx, ts, weight) is
    read only when asked for (models that weigh history by recency need it)."""
    matrix = load_csr(split["train"])
    users = IdMap.load(split["user_map"])
    items = IdMap.load(split["item_map"])
    events = pl.read_parquet(split["train_events"]) if with_events else pl.DataFrame()
    return Interactions(matrix, users, items, RowReport.from_dict(split["report"]), events)


def train_cache_key(
    name: str, split: SplitRecord, models_cfg: ModelsConfig, eval_cfg: EvalConfig, warm_start: Path | None = None
) -> str:
    """Cache key of one model's training: the split's key, the model's config slice (its ``seed`` included),
    what the trainer reads of the eval config (``ks``, ``primary_metric``: best-iteration selection), and the
    content of the warm-start source when there is one."""
    return content_hash({"v": CACHE_VERSION, "stage": "train", "model": name, "split": split["key"],
                  "config": getattr(models_cfg, name).model_dump(mode="json"),
                  "eval": {"ks": eval_cfg.ks, "primary_metric": eval_cfg.primary_metric},
                  "warm_start": _files_digest([warm_start]) if warm_start is not None else None})  # fmt: skip


def run_train(
    name: str,
    split: SplitRecord,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    out_dir: Path,
    on_metrics: OnMetrics | None = None,
    lightning_logger: Any | None = None,
    warm_start_from: str | None = None,
    cache_root: Path | None = None,
    cache_prefix: str = "train",
) -> ModelRecord:
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
    folder = Path(cache_root) / f"{cache_prefix}-{name}-{key}"  # "refit": the production refits
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
    if not cached and record["info"].get("stopped_by_clock"):
        # a wall-clock cap shortened this fit: what it holds depends on machine load, not on the key's inputs,
        # so it must not answer for them next time (the run keeps its own hard-linked copy)
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("train %s: max_minutes ended the fit after %s epochs; the model is used by this run but not "
                    "cached (raise models.%s.max_minutes for a reproducible fit)", name,
                    record["info"].get("epochs_run"), name)  # fmt: skip
    return record


def _train_into(
    folder: Path,
    key: str | None,
    name: str,
    split: SplitRecord,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    on_metrics: OnMetrics | None,
    lightning_logger: Any | None,
    warm_start_from: str | None,
    encoder_dir: Path | None,
) -> ModelRecord:
    """Train and commit the embeddings as the table folder ``folder``; the two-tower encoder goes to
    ``encoder_dir`` (None: ``folder/artifacts``, committed with it). Returns the record (paths under ``folder``)."""
    needs_history = name == "two_tower"
    train = load_train(split, with_events=uses_events(name, models_cfg))
    val = load_csr(v) if (v := split.get("val_targets")) else None
    item_text = pl.read_parquet(t) if needs_history and (t := split.get("item_text")) else None
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
        record: ModelRecord = {
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
    split: SplitRecord,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    cfg: TuningConfig,
    cache_root: Path,
    storage_file: Path,
) -> TuneRecord:
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
    from recsys_embed.models.factory import refit_shape, runnable_models
    from recsys_embed.models.tuning import TuneData, tune_models, tuned_models

    t0 = time.perf_counter()
    full_shape = refit_shape(split)
    runnable = runnable_models(models_cfg, split["n_users"], split["n_items"], warn=False,
                               refit_shape=full_shape)  # fmt: skip # the flow warns
    names = tuned_models(models_cfg, cfg, runnable)
    skipped: dict[str, str] = {}
    if models_cfg.ease.enabled and "ease" not in runnable:
        from recsys_embed.models.ease import fits

        skipped["ease"] = (fits(split["n_users"], split["n_items"], models_cfg.ease)
                           or (full_shape and fits(*full_shape, models_cfg.ease)) or "not runnable")  # fmt: skip
    if not split.get("val_targets"):
        skipped.update(dict.fromkeys(names, "no validation window (split.val_quantile is null)"))
        log.warning("tuning: the split has no validation window; no model is searched (set split.val_quantile)")
        names = []
    key = content_hash({"v": CACHE_VERSION, "stage": "tune", "split": split.get("key"), "models": names,
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
            train = load_train(split, with_events=any(uses_events(n, models_cfg) for n in names))
            item_text = pl.read_parquet(t) if "two_tower" in names and (t := split.get("item_text")) else None
            data = TuneData(train, load_csr(_required(split.get("val_targets"), "val_targets")), item_text)
            record = cast(TuneRecord, tune_models(data, names, models_cfg, eval_cfg, cfg, Path(storage_file), stage,
                                                  split.get("key")))  # fmt: skip
        else:
            record = {"metric": cfg.metric or eval_cfg.primary_metric, "storage": None, "seconds": 0.0, "models": {}}
        record = _relocate(record, [(str(stage), str(folder))])
        record.update(key=key, folder=str(folder), skipped=skipped, seconds=round(time.perf_counter() - t0, 3))
        write_json_atomic(record, stage / "record.json")
    record["cached"] = False
    clocked = [n for n, m in record.get("models", {}).items() if m.get("stopped_by") == "time"]
    if clocked:
        # a wall-clock budget ended these searches: their result depends on machine load, not on the key's inputs,
        # so it must not answer for them next time (as run_train does for a clock-stopped fit); the run keeps it
        # under another name, and the next run resumes the studies from the Optuna storage
        kept = folder.with_name(f"{folder.name}-clock-stopped")
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(folder, kept)
        record = _relocate(record, [(str(folder), str(kept))])
        log.warning("tuning: the wall-clock budget stopped the search of %s before its trials; this run uses the "
                    "result, but it is not cached (the next run resumes the search); set tuning.budget_minutes and "
                    "tuning.<model>.minutes to null for a reproducible search", ", ".join(clocked))  # fmt: skip
    return record


def _replay_history(history: list[dict[str, Any]], on_metrics: OnMetrics) -> None:
    """Send a reused model's training curves to ``on_metrics`` (one call per iteration/epoch)."""
    for i, row in enumerate(history, 1):
        step = int(row.get("iteration", row.get("epoch", i)))
        metrics = {k: float(v) for k, v in row.items() if k not in ("iteration", "epoch", "seconds")
                   and isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
        if metrics:
            on_metrics(metrics, step)


def score_defaults(
    name: str,
    split: SplitRecord,
    defaults_cfg: ModelsConfig,
    final_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    tuned_metrics: dict[str, float],
    out_dir: Path,
    cache_root: Path | None,
) -> dict[str, dict[str, float]]:
    """Test metrics of model ``name`` with its configured (default) hyperparameters beside the tuned model's.

    The defaults model is trained like any model (``run_train``, into ``out_dir/<name>``, cached by content
    key, so a run without tuning and this one share it) and scored once on test. When the search kept the
    defaults, the tuned model is that model and nothing is trained.

    Returns:
        ``{"defaults": test metrics, "tuned": tuned_metrics}``.
    """
    if getattr(defaults_cfg, name) == getattr(final_cfg, name):
        return {"defaults": dict(tuned_metrics), "tuned": dict(tuned_metrics)}
    model = run_train(name, split, defaults_cfg, eval_cfg, out_dir, cache_root=cache_root)
    return {"defaults": run_evaluate(model, split, eval_cfg), "tuned": dict(tuned_metrics)}


def run_evaluate(model: ModelRecord, split: SplitRecord, cfg: EvalConfig) -> dict[str, float]:
    """Test metrics of one model (warm users; train-seen items excluded). Reported, never used to choose."""
    from recsys_embed.evaluation.metrics import evaluate

    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    targets = load_csr(_required(split.get("test_targets"), "test_targets"))
    popularity = np.asarray((seen > 0).sum(axis=0)).ravel()
    metrics = evaluate(emb, seen, targets, cfg.ks, popularity, cfg.batch_users)
    checkpoint(f"evaluate:{model['model']}")  # computed, not yet returned (nothing of it is persisted)
    return metrics


def run_validate(model: ModelRecord, split: SplitRecord, cfg: EvalConfig, out_dir: Path) -> ValidationRecord:
    """Validation metrics of one model (the evaluation fit on the validation window's selection part, whose users
    the search never scored: what selection and the registry's paired test read).

    Returns ``{"model", "metrics", "per_user"}``: ``per_user`` is a ``.npy`` file under ``out_dir`` with the
    primary metric of every validation user (ascending user index), for standard errors and paired comparisons;
    None (and empty metrics) without a validation window.
    """
    from recsys_embed.evaluation.metrics import evaluate_users

    name = model["model"]
    # the selection part of the validation window: users the search (trials, best iteration) never scored
    if not (val_targets := split.get("select_targets") or split.get("val_targets")):
        return {"model": name, "metrics": {}, "per_user": None}
    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    popularity = np.asarray((seen > 0).sum(axis=0)).ravel()
    metrics, per_user = evaluate_users(emb, seen, load_csr(val_targets), cfg.ks, popularity,
                                       cfg.batch_users, per_user=[cfg.primary_metric])  # fmt: skip
    path = Path(out_dir) / f"{name}.val.{cfg.primary_metric}.npy"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, per_user[cfg.primary_metric])
    return {"model": name, "metrics": metrics, "per_user": str(path)}


def select_best(validations: dict[str, ValidationRecord], cfg: EvalConfig) -> SelectionRecord:
    """``selection.select`` over the ``run_validate`` records: the pick, on the validation window only."""
    from recsys_embed.evaluation.selection import select

    per_user = {m: np.load(p) for m, v in validations.items() if (p := v["per_user"])}
    picked = select({m: v["metrics"] for m, v in validations.items()}, per_user, cfg.primary_metric, cfg.tie_se)
    log.info("selection: %s", picked.reason)
    return cast(SelectionRecord, picked.to_dict())


def full_cache_key(ingest: IngestRecord, ingest_cfg: IngestConfig, split: SplitRecord) -> str:
    """Cache key of the all-events interactions: the ingest (log + ingest config), the config it is built with,
    and the evaluation split's ID maps it extends."""
    maps = _files_digest([Path(split["user_map"]), Path(split["item_map"])])
    return content_hash({"v": CACHE_VERSION, "stage": "full", "ingest": ingest["key"],
                  "ingest_cfg": ingest_cfg.model_dump(mode="json"), "maps": maps})  # fmt: skip


def run_full(
    ingest: IngestRecord, ingest_cfg: IngestConfig, split: SplitRecord, cache_root: Path | None, out_dir: Path
) -> SplitRecord:
    """The production refit's data: every kept event (fit + validation + test windows) as ``Interactions``.

    The ID maps extend the evaluation split's (existing indices never move) and cover every user and item with a
    positive pair; ``history.npz`` is the seen filter over every user with any kept event (cancellations
    included) and ``served_user_map.parquet`` those users (``coverage``). The record has the same keys as a split
    record (``train``, ``user_map``, ``item_map``, ``train_events``, ``item_text``, ``val_targets``=None), so
    ``run_train`` fits on it unchanged, plus ``history``, ``served_user_map``, ``window`` (first and last event
    time) and ``rows`` (kept events fitted on). Cached under ``<cache_root>/full-<key>/``; the run gets a
    hard-linked copy at ``out_dir``.
    """
    return _cached_split(
        "full", lambda: full_cache_key(ingest, ingest_cfg, split),
        lambda folder, key: _full_into(folder, key, ingest, ingest_cfg, split), out_dir, cache_root,
    )  # fmt: skip


def _full_into(
    folder: Path, key: str | None, ingest: IngestRecord, ingest_cfg: IngestConfig, split: SplitRecord
) -> SplitRecord:
    from recsys_embed.data.interactions import build_interactions, normalize_ts, save_id_maps
    from recsys_embed.serving.coverage import history_matrix, served_users

    events = pl.read_parquet(ingest["events"])
    report = RowReport.from_dict(ingest["report"])
    maps = (IdMap.load(split["user_map"]), IdMap.load(split["item_map"]))
    full = build_interactions(events, ingest_cfg, report, previous=maps)
    users = served_users(events, full.users)
    history = history_matrix(events, users, full.items)
    ts = normalize_ts(events["ts"]) if "ts" in events.columns else None
    window = {"first": str(ts.min()), "last": str(ts.max())} if ts is not None and ts.null_count() < ts.len() else None
    with staged_table(folder) as stage:
        save_csr(full.matrix, stage / "train.npz")
        checkpoint("full")  # mid-write: the refit matrix is written, the history and maps are not
        save_csr(history, stage / "history.npz")
        write_parquet_atomic(full.events, stage / "train_events.parquet")
        save_id_maps(full.users, full.items, stage)
        users.save(stage / "served_user_map.parquet")
        record: SplitRecord = {
            "key": key,
            "folder": str(folder),
            "train": str(folder / "train.npz"),
            "history": str(folder / "history.npz"),
            "train_events": str(folder / "train_events.parquet"),
            "item_text": ingest.get("item_text"),
            "user_map": str(folder / "user_map.parquet"),
            "item_map": str(folder / "item_map.parquet"),
            "served_user_map": str(folder / "served_user_map.parquet"),
            "val_targets": None,
            "test_targets": None,
            "window": window,
            "rows": events.height,
            "n_users": full.shape[0],
            "n_items": full.shape[1],
            "n_served_users": len(users),
            "report": report.to_dict(),
        }
        write_json_atomic(record, stage / "record.json")
    log.info("refit data: %s kept events (%s .. %s), %s x %s, %s users with history",
             f"{events.height:,}", window and window["first"], window and window["last"], f"{full.shape[0]:,}",
             f"{full.shape[1]:,}", f"{len(users):,}")  # fmt: skip
    return record


def refit_models_config(name: str, models_cfg: ModelsConfig, model: ModelRecord) -> ModelsConfig:
    """``models_cfg`` with model ``name``'s iteration or epoch count fixed to what selection chose on validation
    (the ``info`` of its evaluation fit ``model``: ``returned_iteration`` for ALS/BPR, ``best_epoch`` for the
    two-tower). Everything else (hyperparameters, seed) is the same recipe."""
    info = model.get("info") or {}
    if name in ("als", "bpr"):
        n = info.get("returned_iteration") or getattr(models_cfg, name).iterations
        slice_ = getattr(models_cfg, name).model_copy(update={"iterations": int(n)})
    elif name == "two_tower":
        n = info.get("best_epoch") or info.get("epochs_run") or models_cfg.two_tower.max_epochs
        slice_ = models_cfg.two_tower.model_copy(update={"max_epochs": int(n)})
    else:
        return models_cfg
    return models_cfg.model_copy(update={name: slice_, "warm_start": False})
