"""What makes a run "identical" for the registry (``shipping.model_settings`` in ``run_key``): a scheduled run
on the same data registered v2 (its schedule and incremental settings differed) and a ``tuning.n_trials`` change
registered v3, though neither changed the model."""

from __future__ import annotations

from recsys_embed.config import load_config
from recsys_embed.pipeline import shipping
from tests.conftest import REPO

IDENTITY = {"data_fingerprint": "abc", "training_window_last": "2011-12-09T12:50:00"}


def _key(*overrides: str, best: str = "ease") -> str:
    cfg = load_config(REPO / "configs/retail.yaml", list(overrides))
    return shipping.run_key(IDENTITY, shipping.model_settings(cfg, best, cfg.models))


def test_non_model_settings_leave_the_run_key_alone() -> None:
    base = _key()
    for change in (
        "tuning.n_trials=3",  # the search budget: the recipe it finds is what counts
        "incremental.enabled=true",  # a scheduled run's override
        "schedule.cron=* * * * *",
        "output_root=/tmp/elsewhere",
        "ingest.source.path=/data/copy/events.parquet",  # the data identity holds the files' content
        "registry.margin=0.01",
        "export.database.enabled=true",
        "models.ease.blas_threads=1",  # machine settings stay out of the recipe
        "models.als.factors=32",  # another model's recipe
    ):
        assert _key(change) == base, change


def test_model_settings_change_the_run_key() -> None:
    base = _key()
    for change in ("models.ease.regularization=50.0", "ingest.event_weights.cancellation=0.0", "export.refit=false",
                   "registry.default_k=10", "seed=7"):  # fmt: skip
        assert _key(change) != base, change
    assert _key(best="als") != base
