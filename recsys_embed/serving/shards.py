"""Sharded top-k export: plan user shards, export each one anywhere (e.g. a Dask worker), commit one table.

``export.export_topk`` scores users chunk by chunk (``export.chunk_users`` users) and streams the rows into one
committed table. Here the same work is cut so that independent processes can share it, on a filesystem they
all see at the same path:

1. ``plan_topk_shards``: contiguous runs of whole scoring chunks, one run per shard, and a hidden staging folder
   ``.<table>.shards-<token>`` beside the table (hidden names are skipped by every reader).
2. ``export_topk_shard``: scores one shard's users with the same scorer call as ``export_topk`` and writes its
   rows through the export's own part writer into ``shard-<i>/`` of the staging folder, committed atomically
   (``io.staged_table``), then leaves a receipt ``shard-<i>.json``. A retried (or duplicated) shard replaces
   its own folder and receipt, so its rows can never be there twice. Fault point ``export-shard:<i>`` (see
   ``faults``) sits between the two: rows written, receipt not.
3. ``commit_topk_shards``: checks that every planned shard left a receipt and exactly the part files the
   receipt lists, holding the rows it claims (Parquet footers), then hard-links the parts in shard order into
   the table and commits it with ``_manifest.json`` and ``_SUCCESS`` (``io.staged_table``): a reader sees the
   previous table or the complete new one, never a partial one. Committing the same plan twice is a no-op.

Equality with ``export_topk``: each shard scores whole chunks of the single-process export with the same chunk
size and the scorer's default thread count, so every BLAS call sees the same tile of users. That matters:
OpenBLAS takes another kernel for tiles of a few rows, so a shard that cut a chunk anywhere could change the
last bit of a score. On the same kind of machine (same core count and BLAS), the committed table equals
``export_topk``'s row for row and value for value, in the same order (users by index, then rank); with
``export.write_csv`` the CSV file is byte for byte the same (shards write headerless fragments, the commit
writes the header and then the fragments in shard order). Part files differ only in how rows are cut into
files (each shard starts a new part).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys_embed import faults
from recsys_embed.config import ExportConfig
from recsys_embed.errors import RecsysEmbedError
from recsys_embed.io import atomic_path, is_complete_table, output_errors, staged_table, write_json_atomic
from recsys_embed.serving.ann import searcher
from recsys_embed.serving.export import (
    PART_TEMPLATE,
    ExportResult,
    _item_filters,
    _table_frames,
    _table_schema,
    _write_table,
    item_texts,
    user_sources,
)
from recsys_embed.types import Embeddings

log = logging.getLogger(__name__)

SHARD_TEMPLATE = "shard-{:05d}"
MANIFEST = "_manifest.json"
_NAMES = ("user_id", "item_id")


class ShardError(RecsysEmbedError):
    """A sharded export cannot be committed or a shard cannot run (names the shards and the fix)."""


@dataclass(frozen=True)
class Shard:
    """Users ``start <= index < stop`` (contiguous user indices, whole scoring chunks)."""

    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardPlan:
    """A sharded export of one table.

    Attributes:
        target: the table folder the commit creates (or replaces).
        staging: the hidden folder beside it that collects the shards' folders and receipts.
        token: unique per plan; receipts and the table manifest carry it, so nothing of another plan is used.
        n_users: users of the embeddings (rows of the user map).
        chunk_users: the scoring chunk the plan is cut on (``export.chunk_users``).
        shards: the shards, in user order.
        created: ``time.time()`` when planned (the export's wall time is measured from here).
    """

    target: str
    staging: str
    token: str
    n_users: int
    chunk_users: int
    shards: tuple[Shard, ...]
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (for task results); ``from_dict`` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ShardPlan:
        shards = tuple(Shard(**s) if isinstance(s, dict) else s for s in record["shards"])
        return cls(**{**record, "shards": shards})


@dataclass
class ShardResult:
    """What one shard wrote: ``rows`` rows of ``users`` users (with at least one item) in ``parts``."""

    index: int
    rows: int
    users: int
    parts: list[str]
    seconds: float


def plan_topk_shards(n_users: int, chunk_users: int, n_shards: int, target: str | Path) -> ShardPlan:
    """Cut users ``0..n_users`` into at most ``n_shards`` contiguous shards of whole ``chunk_users`` chunks.

    Chunks are spread as evenly as possible (shard sizes differ by at most one chunk); there are never more
    shards than chunks, and no users gives one empty shard (so the table still gets its schema). Creates the
    staging folder beside ``target``.

    Raises:
        ValueError: ``n_users < 0``, ``chunk_users < 1`` or ``n_shards < 1``.
    """
    if n_users < 0 or chunk_users < 1 or n_shards < 1:
        raise ValueError(
            f"plan_topk_shards: need n_users >= 0, chunk_users >= 1, n_shards >= 1; got {n_users}, {chunk_users}, "
            f"{n_shards} (distributed.shards=0 means 2 x workers)"
        )
    n_chunks = -(-n_users // chunk_users)
    shards: list[Shard] = []
    if n_chunks == 0:
        shards.append(Shard(0, 0, 0))
    else:
        for i, chunks in enumerate(np.array_split(np.arange(n_chunks), min(n_shards, n_chunks))):
            start = int(chunks[0]) * chunk_users
            stop = min((int(chunks[-1]) + 1) * chunk_users, n_users)
            shards.append(Shard(i, start, stop))
    target = Path(target)
    token = uuid.uuid4().hex[:12]
    staging = target.with_name(f".{target.name}.shards-{token}")
    with output_errors(staging, "shard staging folder"):
        staging.mkdir(parents=True)
    log.info("export: %s planned as %d shard(s) of %d users (%d chunks of %d)", target, len(shards), n_users,
             n_chunks, chunk_users)  # fmt: skip
    return ShardPlan(str(target), str(staging), token, n_users, chunk_users, tuple(shards))


def _shard_folder(plan: ShardPlan, index: int) -> Path:
    return Path(plan.staging) / SHARD_TEMPLATE.format(index)


def _receipt_path(plan: ShardPlan, index: int) -> Path:
    return Path(plan.staging) / f"{SHARD_TEMPLATE.format(index)}.json"


def _csv_fragment(plan: ShardPlan, index: int) -> Path:
    return Path(plan.staging) / f"{SHARD_TEMPLATE.format(index)}.csv"  # where export._write_table puts it


def export_topk_shard(
    emb: Embeddings, seen: sp.csr_matrix | None, cfg: ExportConfig, plan: ShardPlan, index: int, run_id: str,
    item_text: pl.DataFrame | None = None,
) -> ShardResult:  # fmt: skip
    """Score shard ``index`` of ``plan`` and write its rows into the plan's staging folder (atomic, idempotent).

    Args:
        emb, seen, cfg, run_id, item_text: as for ``export.export_topk`` (the same for every shard).
        plan: from ``plan_topk_shards``; its staging folder must be visible here (same path as the planner's).
        index: which shard.

    Returns:
        ``ShardResult``; the receipt ``shard-<index>.json`` beside the shard's folder says the same. Once the
        plan is committed, a late duplicate writes nothing and returns what the table's manifest recorded.

    Raises:
        ShardError: the plan does not fit ``emb`` / ``cfg``, or its staging folder is not there.
    """
    t0 = time.perf_counter()
    if not 0 <= index < len(plan.shards):
        raise ShardError(f"shard {index} is not in the plan for '{plan.target}' (it has {len(plan.shards)} shards)")
    shard = plan.shards[index]
    if len(emb.users) != plan.n_users or cfg.chunk_users != plan.chunk_users:
        raise ShardError(
            f"shard {index} of '{plan.target}': the plan was made for {plan.n_users} users in chunks of "
            f"{plan.chunk_users}, but got {len(emb.users)} users and export.chunk_users={cfg.chunk_users}; "
            "run every shard with the embeddings and export config the plan was made from"
        )
    done = _committed(plan)
    if done is not None:  # a late duplicate (Dask recomputing a result lost with a worker): the table is out
        entry = next(e for e in done["shards"] if e["index"] == index)
        log.info("export: shard %d of %s is already committed; nothing to do", index, plan.target)
        return ShardResult(index, entry["rows"], entry["users"], [], 0.0)
    staging = Path(plan.staging)
    if not staging.is_dir():
        raise ShardError(
            f"shard {index} of '{plan.target}': staging folder '{staging}' is not there (the plan was committed or "
            "abandoned, or this worker does not see the planner's files); mount output_root at the same path on "
            "every Dask worker, or re-run the export"
        )
    allow, deny = _item_filters(emb, cfg)
    users = np.arange(shard.start, shard.stop, dtype=np.int64)
    chunks = searcher(cfg.search)(emb, cfg.k, users=users, seen=seen, chunk_users=cfg.chunk_users,
                         allow_items=allow, deny_items=deny)  # fmt: skip
    counted = {"users": 0}
    texts = item_texts(emb.items, item_text)
    frames = _table_frames(chunks, emb.users, emb.items, _NAMES, emb.model, run_id, counted, user_sources(emb),
                           (None, texts))  # fmt: skip
    folder = _shard_folder(plan, index)
    schema = _table_schema(emb.users, emb.items, _NAMES, source=True, texts=(False, texts is not None))
    files, rows = _write_table(frames, schema, folder, cfg.rows_per_file, cfg.write_csv, csv_header=False)
    parts = [Path(f).name for f in files if Path(f).parent == folder]
    result = ShardResult(index, rows, counted["users"], parts, round(time.perf_counter() - t0, 3))
    receipt = {"token": plan.token, "start": shard.start, "stop": shard.stop, "csv": cfg.write_csv, **asdict(result)}
    # fault point: the shard's rows are written and committed, its receipt is not (a rerun must replace them)
    faults.checkpoint(f"export-shard:{index}")
    write_json_atomic(receipt, _receipt_path(plan, index))  # last: a receipt means the shard is complete
    log.info("export: shard %d/%d of %s (users %d..%d): %d rows in %.2f s", index + 1, len(plan.shards),
             Path(plan.target).name, shard.start, shard.stop, rows, result.seconds)  # fmt: skip
    return result


def _check_shards(plan: ShardPlan, write_csv: bool) -> list[tuple[dict[str, Any], list[int]]]:
    """Every shard's receipt and its parts' row counts (Parquet footers); raises ``ShardError`` naming each
    shard that is missing or does not match its receipt."""
    problems: list[str] = []
    checked: list[tuple[dict[str, Any], list[int]]] = []
    for shard in plan.shards:
        i, what = shard.index, f"shard {shard.index} (users {shard.start}..{shard.stop})"
        path = _receipt_path(plan, i)
        if not path.exists():
            problems.append(f"{what}: no receipt, it has not finished")
            continue
        receipt: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if (receipt["token"], receipt["start"], receipt["stop"]) != (plan.token, shard.start, shard.stop):
            problems.append(f"{what}: its receipt belongs to another plan")
            continue
        folder = _shard_folder(plan, i)
        if not is_complete_table(folder):
            problems.append(f"{what}: folder '{folder}' is not committed")
            continue
        on_disk = sorted(p.name for p in folder.glob("*.parquet"))
        if on_disk != sorted(receipt["parts"]):
            problems.append(f"{what}: parts on disk {on_disk} differ from its receipt {receipt['parts']}")
            continue
        counts = [pq.read_metadata(folder / p).num_rows for p in receipt["parts"]]
        if sum(counts) != receipt["rows"]:
            problems.append(f"{what}: its parts hold {sum(counts)} rows, its receipt says {receipt['rows']}")
            continue
        if write_csv and not (receipt["csv"] and _csv_fragment(plan, i).exists()):
            problems.append(f"{what}: no CSV fragment, but export.write_csv is on")
            continue
        checked.append((receipt, counts))
    if problems:
        raise ShardError(
            f"cannot commit top-k table '{plan.target}': {len(problems)} of {len(plan.shards)} shards are missing "
            f"or incomplete ({'; '.join(problems)}); re-run those shards with the same plan (export_topk_shard), "
            "then commit again, or re-run the export"
        )
    return checked


def _link(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst`` (the shard keeps its copy, so a retried commit still finds it); copies where
    the filesystem has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _committed(plan: ShardPlan) -> dict[str, Any] | None:
    manifest = Path(plan.target) / MANIFEST
    if not (is_complete_table(plan.target) and manifest.exists()):
        return None
    record: dict[str, Any] = json.loads(manifest.read_text(encoding="utf-8"))
    return record if record.get("token") == plan.token else None


def commit_topk_shards(plan: ShardPlan, cfg: ExportConfig) -> ExportResult:
    """Check every shard of ``plan`` and commit them, in shard order, as the table ``plan.target``.

    The table holds the shards' non-empty parts renumbered ``part-00000.parquet``, ... (one empty part when the
    table is empty, so readers see its schema) and ``_manifest.json`` (token, rows, users, shards). With
    ``cfg.write_csv``, ``<table>.csv`` is the header and the shards' fragments, replaced after the table commits.
    The staging folder is removed afterwards. Idempotent: a plan that is already committed is not redone.

    Raises:
        ShardError: a shard is missing or does not match its receipt (nothing is committed then).
    """
    target, staging = Path(plan.target), Path(plan.staging)
    done = _committed(plan)
    if done is not None:
        log.info("export: %s is already committed from this plan", target)
        shutil.rmtree(staging, ignore_errors=True)
        return ExportResult(str(target), done["rows"], done["users"], done["files"], time.time() - plan.created)
    checked = _check_shards(plan, cfg.write_csv)
    rows = sum(r["rows"] for r, _ in checked)
    keep = [(r, part) for r, counts in checked for part, n in zip(r["parts"], counts, strict=True) if n]
    if not keep:  # an empty table: one empty part (every shard writes at least one) carries the schema
        keep = [(checked[0][0], checked[0][0]["parts"][0])]
    csv_path = target.with_name(f"{target.name}.csv")
    names = [PART_TEMPLATE.format(j) for j in range(len(keep))]
    with output_errors(target, "export table"), contextlib.ExitStack() as stack:
        if cfg.write_csv:
            tmp_csv = stack.enter_context(atomic_path(csv_path))  # entered first: replaced after the table commits
            csv = stack.enter_context(open(tmp_csv, "wb"))
            first = _shard_folder(plan, keep[0][0]["index"]) / keep[0][1]
            pl.DataFrame(schema=pl.read_parquet_schema(first)).write_csv(csv, include_header=True)
            for receipt, _ in checked:
                with open(_csv_fragment(plan, receipt["index"]), "rb") as fragment:
                    shutil.copyfileobj(fragment, csv)
        stage = stack.enter_context(staged_table(target))
        for (receipt, part), name in zip(keep, names, strict=True):
            _link(_shard_folder(plan, receipt["index"]) / part, stage / name)
        files = [str(target / n) for n in names] + ([str(csv_path)] if cfg.write_csv else [])
        manifest = {
            "token": plan.token,
            "rows": rows,
            "users": sum(r["users"] for r, _ in checked),
            "files": files,
            "shards": [{k: r[k] for k in ("index", "start", "stop", "rows", "users", "seconds")} for r, _ in checked],
        }
        write_json_atomic(manifest, stage / MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)
    seconds = time.time() - plan.created
    log.info("export: committed %s from %d shards (%d rows in %d part files%s, %.1f s since planned)", target,
             len(checked), rows, len(names), ", + CSV" if cfg.write_csv else "", seconds)  # fmt: skip
    return ExportResult(str(target), rows, manifest["users"], files, seconds)
