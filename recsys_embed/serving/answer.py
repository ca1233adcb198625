"""Answers for one user or one item from a finished run's outputs (``recommend`` / ``similar``).

Reads the committed export tables and embeddings named in the run manifest; shows item descriptions
where the log had them. ``--explain`` shows which history items drove each recommendation: implicit's
own ``explain`` for ALS, cosine similarity to the history items for every other model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_embed.errors import RecsysEmbedError
from recsys_embed.io import read_table
from recsys_embed.store import load_csr, load_embeddings
from recsys_embed.types import Embeddings


def _model(manifest: dict[str, Any], model: str | None) -> str:
    name = model or manifest.get("best_model")
    if not name or name not in manifest["exports"]:
        raise RecsysEmbedError(f"model {name!r} is not in the latest run; choose one of {list(manifest['exports'])}")
    return str(name)


def _descriptions(manifest: dict[str, Any]) -> dict[str, str]:
    path = manifest.get("item_text")
    if not path or not Path(path).exists():
        return {}
    frame = pl.read_parquet(path)
    return {str(a): str(b) for a, b in frame.select(frame.columns[:2]).iter_rows()}


def _cast_like(value: str, series: pl.Series) -> Any:
    if series.dtype.is_integer():
        try:
            return int(value)
        except ValueError:
            raise RecsysEmbedError(f"ID {value!r} is not an integer, but this run's IDs are") from None
    return value


def _rows_for(table_path: str, key: str, value: str, k: int, not_found: str) -> tuple[Any, pl.DataFrame]:
    """The first ``k`` rows (by rank) of a committed export table whose ``key`` equals ``value`` (cast to the
    table's ID type); raises ``RecsysEmbedError(not_found)`` when there are none."""
    table = read_table(table_path)
    typed = _cast_like(value, table[key])
    rows = table.filter(pl.col(key) == typed).sort("rank").head(k)
    if rows.height == 0:
        raise RecsysEmbedError(not_found)
    return typed, rows


def recommend_for_user(manifest: dict[str, Any], user: str, k: int, model: str | None, explain: bool) -> str:
    name = _model(manifest, model)
    uid, rows = _rows_for(
        manifest["exports"][name]["topk"],
        "user_id",
        user,
        k,
        f"user {user!r} has no recommendations in the latest run (unknown or cold user)",
    )
    desc = _descriptions(manifest)
    lines = [f"Top {rows.height} for user {user} ({name}):"]
    reasons: dict[Any, list[tuple[Any, float]]] = {}
    if explain:
        shipped = manifest["exports"][name]
        emb = load_embeddings(shipped.get("model_embeddings") or shipped["embeddings"])  # the model, not the fallback
        fit = shipped.get("fit_matrix") or str(Path(manifest["run_dir"]) / "split" / "train.npz")
        reasons = explain_items(emb, load_csr(fit), uid, rows["item_id"].to_list(), manifest)
    for r in rows.iter_rows(named=True):
        lines.append(f"  {r['rank']:>2}. {r['item_id']!s:<12} {r['score']:8.4f}  {desc.get(str(r['item_id']), '')}")
        for hist_item, contrib in reasons.get(r["item_id"], []):
            lines.append(f"        because of {hist_item!s:<12} {contrib:+.4f}  {desc.get(str(hist_item), '')}")
    return "\n".join(lines)


def explain_items(
    emb: Embeddings, seen: Any, user_id: Any, items: list[Any], manifest: dict[str, Any], top: int = 3
) -> dict[Any, list[tuple[Any, float]]]:
    """For each recommended item, the ``top`` history items that contributed most."""
    u = emb.users.lookup(pl.Series([user_id]))[0]
    if u is None or u >= seen.shape[0]:  # a fallback user: popularity, nothing in their history to point at
        return {}
    row = seen[int(u)]
    hist = row.indices
    if len(hist) == 0:
        return {}
    rec_idx = emb.items.lookup(pl.Series(items)).to_numpy()
    out: dict[Any, list[tuple[Any, float]]] = {}
    if emb.model == "als":
        from implicit.cpu.als import AlternatingLeastSquares

        info = manifest["exports"]["als"].get("info", {})
        als = AlternatingLeastSquares(
            factors=emb.dim, regularization=float(info.get("regularization", 0.05)), alpha=float(info.get("alpha", 1.0))
        )
        als.user_factors, als.item_factors = emb.user_vectors, emb.item_vectors
        for item, i in zip(items, rec_idx, strict=True):
            _, contributions, _ = als.explain(int(u), seen, int(i), N=top)
            out[item] = [(emb.items.ids[int(j)], float(c)) for j, c in contributions]
        return out
    _, ivec = Embeddings(
        emb.user_vectors, emb.item_vectors, emb.users, emb.items, emb.model, "cosine"
    ).scoring_vectors()
    sims = ivec[rec_idx] @ ivec[hist].T  # (n_rec, n_hist)
    for r, item in enumerate(items):
        order = np.argsort(-sims[r])[:top]
        out[item] = [(emb.items.ids[int(hist[j])], float(sims[r, j])) for j in order]
    return out


def similar_to_item(manifest: dict[str, Any], item: str, k: int, model: str | None) -> str:
    name = _model(manifest, model)
    path = manifest["exports"][name].get("similar_items")
    if not path:
        raise RecsysEmbedError(f"model {name!r} has no similar-items table; pass --model als (or another MF model)")
    iid, rows = _rows_for(path, "item_id", item, k, f"item {item!r} is not in the latest run's catalog")
    desc = _descriptions(manifest)
    lines = [f"Items similar to {item} {desc.get(str(iid), '')} ({name}):"]
    for r in rows.iter_rows(named=True):
        lines.append(
            f"  {r['rank']:>2}. {r['similar_item_id']!s:<12} {r['score']:6.3f}  "
            f"{desc.get(str(r['similar_item_id']), '')}"
        )
    return "\n".join(lines)
