"""Persisting the contracts between stages: sparse matrices, ID maps and ``Embeddings``.

Stages hand each other *paths*, never big frames, so every intermediate has one on-disk format here.
Embeddings are Parquet (``id`` in the original dtype + ``vector`` as a fixed-size float32 array), so any
Parquet reader downstream can load them without recsys-embed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_embed.io import atomic_path, write_json_atomic, write_parquet_atomic
from recsys_embed.types import Embeddings, IdMap


def save_csr(matrix: sp.csr_matrix, path: str | Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        sp.save_npz(fh, sp.csr_matrix(matrix), compressed=False)
    return Path(path)


def load_csr(path: str | Path) -> sp.csr_matrix:
    return sp.csr_matrix(sp.load_npz(path))


def _vectors_frame(ids: pl.Series, vectors: np.ndarray) -> pl.DataFrame:
    d = vectors.shape[1]
    vec = pl.Series("vector", vectors.astype(np.float32), dtype=pl.Array(pl.Float32, d))
    return pl.DataFrame([ids.rename("id"), vec])


def save_embeddings(emb: Embeddings, folder: str | Path) -> Path:
    """Write ``user_embeddings.parquet``, ``item_embeddings.parquet`` and ``embeddings.json`` (meta).

    Row ``i`` of each Parquet file is index ``i`` of the ID map, so the files double as the ID maps.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(_vectors_frame(emb.users.ids, emb.user_vectors), folder / "user_embeddings.parquet")
    write_parquet_atomic(_vectors_frame(emb.items.ids, emb.item_vectors), folder / "item_embeddings.parquet")
    meta = {"model": emb.model, "scoring": emb.scoring, "dim": emb.dim, "info": _jsonable(emb.info)}
    write_json_atomic(meta, folder / "embeddings.json")
    return folder


def load_embeddings(folder: str | Path) -> Embeddings:
    """Inverse of ``save_embeddings``."""
    folder = Path(folder)
    meta = json.loads((folder / "embeddings.json").read_text(encoding="utf-8"))
    users = pl.read_parquet(folder / "user_embeddings.parquet")
    items = pl.read_parquet(folder / "item_embeddings.parquet")

    def _vectors(frame: pl.DataFrame) -> np.ndarray:
        if frame.height == 0:
            return np.zeros((0, int(meta["dim"])), dtype=np.float32)
        return np.asarray(frame["vector"].to_numpy(), dtype=np.float32).reshape(frame.height, -1)

    return Embeddings(
        user_vectors=_vectors(users),
        item_vectors=_vectors(items),
        users=IdMap(users["id"]),
        items=IdMap(items["id"]),
        model=meta["model"],
        scoring=meta["scoring"],
        info=meta.get("info", {}),
    )


def _jsonable(obj: object) -> object:
    """Drop what JSON cannot hold (numpy scalars become Python numbers)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return None
    return obj
