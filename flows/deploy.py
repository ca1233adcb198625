"""Deployments of the pipeline flow: ``recsys-embed serve`` (a long-lived runner) and ``prefect.yaml`` (work pools).

The schedule (cron, timezone), the run overrides (incremental by default) and the concurrency limit come
from the config's ``schedule`` section; the deployment is named ``<name>-nightly`` after the pipeline (or
``schedule.deployment_name``), so each pipeline has its own and ``prefect.yaml`` declares the same names. A cron to
try (``recsys-embed serve --cron``) gets a deployment of its own, ``trial_name``, unless a name is given, so a trial
never reschedules the nightly deployment. Paths are made absolute so a run started by the runner finds them
whatever its working directory. Two overlapping runs are prevented twice: by the deployment's concurrency limit
(Prefect queues the second), and by the output folder's lock (``recsys_embed.pipeline.lock``) for any run.
``serve`` needs a Prefect server (``flows.api``); Ctrl-C stops it without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any, cast

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.runner import Runner
from prefect.schedules import Cron

from flows.embedding_pipeline import embedding_pipeline
from recsys_embed.config import PipelineConfig, load_config
from recsys_embed.errors import ConfigError

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


def trial_name(cfg: PipelineConfig) -> str:
    """The deployment name of a cron being tried: ``<name>-cron-<schedule>``, the cron with ``*`` as ``x`` and
    every other run of non-alphanumerics as ``-`` (``* * * * *`` -> ``retail-cron-x-x-x-x-x``; Prefect names may not
    hold ``/``)."""
    slug = re.sub(r"[^0-9A-Za-z]+", "-", cfg.schedule.cron.replace("*", "x")).strip("-")
    return f"{cfg.name}-cron-{slug}"


def trial_overrides(cfg: PipelineConfig) -> list[str]:
    """What makes a deployment a trial (``serve --trial``): its runs write to ``<output_root>/<name>-trial/``, register
    under ``<registered name>-trial`` and export to no database, so trying a schedule never touches the production
    tables, ``current/``, champion or database."""
    out = [f"name={cfg.name}-trial", "export.database.enabled=false"]
    if cfg.registry.name:
        out.append(f"registry.name={cfg.registry.name}-trial")
    return out


def build_deployment(config_path: str, overrides: list[str], mlflow_config: str = "mlflow.yml") -> RunnerDeployment:
    """The pipeline as a ``RunnerDeployment`` named ``deployment_name(cfg)`` with the configured cron.

    Raises:
        ConfigError: ``schedule.cron`` is not a cron expression Prefect accepts.
    """
    cfg = load_config(config_path, overrides)
    sch = cfg.schedule
    try:
        schedule = Cron(sch.cron, timezone=sch.timezone)
    except ValueError as e:
        raise ConfigError(f"schedule.cron={sch.cron!r} / schedule.timezone={sch.timezone!r}: {str(e).splitlines()[0]}; "
                          "give five fields, e.g. --cron '*/5 * * * *' (every 5 minutes)") from None  # fmt: skip
    dep = embedding_pipeline.to_deployment(
        name=deployment_name(cfg),
        schedules=[schedule],
        parameters=deployment_parameters(config_path, overrides, mlflow_config, cfg),
        concurrency_limit=sch.concurrency_limit,
        tags=["recsys-embed", cfg.name],
        description=f"recsys-embed pipeline '{cfg.name}' ({config_path}), cron '{sch.cron}' {sch.timezone}",
        entrypoint_type=EntrypointType.MODULE_PATH,  # importable from any working directory
    )
    return cast(RunnerDeployment, dep)  # sync context: the sync_compatible call returned the deployment


def serve_deployment(dep: RunnerDeployment, run_once: bool = False) -> bool:
    """Register ``dep`` and run its scheduled (and manually triggered) runs until interrupted.

    ``run_once``: execute the runs due now, then return. Returns False when stopped by Ctrl-C (the runner shuts
    down cleanly first, with no traceback), True otherwise.
    """
    runner = Runner(name=f"recsys-embed-{dep.name}", pause_on_shutdown=False, limit=1)
    runner.add_deployment(dep)
    log.info("serving deployment 'embedding-pipeline/%s' (cron %s)", dep.name,
             [getattr(s.schedule, "cron", s.schedule) for s in dep.schedules or []])  # fmt: skip
    try:
        asyncio.run(runner.start(run_once=run_once))
    except KeyboardInterrupt:  # asyncio.run cancelled the runner and let it close; only the traceback is left
        log.info("serve: stopped by Ctrl-C")
        return False
    return True


def serve(config_path: str, overrides: list[str], mlflow_config: str = "mlflow.yml", run_once: bool = False) -> bool:
    """``build_deployment`` then ``serve_deployment``: register the deployment and serve it until interrupted."""
    return serve_deployment(build_deployment(config_path, overrides, mlflow_config), run_once)
