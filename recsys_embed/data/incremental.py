"""Incremental runs: ingest only the log files that are new since the last successful run.

State (``<root>/<incremental.state_file>``, written atomically only after a run finished) records each
ingested file with its size and content fingerprint, the accumulated clean events, their cumulative row
report, and the last run's split folder (whose ID maps the next run extends: old indices never change).
The models folder beside that split (``runs/<run>/models``) is what the next run's models warm-start from
(``models.warm_start``).

A run reads only the new files, appends their clean events to the accumulated ones, and adds their row
counts to the cumulative report, so no row is read or counted twice. A file that changed after it was
ingested is an error (append-only logs), naming the file and the fix (a full run). A run that fails leaves
the state as it was, so its new files are simply picked up again by the next run. A run with no new file does
nothing at all (``nothing_new`` says why), unless forced.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from recsys_embed.config import IncrementalConfig, IngestConfig
from recsys_embed.errors import IngestError
from recsys_embed.io import write_json_atomic, write_parquet_atomic
from recsys_embed.types import RowReport

log = logging.getLogger(__name__)

Record = dict[str, Any]


def state_path(root: Path, cfg: IncrementalConfig) -> Path:
    return Path(root) / cfg.state_file


def load_state(root: Path, cfg: IncrementalConfig) -> Record | None:
    p = state_path(root, cfg)
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def _file_key(f: Path) -> str:
    from recsys_embed.data.sources import fingerprint

    return fingerprint([f])


def nothing_new(cfg: IngestConfig, root: Path, inc: IncrementalConfig) -> str | None:
    """Why an incremental run has nothing to do, or None when it has work.

    Nothing to do: an earlier run finished (the state names its split) and every log file under
    ``ingest.source.path`` was ingested by it or before it, unchanged. The reason reads ``nothing new since run
    <run> (<n> log file(s), all ingested)``. A new file, or a changed one (refused later by
    ``run_incremental_ingest``, naming the fix), returns None so the run goes ahead.
    """
    from recsys_embed.data.sources import resolve_files

    state = load_state(root, inc)
    if not state or not state.get("split_dir"):
        return None
    files = [f.resolve() for f in resolve_files(cfg.source)]
    known: dict[str, str] = state["files"]
    if not files or any(str(f) not in known or known[str(f)] != _file_key(f) for f in files):
        return None
    last_run = Path(state["split_dir"]).parent.name  # runs/<run>/split
    return f"nothing new since run {last_run} ({len(files)} log file(s), all ingested)"


def run_incremental_ingest(cfg: IngestConfig, root: Path, inc: IncrementalConfig, run_name: str) -> Record:
    """Ingest the new files only and return an ingest record (same keys as ``stages.run_ingest``) whose
    ``events`` are all events so far and ``report`` the cumulative accounting, plus an ``incremental`` part:
    ``new_files``, ``skipped_files``, ``new_rows_read``, ``previous_split`` (ID maps to extend),
    ``previous_models`` (the last run's models to warm-start from, or None) and the ``pending_state`` that
    ``commit_state`` writes once the run succeeded."""
    from recsys_embed.data.ingest import load_events, write_quarantine
    from recsys_embed.data.sources import fingerprint, resolve_files

    t0 = time.perf_counter()
    state = load_state(root, inc) or {"files": {}, "events": None, "report": None, "split_dir": None}
    files = [f.resolve() for f in resolve_files(cfg.source)]
    known: dict[str, str] = state["files"]
    new, skipped = [], []
    for f in files:
        key = known.get(str(f))
        if key is None:
            new.append(f)
            continue
        if _file_key(f) != key:
            raise IngestError(
                f"log file '{f}' changed after an earlier incremental run ingested it; incremental runs need "
                f"append-only logs. Run once with incremental.enabled=false (a full rebuild), or delete "
                f"'{state_path(root, inc)}' to start the incremental state afresh"
            )
        skipped.append(f)
    folder = Path(root) / "incremental" / run_name
    folder.mkdir(parents=True, exist_ok=True)
    previous = pl.read_parquet(state["events"]) if state["events"] else None
    report = RowReport.from_dict(state["report"]) if state["report"] else RowReport()
    new_rows = 0
    quarantine = folder / "quarantine.parquet"
    item_text: str | None = state.get("item_text")
    if new:
        ev = load_events(cfg, only_files=set(new))
        new_rows = ev.report.rows_read
        write_quarantine(ev.quarantine, quarantine)
        events = ev.events
        if previous is not None:
            events = events.cast({c: previous.schema[c] for c in events.columns if c in previous.schema})
            events = pl.concat([previous, events], how="diagonal_relaxed")
        _add(report, ev.report)
        if ev.item_text is not None:
            texts = ev.item_text
            if item_text:
                texts = pl.concat([pl.read_parquet(item_text), texts], how="diagonal_relaxed").unique(
                    subset=texts.columns[0], keep="last", maintain_order=True
                )
            item_text = str(write_parquet_atomic(texts, folder / "item_text.parquet"))
    elif previous is not None:
        events = previous
    else:
        raise IngestError(f"no log files under '{cfg.source.path}'; check ingest.source.path")
    events_path = write_parquet_atomic(events, folder / "events.parquet")
    log.info("incremental ingest: %d new file(s) (%d rows read), %d already ingested file(s) skipped",
             len(new), new_rows, len(skipped))  # fmt: skip
    pending = {
        "files": {**known, **{str(f): _file_key(f) for f in new}},
        "events": str(events_path),
        "report": report.to_dict(),
        "item_text": item_text,
        "split_dir": state.get("split_dir"),
        "rows_read_by_run": [*state.get("rows_read_by_run", []), {"run": run_name, "rows_read": new_rows}],
    }
    return {
        "key": f"incremental-{run_name}",
        "folder": str(folder),
        "events": str(events_path),
        "quarantine": str(quarantine) if quarantine.exists() else None,
        "item_text": item_text,
        "files": [str(f) for f in files],
        "fingerprint": fingerprint(files),
        "report": report.to_dict(),
        "quarantine_summary": [],
        "seconds": round(time.perf_counter() - t0, 3),
        "cached": False,
        "incremental": {
            "new_files": [str(f) for f in new],
            "skipped_files": [str(f) for f in skipped],
            "new_rows_read": new_rows,
            "total_rows_read": report.rows_read,
            "previous_split": state.get("split_dir"),
            "previous_models": previous_models_dir(state.get("split_dir")),
            "pending_state": pending,
        },
    }


def previous_models_dir(split_dir: str | None) -> str | None:
    """The models folder of the run whose split is ``split_dir`` (the pipeline writes ``runs/<run>/split`` and
    ``runs/<run>/models`` side by side), or None on a first run or when that folder is gone."""
    if not split_dir:
        return None
    folder = Path(split_dir).parent / "models"
    if not folder.is_dir():
        log.warning("incremental: the last run's models folder '%s' is gone; models train from a random start", folder)
        return None
    return str(folder)


def _add(total: RowReport, part: RowReport) -> None:
    """Add one load's counts to the cumulative report (both balance, so the sum balances)."""
    total.rows_read += part.rows_read
    total.kept += part.kept
    total.duplicates += part.duplicates
    total.quarantined.update(part.quarantined)
    total.filtered.update(part.filtered)
    total.sources.update(part.sources)


def commit_state(root: Path, inc: IncrementalConfig, ingest: Mapping[str, Any], split_dir: str) -> Path:
    """Record the run as the last successful one (call only after it finished)."""
    state = dict(ingest["incremental"]["pending_state"])
    state["split_dir"] = split_dir
    return write_json_atomic(state, state_path(root, inc))
