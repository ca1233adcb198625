"""The model families behind one factory: every trainer takes the train ``Interactions`` and its own config
slice and returns ``Embeddings``, so evaluation and export never care which model made them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
import scipy.sparse as sp

from recsys_embed.config import EvalConfig, ModelsConfig
from recsys_embed.types import Embeddings, Interactions

OnMetrics = Callable[[dict[str, float], int], None]

# Order matters only for display: the baseline first, so every table starts with the bar to beat.
MODEL_NAMES = ("popularity", "als", "bpr", "two_tower")


def enabled_models(cfg: ModelsConfig) -> list[str]:
    """Names of the models switched on in config, in display order."""
    return [name for name in MODEL_NAMES if getattr(cfg, name).enabled]


def train_model(
    name: str,
    train: Interactions,
    cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    val_targets: sp.csr_matrix | None = None,
    on_metrics: OnMetrics | None = None,
    item_text: pl.DataFrame | None = None,
    lightning_logger: Any | None = None,
) -> Embeddings:
    """Train one model by name. ``val_targets`` (users x items of the train maps) drives early stopping.

    ``item_text`` (item_id, text) and ``lightning_logger`` are used by the two-tower model only.
    """
    if name == "popularity":
        from recsys_embed.popularity import train_popularity

        return train_popularity(train)
    if name == "als":
        from recsys_embed.mf import train_als

        return train_als(train, cfg.als, val_targets, eval_cfg.ks, eval_cfg.primary_metric, on_metrics)
    if name == "bpr":
        from recsys_embed.mf import train_bpr

        return train_bpr(train, cfg.bpr, val_targets, eval_cfg.ks, eval_cfg.primary_metric, on_metrics)
    if name == "two_tower":
        from recsys_embed.two_tower.train import train_two_tower

        return train_two_tower(
            train,
            cfg.two_tower,
            val_targets,
            eval_cfg.ks,
            item_text=item_text,
            on_metrics=on_metrics,
            lightning_logger=lightning_logger,
        )
    raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
