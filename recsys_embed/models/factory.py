"""The model families behind one factory: every trainer takes the train ``Interactions`` and its own config
slice and returns ``Embeddings``, so evaluation and export never care which model made them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import scipy.sparse as sp

from recsys_embed.config import EvalConfig, ModelsConfig
from recsys_embed.types import Embeddings, Interactions

log = logging.getLogger(__name__)

OnMetrics = Callable[[dict[str, float], int], None]

# Order matters only for display: the baselines first (popularity, then EASE, the strong linear one), so every
# table starts with the bars to beat.
MODEL_NAMES = ("popularity", "ease", "als", "bpr", "two_tower")


def enabled_models(cfg: ModelsConfig) -> list[str]:
    """Names of the models switched on in config, in display order."""
    return [name for name in MODEL_NAMES if getattr(cfg, name).enabled]


def runnable_models(
    cfg: ModelsConfig, n_users: int, n_items: int, warn: bool = True, refit_shape: tuple[int, int] | None = None
) -> list[str]:
    """``enabled_models`` less those that cannot run: EASE above its item or memory budget on the (n_users x
    n_items) train matrix, or on ``refit_shape`` (users x items of every kept event: the production refit's
    catalog, checked before any work so that a refit never fails after evaluation), is skipped with a warning
    (``warn``) naming the numbers and the fix, and the run goes on."""
    from recsys_embed.models.ease import fits

    names = enabled_models(cfg)
    if "ease" in names:
        reason = fits(n_users, n_items, cfg.ease)
        if reason is None and refit_shape is not None:
            reason = fits(*refit_shape, cfg.ease)
            reason = reason and f"{reason} (for the refit on every kept event)"
        if reason is not None:
            if warn:
                log.warning("%s; skipping it, the other models run", reason)
            names.remove("ease")
    return names


def refit_shape(split: Any) -> tuple[int, int] | None:
    """(users, items) of every kept event, as a split record states them (``full_users`` / ``full_items``: an upper
    bound of the refit's matrix); None for a record without them."""
    users, items = split.get("full_users"), split.get("full_items")
    return (int(users), int(items)) if users is not None and items is not None else None


def train_model(
    name: str,
    train: Interactions,
    cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    val_targets: sp.csr_matrix | None = None,
    on_metrics: OnMetrics | None = None,
    item_text: pl.DataFrame | None = None,
    lightning_logger: Any | None = None,
    warm_start_from: str | Path | None = None,
) -> Embeddings:
    """Train one model by name. ``val_targets`` (users x items of the train maps) drives early stopping.

    ``item_text`` (item_id, text) and ``lightning_logger`` are used by the two-tower model only.
    ``warm_start_from``: an earlier run's models folder (``<run>/models``, holding ``<name>/embeddings.json``);
    with ``cfg.warm_start`` ALS, BPR and the two-tower model start from that run's model (``warm_start_source``).
    The model's ``info`` records ``warm_start`` and, when a folder was given, ``warm_start_from``.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
    if name == "popularity":
        from recsys_embed.models.popularity import train_popularity

        return train_popularity(train)  # counts: nothing to warm-start
    if name == "ease":
        from recsys_embed.models.ease import train_ease

        return train_ease(train, cfg.ease)  # closed form: nothing to warm-start; lambda is tuned by the search
    source = warm_start_source(name, warm_start_from) if cfg.warm_start else None
    if name in ("als", "bpr"):
        from recsys_embed.models.mf import train_als, train_bpr
        from recsys_embed.store import load_embeddings

        trainer = train_als if name == "als" else train_bpr
        previous = load_embeddings(source) if source is not None else None
        emb = trainer(train, getattr(cfg, name), val_targets, eval_cfg.ks, eval_cfg.primary_metric, on_metrics,
                      warm_start=previous)  # fmt: skip
    else:
        from recsys_embed.models.two_tower.train import train_two_tower

        emb = train_two_tower(
            train,
            cfg.two_tower,
            val_targets,
            eval_cfg.ks,
            item_text=item_text,
            on_metrics=on_metrics,
            lightning_logger=lightning_logger,
            warm_start=source,
        )
    if cfg.warm_start and warm_start_from is not None:
        emb.info["warm_start_from"] = str(source) if source is not None else None
        if source is None:
            emb.info["warm_start_skipped"] = f"no finished {name} model under '{warm_start_from}'"
    return emb


def warm_start_source(name: str, models_dir: str | Path | None) -> Path | None:
    """What model ``name`` of an earlier run left to start from, or None when it left nothing usable.

    Args:
        name: "als" / "bpr" (their saved ``Embeddings`` folder) or "two_tower" (its saved encoder, found through
            the embeddings' ``info.artifact_dir``).
        models_dir: the earlier run's models folder (``stages.run_train``'s ``out_dir``).
    """
    if models_dir is None or name in ("popularity", "ease"):
        return None
    folder = Path(models_dir) / name
    meta_file = folder / "embeddings.json"
    if not meta_file.exists():
        log.info("%s: no earlier model in '%s'; training from a random start", name, folder)
        return None
    if name != "two_tower":
        return folder
    artifact = json.loads(meta_file.read_text(encoding="utf-8")).get("info", {}).get("artifact_dir")
    from recsys_embed.models.two_tower.encoder import WEIGHTS_FILE

    if artifact and (Path(artifact) / WEIGHTS_FILE).exists():
        return Path(artifact)
    log.info("two_tower: the earlier run's encoder (%s) is gone; training from a random start", artifact)
    return None
