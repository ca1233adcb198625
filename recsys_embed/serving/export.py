"""Top-k and similar-item export tables: chunked, partitioned Parquet, committed atomically.

Both tables are written chunk by chunk from the shared scorer (``recsys_embed.evaluation.topk.iter_topk``) into
``part-00000.parquet``, ``part-00001.parquet``, ... inside ``io.staged_table``: a reader sees the previous
table or the complete new one (with ``_SUCCESS``), never a partial one. Memory is bounded by one scoring
chunk plus one part file (``ExportConfig.rows_per_file`` rows), not by the number of users.

Tables (one row per recommendation, original IDs in their original dtype):

- ``topk``: ``user_id``, ``rank`` (Int32, 1..k), ``item_id``, [``item_text``], ``score`` (Float32), ``source``
  ("model", or "fallback" for a user the model cannot serve: the popularity ranking,
  ``recsys_embed.serving.coverage``), ``model``, ``run_id``.
- ``similar_items``: ``item_id``, [``item_text``], ``rank``, ``similar_item_id``, [``similar_item_text``],
  ``score`` (cosine), ``model``, ``run_id``.

The ``*_text`` columns (String, null for an item without one) are there when the log maps an item text
(``ingest.columns.item_text``): the ingest's ``item_text.parquet`` (``item_id``, ``text``) passed as
``item_text``. They are looked up by item index per chunk, so a table stays readable without a join.

A user (or item) with fewer than k admissible items (most of the catalog already seen, a short allow list)
gets fewer rows: slots without an admissible item are dropped, never filled with junk.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_embed.config import ExportConfig
from recsys_embed.errors import DataWarning
from recsys_embed.evaluation.topk import TopK, iter_topk
from recsys_embed.io import (
    SUCCESS_MARKER,
    atomic_path,
    inside,
    is_complete_table,
    output_errors,
    read_table,
    staged_table,
)
from recsys_embed.progress import track
from recsys_embed.serving.ann import searcher
from recsys_embed.serving.coverage import fallback_mask
from recsys_embed.types import Embeddings, IdMap

log = logging.getLogger(__name__)

PART_TEMPLATE = "part-{:05d}.parquet"


@dataclass
class ExportResult:
    """What one export wrote.

    Attributes:
        path: the committed table folder.
        rows: rows in the table.
        users: users (items, for similar items) with at least one row.
        files: the part files (final paths, in order), then the CSV file if one was written.
        seconds: wall time of the whole export.
    """

    path: str
    rows: int
    users: int
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _item_indices(items: IdMap, ids: list[str], what: str) -> np.ndarray:
    """Indices of the original item IDs ``ids`` (config strings, cast to the map's dtype); unknown IDs warn."""
    if not ids:
        return np.empty(0, dtype=np.int64)
    idx = items.lookup(pl.Series(what, ids, dtype=pl.String))
    unknown = [ids[i] for i in np.flatnonzero(idx.is_null().to_numpy())]
    if unknown:
        shown = ", ".join(repr(x) for x in unknown[:10])
        if len(unknown) > 10:
            shown += f" and {len(unknown) - 10} more"
        warnings.warn(
            f"export.{what}: {len(unknown)} of {len(ids)} item IDs are not in the model's item map ({shown}); "
            f"they are ignored. Check the IDs against the training data (item IDs are {items.dtype})",
            DataWarning,
            stacklevel=4,  # the caller of export_topk / export_similar_items
        )
    return np.unique(idx.drop_nulls().to_numpy().astype(np.int64))


def _item_filters(emb: Embeddings, cfg: ExportConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    allow = None if cfg.allow_items is None else _item_indices(emb.items, cfg.allow_items, "allow_items")
    deny = _item_indices(emb.items, cfg.deny_items, "deny_items")
    if allow is not None and len(np.setdiff1d(allow, deny)) == 0:
        warnings.warn(
            "export: no item is admissible (allow_items minus deny_items is empty), so the table will be empty; "
            "fix export.allow_items / export.deny_items",
            DataWarning,
            stacklevel=3,
        )
    return allow, (deny if len(deny) else None)


class _PartWriter:
    """Accumulates frames and writes ``rows_per_file``-row Parquet parts (plus optional CSV) into ``folder``."""

    def __init__(
        self, folder: Path, schema: pl.Schema, rows_per_file: int, csv: IO[bytes] | None, csv_header: bool = True
    ) -> None:
        self.folder = folder
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.csv = csv
        self.csv_header = csv_header  # still to be written (False: a headerless CSV fragment, e.g. one shard's)
        self.pending: list[pl.DataFrame] = []
        self.n_pending = 0
        self.parts: list[str] = []
        self.rows = 0

    def add(self, frame: pl.DataFrame) -> None:
        if frame.height == 0:
            return
        if self.csv is not None:
            frame.write_csv(self.csv, include_header=self.csv_header)
            self.csv_header = False
        self.pending.append(frame)
        self.n_pending += frame.height
        if self.n_pending >= self.rows_per_file:
            buf = pl.concat(self.pending, how="vertical", rechunk=False)
            n_full = buf.height // self.rows_per_file
            for j in range(n_full):
                self._write(buf.slice(j * self.rows_per_file, self.rows_per_file))
            rest = buf.slice(n_full * self.rows_per_file)
            self.pending = [rest] if rest.height else []
            self.n_pending = rest.height

    def finish(self) -> None:
        """Write the remainder; an empty table still gets one (empty) part so that readers see its schema."""
        if self.n_pending or not self.parts:
            self._write(pl.concat(self.pending, how="vertical") if self.pending else pl.DataFrame(schema=self.schema))
        if self.csv is not None and self.csv_header:
            pl.DataFrame(schema=self.schema).write_csv(self.csv, include_header=True)
        self.pending, self.n_pending = [], 0

    def _write(self, frame: pl.DataFrame) -> None:
        name = PART_TEMPLATE.format(len(self.parts))
        _write_part(frame, self.folder / name)
        self.parts.append(name)
        self.rows += frame.height
        log.debug("export: wrote %s (%d rows)", name, frame.height)


def _write_part(frame: pl.DataFrame, path: Path) -> None:
    """One Parquet part (zstd, with statistics); the staging folder makes it visible only on commit."""
    frame.write_parquet(path, compression="zstd", statistics=True)


def _write_table(
    frames: Iterator[pl.DataFrame],
    schema: pl.Schema,
    target: Path,
    rows_per_file: int,
    write_csv: bool,
    csv_header: bool = True,
) -> tuple[list[str], int]:
    """Stream ``frames`` into a committed table at ``target`` (and ``target.csv``, with a header line unless
    ``csv_header`` is False); returns (files, rows)."""
    csv_path = target.with_name(f"{target.name}.csv")
    # a full disk, a quota, a denied permission: one OutputError naming the table and the fix; the previous
    # table and CSV stay as they were (staging folder and temporary CSV are removed on the way out)
    with output_errors(target, "export table"), contextlib.ExitStack() as stack:
        csv: IO[bytes] | None = None
        if write_csv:
            tmp_csv = stack.enter_context(atomic_path(csv_path))  # entered first: replaced after the table commits
            csv = stack.enter_context(open(tmp_csv, "wb"))
        stage = stack.enter_context(staged_table(target))
        writer = _PartWriter(stage, schema, rows_per_file, csv, csv_header)
        for frame in frames:
            writer.add(frame)
        writer.finish()
        # leaving the stack (LIFO): the table commits, the CSV closes, then the CSV replaces the old one;
        # on an error the staging folder and the temporary CSV are removed and the old outputs stay.
    files = [str(target / p) for p in writer.parts] + ([str(csv_path)] if write_csv else [])
    log.info("export: committed %s (%d rows in %d part files%s)", target, writer.rows, len(writer.parts),
             ", + CSV" if write_csv else "")  # fmt: skip
    return files, writer.rows


SOURCES = ("model", "fallback")


def item_texts(items: IdMap, item_text: pl.DataFrame | None) -> pl.Series | None:
    """One text per item index of ``items`` (null where the log has none), or None without ``item_text``.

    Args:
        items: the model's item map.
        item_text: ``item_id``, ``text`` (the ingest's ``item_text.parquet``; other columns ignored). Its IDs are
            matched to the map's (cast to the map's dtype); unknown ones are ignored.
    """
    if item_text is None:
        return None
    if "item_id" not in item_text.columns or "text" not in item_text.columns:
        raise ValueError(f"item_text lacks column 'item_id' or 'text' (found: {item_text.columns}); pass the "
                         "ingest's item_text.parquet")  # fmt: skip
    known = pl.DataFrame({"index": items.lookup(item_text["item_id"]), "text": item_text["text"].cast(pl.String)})
    known = known.drop_nulls("index")  # IDs the model's map does not hold
    texts = np.full(len(items), None, dtype=object)
    texts[known["index"].to_numpy()] = known["text"].to_numpy()
    return pl.Series("text", texts, dtype=pl.String)


def _text_name(id_column: str) -> str:
    """``item_id`` -> ``item_text``; ``similar_item_id`` -> ``similar_item_text``."""
    return f"{id_column.removesuffix('_id')}_text"


def _rows_of(
    chunk: TopK,
    emb_rows: IdMap,
    emb_items: IdMap,
    names: tuple[str, str],
    fallback: np.ndarray | None = None,
    texts: tuple[pl.Series | None, pl.Series | None] = (None, None),
) -> tuple[pl.DataFrame, int]:
    """One chunk as table rows (original IDs) plus the number of rows (users) that got at least one item.

    With ``fallback`` (bool per row index) the rows get a ``source`` column: "fallback" or "model". ``texts``:
    one text per row index and per item index (``item_texts``), each written beside its ID column when given.
    """
    n, k = chunk.items.shape
    ok = chunk.items >= 0
    flat_ok = ok.ravel()
    row_idx = np.repeat(chunk.users, k)[flat_ok]
    item_idx = chunk.items.ravel()[flat_ok]
    row_text, item_text = texts
    columns = [
        emb_rows.decode(row_idx).rename(names[0]),
        *([row_text.gather(row_idx).rename(_text_name(names[0]))] if row_text is not None else []),
        pl.Series("rank", np.tile(np.arange(1, k + 1, dtype=np.int32), n)[flat_ok], dtype=pl.Int32),
        emb_items.decode(item_idx).rename(names[1]),
        *([item_text.gather(item_idx).rename(_text_name(names[1]))] if item_text is not None else []),
        pl.Series("score", chunk.scores.ravel()[flat_ok], dtype=pl.Float32),
    ]
    if fallback is not None:
        codes = fallback[row_idx].astype(np.uint32)
        columns.append(pl.Series("source", codes).replace_strict(range(len(SOURCES)), SOURCES, return_dtype=pl.String))
    return pl.DataFrame(columns), int(ok[:, 0].sum())  # valid slots come first: slot 0 tells whether a row has any


def _table_frames(
    chunks: Iterator[TopK],
    rows_map: IdMap,
    items_map: IdMap,
    names: tuple[str, str],
    model: str,
    run_id: str,
    counted: dict[str, int],
    fallback: np.ndarray | None = None,
    texts: tuple[pl.Series | None, pl.Series | None] = (None, None),
) -> Iterator[pl.DataFrame]:
    """The table rows of each scored chunk; adds the rows (users) with at least one item to ``counted["users"]``."""
    for chunk in chunks:
        frame, n_users = _rows_of(chunk, rows_map, items_map, names, fallback, texts)
        counted["users"] += n_users
        yield frame.with_columns(pl.lit(model, dtype=pl.String).alias("model"),
                                 pl.lit(run_id, dtype=pl.String).alias("run_id"))  # fmt: skip


def _table_schema(
    rows_map: IdMap,
    items_map: IdMap,
    names: tuple[str, str],
    source: bool = False,
    texts: tuple[bool, bool] = (False, False),
) -> pl.Schema:
    """The table's columns in order; ``texts``: whether each ID column has its ``*_text`` column beside it."""
    columns: list[tuple[str, pl.DataType]] = [
        (names[0], rows_map.dtype), *([(_text_name(names[0]), pl.String())] if texts[0] else []),
        ("rank", pl.Int32()),
        (names[1], items_map.dtype), *([(_text_name(names[1]), pl.String())] if texts[1] else []),
        ("score", pl.Float32()),
        *([("source", pl.String())] if source else []), ("model", pl.String()), ("run_id", pl.String()),
    ]  # fmt: skip
    return pl.Schema(columns)


def user_sources(emb: Embeddings) -> np.ndarray:
    """(n_users,) bool, True for users served by the popularity fallback (``coverage.fallback_mask``; all False
    for embeddings without a fallback): the top-k table's ``source`` column."""
    mask = fallback_mask(emb)
    return np.zeros(len(emb.users), dtype=bool) if mask is None else mask


def _export(
    chunks: Iterator[TopK],
    rows_map: IdMap,
    items_map: IdMap,
    names: tuple[str, str],
    model: str,
    run_id: str,
    cfg: ExportConfig,
    target: Path,
    t0: float,
    n_rows: int = 0,
    fallback: np.ndarray | None = None,
    texts: tuple[pl.Series | None, pl.Series | None] = (None, None),
) -> ExportResult:
    counted = {"users": 0}
    n_chunks = -(-n_rows // cfg.chunk_users) if n_rows else None  # the scorer yields chunk_users rows at a time
    # closing(): a failed write ends the progress bar at once, not when the generator is collected
    with contextlib.closing(track(chunks, f"export {target.name} ({model})", n_chunks, "chunks")) as tracked:
        frames = _table_frames(tracked, rows_map, items_map, names, model, run_id, counted, fallback, texts)
        schema = _table_schema(rows_map, items_map, names, source=fallback is not None,
                               texts=(texts[0] is not None, texts[1] is not None))  # fmt: skip
        files, rows = _write_table(frames, schema, target, cfg.rows_per_file, cfg.write_csv)
    return ExportResult(path=str(target), rows=rows, users=counted["users"], files=files,
                        seconds=time.perf_counter() - t0)  # fmt: skip


def export_topk(
    emb: Embeddings,
    seen: sp.csr_matrix | None,
    cfg: ExportConfig,
    out_dir: Path,
    run_id: str,
    users: np.ndarray | None = None,
    name: str = "topk",
    item_text: pl.DataFrame | None = None,
) -> ExportResult:
    """Write the top-``cfg.k`` items of every user (or of ``users``) as the committed table ``out_dir/name``.

    Args:
        emb: any model's embeddings (scored by ``emb.scoring``).
        seen: CSR (n_users x n_items) of train interactions; its stored entries are never recommended.
            None recommends seen items too.
        cfg: ``k``, ``chunk_users``, ``rows_per_file``, ``write_csv``, ``allow_items`` / ``deny_items`` (original
            item IDs as strings; unknown ones raise a ``DataWarning`` and are ignored).
        out_dir: folder that receives the table folder ``name`` (and ``name.csv`` when ``cfg.write_csv``).
        run_id: written to every row (which run produced the recommendation).
        users: user indices (not original IDs) to export, each at most once; default all users.
        name: the table folder's name.
        item_text: ``item_id``, ``text`` (the ingest's ``item_text.parquet``): adds the ``item_text`` column.

    Returns:
        ``ExportResult``. Columns: ``user_id`` (original dtype), ``rank`` Int32 1..k, ``item_id`` (original dtype),
        ``item_text`` (String, with ``item_text`` only), ``score`` Float32 (non-increasing with rank), ``source``
        (model | fallback), ``model``, ``run_id``.
        A user with fewer than k admissible
        items has fewer rows; a user with none has no rows.
    """
    t0 = time.perf_counter()
    if users is not None:
        users = np.asarray(users, dtype=np.int64).ravel()
        if len(np.unique(users)) != len(users):
            raise ValueError("export_topk: users holds duplicate indices; pass each user index once (np.unique)")
    allow, deny = _item_filters(emb, cfg)
    chunks = searcher(cfg.search)(emb, cfg.k, users=users, seen=seen, chunk_users=cfg.chunk_users,
                         allow_items=allow, deny_items=deny)  # fmt: skip
    n_users = len(emb.users) if users is None else len(users)
    log.info("export: %s top-%d for %d users of model %s", name, cfg.k, n_users, emb.model)
    return _export(chunks, emb.users, emb.items, ("user_id", "item_id"), emb.model, run_id, cfg,
                   inside(out_dir, name), t0, n_users, user_sources(emb),
                   (None, item_texts(emb.items, item_text)))  # fmt: skip


def export_similar_items(
    emb: Embeddings, cfg: ExportConfig, out_dir: Path, run_id: str, name: str = "similar_items",
    item_text: pl.DataFrame | None = None,
) -> ExportResult:  # fmt: skip
    """Write each item's top-``cfg.similar_k`` most similar items (cosine of item vectors) as ``out_dir/name``.

    The item itself is excluded; ``cfg.allow_items`` / ``cfg.deny_items`` restrict which items may appear as
    *similar* items (every item still gets its row set). Scoring reuses ``iter_topk`` with the items as the
    "users" and an identity ``seen`` matrix, so it shares the top-k scorer's memory bound and tie rule.

    ``item_text`` (``item_id``, ``text``) adds ``item_text`` and ``similar_item_text`` beside the two IDs.

    Returns:
        ``ExportResult`` (``users`` counts items with at least one row). Columns: ``item_id``, [``item_text``],
        ``rank`` Int32, ``similar_item_id``, [``similar_item_text``], ``score`` Float32 cosine in [-1, 1],
        ``model``, ``run_id``.
    """
    t0 = time.perf_counter()
    n_items = len(emb.items)
    items_as_users = Embeddings(
        user_vectors=emb.item_vectors,
        item_vectors=emb.item_vectors,
        users=emb.items,
        items=emb.items,
        model=emb.model,
        scoring="cosine",
    )
    self_pairs = sp.identity(n_items, dtype=np.float32, format="csr")
    allow, deny = _item_filters(emb, cfg)
    chunks = iter_topk(items_as_users, cfg.similar_k, seen=self_pairs, chunk_users=cfg.chunk_users,
                       allow_items=allow, deny_items=deny)  # fmt: skip
    log.info("export: %s top-%d for %d items of model %s", name, cfg.similar_k, n_items, emb.model)
    texts = item_texts(emb.items, item_text)
    return _export(chunks, emb.items, emb.items, ("item_id", "similar_item_id"), emb.model, run_id, cfg,
                   inside(out_dir, name), t0, n_items, None, (texts, texts))  # fmt: skip


def read_export(path: str | Path) -> pl.DataFrame:
    """Read a committed export table (all parts, in order).

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a table folder without ``_SUCCESS`` (not committed).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"export '{p}' does not exist; run the export stage first (recsys-embed run)")
    if p.is_dir() and not is_complete_table(p):
        raise FileNotFoundError(
            f"export '{p}' has no {SUCCESS_MARKER} marker: it was not committed (its writer failed or is still "
            "running); re-run the export and read it after it finishes"
        )
    return read_table(p)
