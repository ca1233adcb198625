"""``recsys-embed serve``: the deployment carries the configured cron, shows in ``prefect deployment ls``, and a
triggered run of it is executed by the served runner to completion (under the session's Prefect harness).
Also the output-folder lock that stops two overlapping runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from recsys_embed.lock import RunLockedError, run_lock
from tests.conftest import REPO, RETAIL


def test_second_run_on_same_output_is_refused(tmp_path: Path) -> None:
    held = run_lock(tmp_path / "retail")
    with held, pytest.raises(RunLockedError, match=r"another run is writing to .*pid"), run_lock(tmp_path / "retail"):
        pass
    with run_lock(tmp_path / "retail"):  # released at exit: the next run goes ahead
        pass


@pytest.mark.slow
def test_serve_creates_scheduled_deployment_and_runs_it(
    prefect_harness: None, tmp_path: Path, mlflow_yml: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from flows.deploy import build_deployment

    src = tmp_path / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=15_000).write_parquet(src)
    overrides = [
        f"ingest.source.path={src}",
        f"output_root={tmp_path / 'out'}",
        "models.bpr.enabled=false",
        "models.als.iterations=2",
        "models.als.eval_every=0",
        "models.ease.enabled=false",
        "tuning.enabled=false",
        "schedule.cron=15 4 * * 1",
        "schedule.deployment_name=nightly-test",
    ]
    cfg = str(REPO / "configs/retail.yaml")
    dep = build_deployment(cfg, overrides, str(mlflow_yml))
    dep_id = dep.apply()

    with get_client(sync_client=True) as client:
        stored = client.read_deployment(dep_id)
    assert stored.name == "nightly-test"
    assert [s.schedule.cron for s in stored.schedules] == ["15 4 * * 1"]  # type: ignore[union-attr]
    limit = stored.global_concurrency_limit
    assert stored.concurrency_limit == 1 or (limit is not None and limit.limit == 1)  # one run at a time
    assert "incremental.enabled=true" in stored.parameters["overrides"]  # the schedule's own overrides

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "COLUMNS": "200"}
    ls = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "ls"], capture_output=True, text=True, env=env, timeout=120
    )
    assert "embedding-pipeline/nightly-test" in ls.stdout.replace("\n", ""), ls.stdout + ls.stderr

    # trigger a run now, then let `recsys-embed serve --run-once` pick it up and execute it
    flow_run = run_deployment("embedding-pipeline/nightly-test", timeout=0)
    served = subprocess.run(
        [sys.executable, "-m", "recsys_embed.cli", "-q", "--mlflow-config", str(mlflow_yml), "serve", "--config", cfg,
         *[a for o in overrides for a in ("--set", o)], "--run-once"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr[-3000:]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state is not None and state.type == StateType.COMPLETED, (state, served.stderr[-3000:])
    assert (tmp_path / "out" / "retail" / "latest.json").exists()
