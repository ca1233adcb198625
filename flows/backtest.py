"""The backtest flow: cut the log, run the whole production pipeline before the cutoff, score what it ships.

Orchestration only (the numbers come from ``recsys_embed.evaluation.backtest``):

1. ingest the whole log as configured (cached under the backtest's own ``cache/``) and resolve the cutoff;
2. run the main flow (``embedding_pipeline``, a subflow) with ``name=<name>-backtest-<tag>``,
   ``ingest.until=<cutoff>`` and no registry, database or incremental state, so the real pipeline's outputs,
   champion and state are never touched;
3. with ``per_model``, run it once more with the search off (``<name>-backtest-<tag>-defaults``), both runs
   shipping every model, so each model is scored refitted with its configured and with its tuned parameters;
4. score the shipped top-k tables and two baselines on the events after the cutoff; write ``backtest.json`` and
   ``backtest.md`` under ``<output_root>/<name>-backtest-<tag>/`` and log one MLflow run with the table.

One backtest per folder at a time: it holds ``<folder>/.backtest/.run.lock`` throughout (a second one is refused at
once), and holding it marks CRASHED the Prefect flow runs of killed backtests of that folder (``flows.crashed``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.crashed import claim_root, mark_dead_runs_crashed
from flows.embedding_pipeline import embedding_pipeline
from recsys_embed.config import IngestConfig, MlflowSettings, PipelineConfig, load_config, load_mlflow_settings
from recsys_embed.evaluation import backtest
from recsys_embed.pipeline import stages
from recsys_embed.pipeline.lock import run_lock
from recsys_embed.pipeline.records import IngestRecord, RunManifest
from recsys_embed.tracking.tracker import Tracker


@task(name="backtest-ingest", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def full_ingest_task(cfg: IngestConfig, cache_root: str) -> IngestRecord:
    return stages.run_ingest(cfg, Path(cache_root))


@task(name="backtest-cutoff", cache_policy=NONE)
def cutoff_task(events: str, holdout_days: int | None, cutoff: datetime | None) -> dict[str, datetime]:
    import polars as pl

    first, last = backtest.event_span(pl.read_parquet(events, columns=["ts"]))
    return {"first": first, "last": last, "cutoff": backtest.resolve_cutoff(first, last, holdout_days, cutoff)}


@task(name="backtest-score", cache_policy=NONE)
def score_task(
    events: str, cutoff: datetime, manifest: RunManifest, name: str, k: int, ks: list[int], seed: int,
    holdout_days: int | None, defaults: RunManifest | None = None, counts: bool = False,
) -> backtest.BacktestResult:  # fmt: skip
    return backtest.run_scoring(events, cutoff, manifest, name=name, k=k, ks=ks, seed=seed, holdout_days=holdout_days,
                                defaults=defaults, counts=counts)  # fmt: skip


@task(name="backtest-write", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def write_task(result: backtest.BacktestResult, folder: str) -> dict[str, str]:
    with run_lock(folder):
        return backtest.write_results(result, folder)


@task(name="backtest-log", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def log_task(settings: MlflowSettings, result: backtest.BacktestResult, tags: dict[str, str], folder: str) -> str:
    return backtest.log_results(Tracker(settings, local_outputs=Path(folder)), result, tags)


BACKTEST_LOCK = ".backtest"  # <root>/.backtest/.run.lock: held for the whole backtest (its subflows take <root>'s)


@flow(name="backtest")
def backtest_flow(
    config_path: str | None = "configs/retail.yaml",
    overrides: list[str] | None = None,
    mlflow_config: str = "mlflow.yml",
    holdout_days: int | None = None,
    cutoff: datetime | None = None,
    per_model: bool = False,
) -> dict[str, Any]:
    """Backtest the pipeline at ``cutoff`` or ``holdout_days`` before the log's last kept event (exactly one).

    ``per_model``: score every model, refitted with its configured (defaults) and its tuned parameters
    (needs ``tuning.enabled``; a second pipeline run without the search).

    Returns ``backtest.json``'s content plus ``paths`` (json, markdown) and ``mlflow_run_id``.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)
    if per_model and not cfg.tuning.enabled:
        raise backtest.BacktestError("--per-model compares each model's configured and tuned parameters, but "
                                     "tuning.enabled is false; set it true (or drop --per-model)")  # fmt: skip
    if cutoff is not None:
        cutoff = backtest.as_utc(cutoff, cfg.ingest.assume_timezone)
    name = backtest.backtest_name(cfg.name, backtest.backtest_tag(holdout_days, cutoff))
    root = Path(cfg.output_root) / name
    claim_root(root, "backtest")  # before the slow start: killed before the lock, the next backtest marks it crashed
    tracker = Tracker(load_mlflow_settings(mlflow_config))  # fails fast when the store is unusable
    # One backtest per folder at a time; holding this lock, every other RUNNING backtest of the folder is dead.
    with run_lock(root / BACKTEST_LOCK):
        crashed = mark_dead_runs_crashed(root, "backtest")
        if crashed:
            logger.warning("marked %d Prefect flow run(s) of backtests left RUNNING by a killed run as CRASHED: %s",
                           len(crashed), ", ".join(crashed))  # fmt: skip
        return _run_backtest(cfg, config_path, overrides, mlflow_config, holdout_days, cutoff, per_model, name, root,
                             tracker)  # fmt: skip


def _run_backtest(
    cfg: PipelineConfig, config_path: str | None, overrides: list[str], mlflow_config: str, holdout_days: int | None,
    cutoff: datetime | None, per_model: bool, name: str, root: Path, tracker: Tracker,
) -> dict[str, Any]:  # fmt: skip
    logger = get_run_logger()
    with run_lock(root):  # released before the main flow takes it for its own run
        ingest = full_ingest_task(cfg.ingest, str(root / "cache"))
    span = cutoff_task(ingest["events"], holdout_days, cutoff)
    cut = span["cutoff"]
    logger.info("backtest %s: cutoff %s (kept events %s .. %s)", name, cut.isoformat(), span["first"].isoformat(),
                span["last"].isoformat())  # fmt: skip

    ship = backtest.PER_MODEL_OVERRIDES if per_model else []
    manifest = embedding_pipeline(config_path, overrides + backtest.pipeline_overrides(name, cut) + ship, mlflow_config)
    defaults = None
    if per_model:
        plain = backtest.pipeline_overrides(backtest.defaults_name(name), cut) + ship + backtest.DEFAULTS_OVERRIDES
        defaults = embedding_pipeline(config_path, overrides + plain, mlflow_config)

    result = score_task(ingest["events"], cut, manifest, name, cfg.export.k, cfg.eval.ks, cfg.seed, holdout_days,
                        defaults, cfg.ingest.columns.weight is not None)  # fmt: skip
    paths = write_task(result, str(root))
    text = backtest.markdown(result)
    scope = {"pipeline": name, "output_root": str(root.resolve())}
    run_id = log_task(tracker.settings, result, scope, str(root))
    create_markdown_artifact(markdown=text, key="recsys-embed-backtest", description=f"backtest {name}")
    logger.info("backtest %s:\n%s", name, text)
    return {**result.to_dict(), "paths": paths, "mlflow_run_id": run_id, "markdown": text}
