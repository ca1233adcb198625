"""Distributed runs: the top-k export as one Prefect task per user shard on Dask (prefect-dask).

Orchestration only; the work is ``recsys_embed.pipeline.shipping.run_export_plan / _shard / _commit / _similar``.

- ``dask_cluster(cfg.distributed)``: the run's Dask cluster. ``distributed.address`` connects to an existing
  scheduler (checked up front, so a wrong address fails at once and names the key); otherwise a
  ``distributed.LocalCluster`` (``n_workers``, ``threads_per_worker``, ``processes``) lives for the whole run,
  so worker processes start and import once, not once per model.
- ``sharded_export``: a subflow run with ``.with_options(task_runner=DaskTaskRunner(address=...))`` (a flow's
  task runner is fixed when it is decorated, so the main flow keeps its own). It plans in the flow process,
  submits one ``export-shard`` task per shard and the similar-items table to Dask, then commits the table in the
  flow process. A worker that dies mid-shard (OOM, preemption) is replaced by its nanny and Dask reruns the
  shard elsewhere (up to ``distributed.scheduler.allowed-failures`` times, 3 by default); a shard that raises
  is retried by Prefect. A rerun shard replaces its own output, so rows are never lost or doubled, and the
  commit checks every shard before the table becomes visible.

Process-based clusters start workers with ``spawn``: a script that runs the flow must guard its entry point
with ``if __name__ == "__main__":`` (the ``recsys-embed`` CLI does).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from recsys_embed.config import DistributedConfig, ExportConfig
from recsys_embed.errors import ConfigError
from recsys_embed.pipeline import shipping
from recsys_embed.pipeline.records import (
    ExportRecord,
    ModelRecord,
    ShardPlanRecord,
    ShardRecord,
    SimilarRecord,
    SplitRecord,
)

# Loggers of the scheduler/nanny/worker machinery that report the expected broken connections while a
# process-based LocalCluster shuts down ("Failed to communicate with scheduler during heartbeat", ...).
_TEARDOWN_NOISE = (
    "distributed.comm",
    "distributed.core",
    "distributed.nanny",
    "distributed.worker",
    "distributed.scheduler",
    "distributed.batched",
    "distributed.client",
)
# How long to wait for an existing scheduler to answer before giving up with a clear message.
_CONNECT_TIMEOUT = "10s"


@dataclass(frozen=True)
class DaskCluster:
    """Where shard tasks go: the scheduler's address, its workers when the run began, and the shard count."""

    address: str
    n_workers: int
    shards: int


def _shards(cfg: DistributedConfig, n_workers: int) -> int:
    return cfg.shards or 2 * max(1, n_workers)


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Raise these loggers to CRITICAL for the block (this process only), then restore their levels."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def close_quietly(cluster: Any) -> None:
    """Close a LocalCluster without the comm errors its workers and nannies log while the scheduler goes away."""
    from distributed import Client

    names = _TEARDOWN_NOISE

    def mute() -> None:  # runs inside each worker process (pickled by value: a local function)
        for n in names:
            logging.getLogger(n).setLevel(logging.CRITICAL)

    with _quiet(names):
        with contextlib.suppress(Exception), Client(cluster, set_as_default=False) as client:
            client.run(mute)
        cluster.close()


@contextlib.contextmanager
def dask_cluster(cfg: DistributedConfig) -> Iterator[DaskCluster | None]:
    """The run's Dask cluster, or None when ``cfg.enabled`` is off (nothing is started then).

    Raises:
        ConfigError: ``cfg.address`` is set but no scheduler answers there.
    """
    if not cfg.enabled:
        yield None
        return
    from distributed import Client, LocalCluster

    log = logging.getLogger(__name__)
    if cfg.address:
        try:
            with Client(cfg.address, timeout=_CONNECT_TIMEOUT, set_as_default=False) as client:
                n_workers = len(client.scheduler_info()["workers"])
        except (OSError, TimeoutError) as e:
            raise ConfigError(
                f"distributed.address {cfg.address!r}: no Dask scheduler answered within {_CONNECT_TIMEOUT} ({e}); "
                "start one there (`dask scheduler`, then `dask worker <address>`), fix the address, or unset "
                "distributed.address to run on a LocalCluster"
            ) from None
        log.info("distributed: using the Dask scheduler at %s (%d workers)", cfg.address, n_workers)
        yield DaskCluster(cfg.address, n_workers, _shards(cfg, n_workers))
        return
    cluster = LocalCluster(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=cfg.processes,
        dashboard_address=":0",  # a free port: never collides with another cluster on this machine
    )
    log.info("distributed: LocalCluster at %s (%d workers x %d threads, %s)", cluster.scheduler_address,
             cfg.n_workers, cfg.threads_per_worker, "processes" if cfg.processes else "threads")  # fmt: skip
    try:
        yield DaskCluster(cluster.scheduler_address, cfg.n_workers, _shards(cfg, cfg.n_workers))
    finally:
        close_quietly(cluster)


