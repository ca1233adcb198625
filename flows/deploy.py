"""Deployments of the pipeline flow: ``recsys-embed serve`` (a long-lived runner) and ``prefect.yaml`` (work pools).

The schedule (cron, timezone), the run overrides (incremental by default) and the concurrency limit come
from the config's ``schedule`` section; the deployment is named ``<name>-nightly`` after the pipeline (or
``schedule.deployment_name``), so each pipeline has its own and ``prefect.yaml`` declares the same names. Paths
are made absolute so a run started by the runner finds them whatever its working directory. Two overlapping
runs are prevented twice: by the deployment's concurrency limit (Prefect queues the second), and by the output
folder's lock (``recsys_embed.pipeline.lock``) for any run. ``serve`` needs a Prefect server (``flows.api``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.runner import Runner
from prefect.schedules import Cron

from flows.embedding_pipeline import embedding_pipeline
from recsys_embed.config import PipelineConfig, load_config

log = logging.getLogger(__name__)


def deployment_parameters(
    config_path: str, overrides: list[str], mlflow_config: str, cfg: PipelineConfig
) -> dict[str, Any]:
    """The flow parameters of each scheduled run: absolute paths, schedule overrides then the caller's."""
    absolute = [f"output_root={Path(cfg.output_root).resolve()}"] if not Path(cfg.output_root).is_absolute() else []
    return {
        "config_path": str(Path(config_path).resolve()),
        "overrides": [*absolute, *cfg.schedule.overrides, *overrides],
        "mlflow_config": str(Path(mlflow_config).resolve()),
    }


def deployment_name(cfg: PipelineConfig) -> str:
    """The pipeline's deployment name: ``schedule.deployment_name``, else ``<name>-nightly``."""
    return cfg.schedule.deployment_name or f"{cfg.name}-nightly"


def build_deployment(config_path: str, overrides: list[str], mlflow_config: str = "mlflow.yml") -> RunnerDeployment:
    """The pipeline as a ``RunnerDeployment`` named ``deployment_name(cfg)`` with the configured cron."""
    cfg = load_config(config_path, overrides)
    sch = cfg.schedule
    dep = embedding_pipeline.to_deployment(
        name=deployment_name(cfg),
        schedules=[Cron(sch.cron, timezone=sch.timezone)],
        parameters=deployment_parameters(config_path, overrides, mlflow_config, cfg),
        concurrency_limit=sch.concurrency_limit,
        tags=["recsys-embed", cfg.name],
        description=f"recsys-embed pipeline '{cfg.name}' ({config_path}), cron '{sch.cron}' {sch.timezone}",
        entrypoint_type=EntrypointType.MODULE_PATH,  # importable from any working directory
    )
    return cast(RunnerDeployment, dep)  # sync context: the sync_compatible call returned the deployment


def serve(config_path: str, overrides: list[str], mlflow_config: str = "mlflow.yml", run_once: bool = False) -> None:
    """Register the deployment and run its scheduled (and manually triggered) runs until interrupted.

    ``run_once``: execute the runs due now, then return.
    """
    dep = build_deployment(config_path, overrides, mlflow_config)
    runner = Runner(name=f"recsys-embed-{dep.name}", pause_on_shutdown=False, limit=1)
    runner.add_deployment(dep)
    log.info("serving deployment 'embedding-pipeline/%s' (cron %s)", dep.name,
             [getattr(s.schedule, "cron", s.schedule) for s in dep.schedules or []])  # fmt: skip
    asyncio.run(runner.start(run_once=run_once))