@task(name="export-plan", cache_policy=NONE, task_run_name="export-plan-{model[model]}")
def export_plan_task(model: ModelRecord, cfg: ExportConfig, out_dir: str, n_shards: int) -> ShardPlanRecord:
    return shipping.run_export_plan(model, cfg, Path(out_dir), n_shards)


@task(
    name="export-shard",
    retries=2,
    retry_delay_seconds=[1, 5],
    cache_policy=NONE,
    task_run_name="export-{model[model]}-shard-{index}",
)
def export_shard_task(
    model: ModelRecord, split: SplitRecord, cfg: ExportConfig, plan: ShardPlanRecord, index: int, run_id: str
) -> ShardRecord:
    return shipping.run_export_shard(model, split, cfg, plan, index, run_id)


@task(name="export-commit", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE,
      task_run_name="export-commit-{model[model]}")  # fmt: skip
def export_commit_task(
    model: ModelRecord,
    split: SplitRecord,
    cfg: ExportConfig,
    plan: ShardPlanRecord,
    shards: list[ShardRecord],
) -> ExportRecord:
    del shards  # a dependency only: the commit reads each shard's receipt from disk and checks it
    return shipping.run_export_commit(model, split, cfg, plan)


@task(name="export-similar", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE,
      task_run_name="export-similar-{model[model]}")  # fmt: skip
def export_similar_task(
    model: ModelRecord, cfg: ExportConfig, out_dir: str, run_id: str, split: SplitRecord | None = None
) -> SimilarRecord:
    return shipping.run_export_similar(model, cfg, Path(out_dir), run_id, split)


@flow(name="sharded-export", flow_run_name="sharded-export-{model[model]}")
def sharded_export(
    model: ModelRecord, split: SplitRecord, cfg: ExportConfig, n_shards: int, out_dir: str, run_id: str
) -> ExportRecord:
    """One model's exports, with the top-k table in shards: the same record as ``shipping.run_export`` plus
    ``topk_shards``. Run it with a ``DaskTaskRunner`` (``run_sharded_export``); under the default runner the
    shards run on threads of this process."""
    plan = export_plan_task(model, cfg, out_dir, n_shards)
    similar = export_similar_task.submit(model, cfg, out_dir, run_id, split)
    futures = [export_shard_task.submit(model, split, cfg, plan, i, run_id) for i in range(len(plan["shards"]))]
    record = export_commit_task(model, split, cfg, plan, [f.result() for f in futures])
    record.update(similar.result())
    return record


def run_sharded_export(
    cluster: DaskCluster, model: ModelRecord, split: SplitRecord, cfg: ExportConfig, out_dir: str, run_id: str
) -> ExportRecord:
    """``sharded_export`` on ``cluster`` (prefect-dask's ``DaskTaskRunner`` connected to its scheduler)."""
    from prefect_dask import DaskTaskRunner

    runner: Any = DaskTaskRunner(address=cluster.address)  # Any: prefect-dask leaves TaskRunner's type parameter open
    with _workers_report_here():
        result: ExportRecord = sharded_export.with_options(task_runner=runner)(
            model, split, cfg, cluster.shards, out_dir, run_id
        )
    return result


def _workers_report_here() -> contextlib.AbstractContextManager[Any]:
    """Point the tasks shipped to Dask at this run's Prefect API.

    Tasks on workers run with this process's Prefect settings. Without ``PREFECT_API_URL`` (the ephemeral
    server of a plain ``recsys-embed run``) each worker would start an ephemeral server of its own (seconds
    each); giving them the URL of the one this run started keeps every task run in one place. Workers on
    other machines cannot reach that local server: run a Prefect server and set ``PREFECT_API_URL`` then.
    """
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    url = str(get_client(sync_client=True).api_url)  # the ephemeral server this process already runs
    return temporary_settings({PREFECT_API_URL: url})
