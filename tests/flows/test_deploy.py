"""Scheduled runs that actually fire (issue 13).

Against a real ``prefect server start`` (tests/prefect_server.py), ``recsys-embed serve`` registers the pipeline's
deployment, the server's own scheduler turns its cron into scheduled flow runs, and one of them fires, runs the
pipeline and writes its manifest. Also: deployments named per pipeline (serve and prefect.yaml agree, two pipelines
do not overwrite each other), ``serve`` refusing at once without a server, config errors in a second, flow runs
of a killed process marked crashed by the next run, and the output-folder lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import pytest
import yaml

from recsys_embed.pipeline.lock import RunLockedError, run_lock
from tests.conftest import REPO, RETAIL
from tests.prefect_server import PrefectServer, background, prefect_env, prefect_server

T = TypeVar("T")
SYNTHETIC = REPO / "configs" / "synthetic.yaml"
CHEAP = ["models.bpr.enabled=false", "models.two_tower.enabled=false", "models.ease.enabled=false",
         "tuning.enabled=false", "models.als.iterations=3", "models.als.eval_every=0"]  # fmt: skip


def _wait(what: str, probe: Callable[[], T | None], timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
          log: Path | None = None) -> T:  # fmt: skip
    """Poll ``probe`` every 0.5 s until it returns a value; fail after ``timeout_s`` or if ``proc`` exits."""
    t0 = time.perf_counter()
    while (value := probe()) is None:
        tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} while waiting for {what}:\n{tail}")
        if time.perf_counter() - t0 > timeout_s:
            pytest.fail(f"no {what} after {timeout_s:.0f} s:\n{tail}")
        time.sleep(0.5)
    return value


@contextlib.contextmanager
def _client(api_url: str) -> Iterator[Any]:
    """A Prefect client of the server at ``api_url`` (whatever harness this session has active)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _runs_of(client: Any, deployment_id: Any, *states: str) -> list[Any]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in states])) if states else None
    flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]), state=state)
    return list(client.read_flow_runs(flow_run_filter=flt))


# ------------------------------------------------------------------------------------------------------------
# A real server, a real cron


@dataclass
class Served:
    server: PrefectServer
    serve: subprocess.Popen[bytes]
    log: Path
    out: Path
    launched: float  # perf_counter when `recsys-embed serve` was launched


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``prefect server start`` plus ``recsys-embed serve`` of the synthetic pipeline (a tiny generated log, cheap
    models, no registry) on a cron that fires every minute; both stopped at the end of the module."""
    from recsys_embed.data.generate import generate, preset

    folder = tmp_path_factory.mktemp("served")
    generate(preset("tiny", n_events=20_000, n_users=500, n_items=300), folder / "log")
    mlflow_yml = folder / "mlflow.yml"
    mlflow_yml.write_text(
        f"tracking_uri: sqlite:///{folder / 'mlflow.db'}\nartifact_location: {folder / 'mlartifacts'}\n"
        "experiment_name: served\nui_url: http://mlflow.example:5000\n",
        encoding="utf-8",
    )
    overrides = [f"ingest.source.path={folder / 'log'}", f"output_root={folder / 'out'}", *CHEAP,
                 "registry.enabled=false", "schedule.cron=* * * * *"]  # fmt: skip
    with prefect_server(folder / "server") as server:
        # the runner looks for due runs every 2 s instead of 10 (PREFECT_RUNNER_POLL_FREQUENCY); PYTHONPATH: this
        # checkout's code in the serve process and the flow-run processes it starts
        env = {**server.env(), "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "recsys_embed.cli", "--mlflow-config", str(mlflow_yml), "serve",
               "--config", str(SYNTHETIC), *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
        launched = time.perf_counter()
        with background(cmd, folder / "serve.log", env, cwd=folder) as proc:
            yield Served(server, proc, folder / "serve.log", folder / "out", launched)


@pytest.mark.slow
def test_server_scheduler_creates_the_cron_runs(served: Served, record_property: Any) -> None:
    """Regression (issue 13): with SQLAlchemy 2.1 Prefect's scheduler failed on every loop and no cron run was
    ever created; the old test triggered runs by hand and could not see it."""
    name = "embedding-pipeline/synthetic-1m-nightly"  # <name>-nightly after the config's name
    with _client(served.server.api_url) as client:

        def deployment() -> Any:
            with contextlib.suppress(Exception):  # not registered yet
                return client.read_deployment_by_name(name)
            return None

        dep = _wait(f"deployment {name}", deployment, 120, served.serve, served.log)
        registered_s = time.perf_counter() - served.launched
        scheduled = _wait("scheduled flow run", lambda: _runs_of(client, dep.id, "SCHEDULED") or None, 60,
                          served.serve, served.log)  # fmt: skip
    first = min(scheduled, key=lambda r: r.created)
    lag_s = (first.created - dep.created).total_seconds()
    record_property("serve_registered_s", round(registered_s, 1))
    record_property("first_scheduled_run_s", round(lag_s, 1))
    print(f"deployment registered {registered_s:.1f} s after launch; first scheduled run {lag_s:.1f} s later")
    assert lag_s <= 60
    # created by the server's scheduler from the cron, not by anyone's hand
    assert all(r.auto_scheduled and r.created_by is not None and r.created_by.type == "SCHEDULE" for r in scheduled)
    assert [s.schedule.cron for s in dep.schedules] == ["* * * * *"]
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1  # one at a time
    assert "incremental.enabled=true" in dep.parameters["overrides"]  # the schedule's own overrides
    ls = subprocess.run([sys.executable, "-m", "prefect", "deployment", "ls"], capture_output=True, text=True,
                        env={**served.server.env(), "COLUMNS": "200"}, timeout=120)  # fmt: skip
    assert name in ls.stdout.replace("\n", ""), ls.stdout + ls.stderr


@pytest.mark.slow
def test_a_scheduled_run_fires_and_completes(served: Served, record_property: Any) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with _client(served.server.api_url) as client:
        dep = _wait("deployment", lambda: client.read_deployment_by_name("embedding-pipeline/synthetic-1m-nightly"),
                    120, served.serve, served.log)  # fmt: skip

        def finished() -> Any:
            runs = [r for r in _runs_of(client, dep.id) if r.state is not None and r.state.is_final()]
            return min(runs, key=lambda r: r.expected_start_time) if runs else None

        run = _wait("finished scheduled run", finished, 180, served.serve, served.log)
        links = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run.id]), key=ArtifactFilterKey(any_=["recsys-embed-mlflow-run"])))  # fmt: skip
    assert run.state.is_completed(), (run.state, served.log.read_text(errors="replace")[-4000:])
    assert run.auto_scheduled  # fired by the cron, not triggered by hand
    done_s = (run.end_time - run.expected_start_time).total_seconds()
    record_property("scheduled_run_done_s", round(done_s, 1))
    print(f"scheduled run '{run.name}' completed {done_s:.1f} s after its cron time "
          f"(run time {run.total_run_time.total_seconds():.1f} s)")  # fmt: skip
    latest = json.loads((served.out / "synthetic-1m" / "latest.json").read_text())
    manifest = json.loads((Path(latest["run_dir"]) / "summary.json").read_text())
    assert set(manifest["metrics"]) == {"popularity", "als"}
    assert manifest["incremental"]["new_rows_read"] == 20_000
    # the Prefect link artifact points at this MLflow run in the UI named by mlflow.yml's ui_url
    url = f"http://mlflow.example:5000/#/experiments/{manifest['mlflow']['experiment_id']}/runs/" + \
        manifest["mlflow"]["run_id"]
    assert manifest["mlflow"]["ui_url"] == url
    assert [a.data for a in links] == [f"[MLflow run {manifest['run_name']}]({url})"]  # a link artifact


# ------------------------------------------------------------------------------------------------------------
# Names


def test_serve_and_prefect_yaml_name_the_same_deployments() -> None:
    from flows.deploy import deployment_name
    from recsys_embed.config import load_config

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    declared = {d["name"]: d for d in spec["deployments"]}
    configs = {Path(d["parameters"]["config_path"]).name for d in declared.values()}
    assert configs == {"retail.yaml", "synthetic.yaml"}  # every shipped pipeline has its deployment
    for name, d in declared.items():
        cfg = load_config(REPO / d["parameters"]["config_path"])
        assert deployment_name(cfg) == name  # what `recsys-embed serve --config <file>` registers
        assert [(s["cron"], s["timezone"]) for s in d["schedules"]] == [(cfg.schedule.cron, cfg.schedule.timezone)]
        assert d["concurrency_limit"] == cfg.schedule.concurrency_limit
        assert d["parameters"]["overrides"] == cfg.schedule.overrides
        assert d["tags"] == ["recsys-embed", cfg.name]
        assert d["entrypoint"] == "flows/embedding_pipeline.py:embedding_pipeline"


@pytest.mark.slow
def test_two_pipelines_give_two_deployments(prefect_harness: None, tmp_path: Path, mlflow_yml: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.deploy import build_deployment

    ids = {}
    for config in ("retail.yaml", "synthetic.yaml"):
        dep = build_deployment(str(REPO / "configs" / config), [f"output_root={tmp_path / 'out'}"], str(mlflow_yml))
        ids[dep.name] = dep.apply()
    assert set(ids) == {"retail-nightly", "synthetic-1m-nightly"} and len(set(ids.values())) == 2
    with get_client(sync_client=True) as client:
        for name, dep_id in ids.items():
            stored = client.read_deployment_by_name(f"embedding-pipeline/{name}")
            assert stored.id == dep_id  # the second did not replace the first
            config = "retail.yaml" if name == "retail-nightly" else "synthetic.yaml"
            assert Path(stored.parameters["config_path"]) == REPO / "configs" / config


def test_a_trial_cron_gets_its_own_deployment_name_and_a_bad_one_is_refused() -> None:
    from flows.deploy import build_deployment, deployment_name, trial_name
    from recsys_embed.config import load_config
    from recsys_embed.errors import ConfigError

    cfg = load_config(SYNTHETIC, ["schedule.cron=*/5 * * * *"])
    assert deployment_name(cfg) == "synthetic-1m-nightly"  # --set schedule.cron alone keeps the configured name
    assert trial_name(cfg) == "synthetic-1m-cron-x-5-x-x-x-x"  # what `serve --cron '*/5 * * * *'` registers
    with pytest.raises(ConfigError, match=r"schedule.cron='every minute'.*five fields"):
        build_deployment(str(SYNTHETIC), ["schedule.cron=every minute"])


@pytest.mark.slow
def test_ctrl_c_stops_serve_without_a_traceback(tmp_path: Path) -> None:
    """Regression (issue 22): Ctrl-C on `serve` printed two chained tracebacks (asyncio's CancelledError, then
    KeyboardInterrupt). Also: `serve --cron` registers a deployment of its own, the nightly one is left alone."""
    with prefect_server(tmp_path / "server") as server:
        env = {**server.env(), "PYTHONPATH": str(REPO)}
        # a cron never due during the test: nothing runs, the runner only polls
        cmd = [sys.executable, "-m", "recsys_embed.cli", "serve", "--config", str(SYNTHETIC), "--set",
               f"output_root={tmp_path / 'out'}", "--cron", "0 0 1 1 *"]  # fmt: skip
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:  # a terminal's Ctrl-C: SIGINT to the whole foreground group
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                    start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
        try:
            with _client(server.api_url) as client:

                def deployment(name: str) -> Any:
                    with contextlib.suppress(Exception):  # not registered yet
                        return client.read_deployment_by_name(f"embedding-pipeline/{name}")
                    return None

                dep = _wait("trial deployment", lambda: deployment("synthetic-1m-cron-0-0-1-1-x"), 120, proc, log)
                assert [s.schedule.cron for s in dep.schedules] == ["0 0 1 1 *"]
                assert deployment("synthetic-1m-nightly") is None  # the nightly deployment was not rescheduled
            time.sleep(2)  # the runner is polling now
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
    text = log.read_text(errors="replace")
    assert rc == 130 and "Traceback" not in text, text
    assert "Serving deployment 'embedding-pipeline/synthetic-1m-cron-0-0-1-1-x'" in text and "Stopped (Ctrl-C)" in text


# ------------------------------------------------------------------------------------------------------------
# Refusals within seconds


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "recsys_embed.cli", *args], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=60)  # fmt: skip
    return out, time.perf_counter() - t0


def test_serve_without_a_server_refuses_at_once(tmp_path: Path) -> None:
    """Regression (issue 13): with no PREFECT_API_URL, `serve` used the ephemeral server and the runs it triggered
    ended Cancelled('Deployment concurrency slot lost during provisioning')."""
    env = {**prefect_env(tmp_path / "home"), "PYTHONPATH": str(REPO)}  # no PREFECT_API_URL, no user profile
    out, wall = _cli(["serve", "--config", str(SYNTHETIC)], env, tmp_path)
    print(f"serve refused in {wall:.2f} s")
    assert out.returncode == 2 and wall < 3.0, (out.stderr, wall)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "PREFECT_API_URL is not set" in lines[0] and "`prefect server start`" in lines[0]
    # a configured server that does not answer is named, as fast
    dead = {**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    out, wall = _cli(["serve", "--config", str(SYNTHETIC)], dead, tmp_path)
    assert out.returncode == 2 and wall < 3.0 and len(out.stderr.strip().splitlines()) == 1, (out.stderr, wall)
    assert "http://127.0.0.1:9/api (PREFECT_API_URL) does not answer" in out.stderr


@pytest.mark.parametrize("command", ["run", "serve"])
def test_bad_config_key_fails_in_a_second(command: str, tmp_path: Path) -> None:
    """Regression (issue 13): a config error surfaced only after Prefect's server started (18-27 s), as a
    traceback with the message three times."""
    env = {**prefect_env(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    out, wall = _cli([command, "--config", str(SYNTHETIC), "--set", "nope=1"], env, tmp_path)
    print(f"{command} --set nope=1: exit {out.returncode} in {wall:.2f} s")
    assert out.returncode == 2 and wall < 3.0, (out.stderr, wall)
    assert out.stderr.strip().splitlines() == [f"error: invalid config '{SYNTHETIC}': nope: Extra inputs are not "
                                               "permitted"]  # fmt: skip
    bad_yml = tmp_path / "mlflow.yml"
    bad_yml.write_text("tracking_uri: sqlite:///x.db\ntracking_url: typo\n")
    out, wall = _cli(["--mlflow-config", str(bad_yml), command, "--config", str(SYNTHETIC)], env, tmp_path)
    assert out.returncode == 2 and wall < 3.0 and len(out.stderr.strip().splitlines()) == 1, (out.stderr, wall)
    assert "tracking_url" in out.stderr


@pytest.mark.parametrize(
    "setup",
    [
        {},
        {"env": {"PREFECT_API_URL": "http://env:1/api"}},
        {"profiles": 'active = "local"\n[profiles.local]\nPREFECT_API_URL = "http://profile:2/api"\n'},
        {"profiles": 'active = "local"\n[profiles.local]\n[profiles.other]\nPREFECT_API_URL = "http://o:3/api"\n',
         "env": {"PREFECT_PROFILE": "other"}},
        {"prefect_toml": '[api]\nurl = "http://toml:4/api"\n'},
        {"dotenv": "PREFECT_API_URL=http://dotenv:5/api\n"},
    ],
    ids=["none", "env", "profile", "named-profile", "prefect-toml", "dotenv"],
)
def test_api_url_is_read_as_prefect_reads_it(setup: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``flows.api.configured_api_url`` (no Prefect import, so `serve` refuses in a second) agrees with Prefect."""
    from prefect.settings.models.root import Settings

    from flows.api import configured_api_url

    for k in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    for k, v in setup.get("env", {}).items():
        monkeypatch.setenv(k, v)
    if "profiles" in setup:
        (tmp_path / "home" / "profiles.toml").write_text(setup["profiles"])
    if "prefect_toml" in setup:
        (tmp_path / "prefect.toml").write_text(setup["prefect_toml"])
    if "dotenv" in setup:
        (tmp_path / ".env").write_text(setup["dotenv"])
    assert configured_api_url() == Settings().api.url


# ------------------------------------------------------------------------------------------------------------
# Killed runs


@pytest.mark.slow
def test_killed_run_is_marked_crashed_by_the_next(prefect_harness: None, tmp_path: Path, mlflow_yml: Path) -> None:
    """Regression (issue 13): 14 of 41 SIGKILLed flow runs stayed RUNNING in Prefect (holding a deployment's
    concurrency slot when they were deployment runs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL

    from flows.crashed import root_tag
    from flows.embedding_pipeline import embedding_pipeline

    src = tmp_path / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=15_000).write_parquet(src)
    overrides = [f"ingest.source.path={src}", f"output_root={tmp_path / 'out'}", *CHEAP, "registry.enabled=false"]
    cfg = str(REPO / "configs/retail.yaml")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(REPO)}
    tag = root_tag(tmp_path / "out" / "retail")
    by_tag = FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
    cmd = [sys.executable, "-m", "recsys_embed.cli", "-q", "--mlflow-config", str(mlflow_yml), "run", "--config",
           cfg, *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    with get_client(sync_client=True) as client, background(cmd, tmp_path / "run.log", env, tmp_path) as proc:
        # the run holds the output lock once it carries the tag: kill it there, mid-run, without a goodbye
        killed = _wait("tagged running flow run", lambda: next(iter(client.read_flow_runs(flow_run_filter=by_tag)),
                       None), 120, proc, tmp_path / "run.log")  # fmt: skip
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert client.read_flow_run(killed.id).state_type == StateType.RUNNING  # nothing marked it: it cannot

    second = embedding_pipeline(cfg, overrides, str(mlflow_yml))
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(killed.id).state
    assert state is not None and state.type == StateType.CRASHED, state
    assert "left RUNNING by a killed process" in (state.message or "")
    assert (Path(second["run_dir"]) / "summary.json").exists()


def _running_of(client: Any, flow_name: str, out: Path) -> list[Any]:
    """RUNNING flow runs of flow ``flow_name`` whose ``overrides`` parameter points ``output_root`` at ``out``: found
    by what the run was started with, so also when it was killed before it tagged itself."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                 flow_run_filter=running)  # fmt: skip
    return [r for r in runs if f"output_root={out}" in (r.parameters.get("overrides") or [])]


def _decoy(client: Any, tags: list[str]) -> Any:
    """A RUNNING flow run of the main flow carrying ``tags``, created here (no process runs it)."""
    from prefect import flow
    from prefect.states import Running

    @flow(name="embedding-pipeline")
    def stand_in() -> None:
        pass

    run = client.create_flow_run(stand_in, tags=tags)
    client.set_flow_run_state(run.id, Running(), force=True)
    return run


@pytest.fixture
def hung_mlflow(tmp_path: Path) -> Iterator[Path]:
    """An mlflow.yml naming a port that accepts connections and never answers: a run started with it spends the
    5 s health-check timeout before it takes the output folder's lock."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yml = tmp_path / "hung-mlflow.yml"
        yml.write_text(f"tracking_uri: http://127.0.0.1:{s.getsockname()[1]}\nexperiment_name: hung\n")
        yield yml


@pytest.mark.slow
def test_run_killed_before_its_lock_is_marked_crashed_by_the_next(
    prefect_harness: None, tmp_path: Path, mlflow_yml: Path, hung_mlflow: Path
) -> None:
    """Regression (issue 20, 7b): a `run` killed within ~2 s of its start, before it held the output folder's lock,
    carried no tag and stayed RUNNING for good. A live run of the same folder that has not reached the lock yet,
    and a dead one of another folder, must be left alone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelled

    from flows.crashed import process_tag, root_tag, start_tag
    from flows.embedding_pipeline import embedding_pipeline

    src = tmp_path / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=15_000).write_parquet(src)
    out = tmp_path / "out"
    root = out / "retail"
    overrides = [f"ingest.source.path={src}", f"output_root={out}", *CHEAP, "registry.enabled=false"]
    cfg = str(REPO / "configs/retail.yaml")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "recsys_embed.cli", "-q", "--mlflow-config", str(hung_mlflow), "run", "--config",
           cfg, *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    gone = subprocess.Popen(["sleep", "60"])
    gone_tag = process_tag(gone.pid)
    gone.kill()
    gone.wait()
    with get_client(sync_client=True) as client:
        live = _decoy(client, [start_tag(root), process_tag()])  # this test's process: alive, before the lock
        elsewhere = _decoy(client, [start_tag(tmp_path / "other" / "retail"), gone_tag])
        with background(cmd, tmp_path / "run.log", env, tmp_path) as proc:
            killed = _wait("the run's RUNNING flow run", lambda: next(iter(_running_of(client, "embedding-pipeline",
                           out)), None), 120, proc, tmp_path / "run.log")  # fmt: skip
            t0 = time.perf_counter()  # kill it once it tagged itself (the new code does at once), within ~2 s
            while start_tag(root) not in killed.tags and time.perf_counter() - t0 < 2.0:
                time.sleep(0.1)
                killed = client.read_flow_run(killed.id)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        killed = client.read_flow_run(killed.id)
        assert killed.state_type == StateType.RUNNING  # nothing marked it: it cannot
        assert root_tag(root) not in killed.tags  # killed before it held the lock (in the MLflow health check)

    second = embedding_pipeline(cfg, overrides, str(mlflow_yml))
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(killed.id).state
        decoys = {n: client.read_flow_run(r.id).state_type for n, r in (("live", live), ("elsewhere", elsewhere))}
        for r in (live, elsewhere):
            client.set_flow_run_state(r.id, Cancelled(), force=True)
    assert state is not None and state.type == StateType.CRASHED, state
    assert "left RUNNING by a killed process" in (state.message or "")
    assert decoys == {"live": StateType.RUNNING, "elsewhere": StateType.RUNNING}
    assert (Path(second["run_dir"]) / "summary.json").exists()


@pytest.mark.slow
def test_killed_backtest_is_marked_crashed_by_the_next(prefect_harness: None, tmp_path: Path, mlflow_yml: Path) -> None:
    """Regression (issue 20, 7c): a SIGKILLed `recsys-embed backtest` left its parent flow run RUNNING for good (only
    its pipeline subflow was marked by the next run). Killed in the subflow's split here: the next backtest marks
    the parent, its own subflow marks the dead subflow, and neither touches the live parent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL

    from flows.backtest import backtest_flow
    from flows.crashed import root_tag
    from recsys_embed import faults
    from recsys_embed.data.generate import generate, preset

    log_dir = tmp_path / "log"
    generate(preset("tiny", n_events=20_000, n_users=400, n_items=300, days=30), log_dir)
    out = tmp_path / "out"
    root = out / "synthetic-1m-backtest-7d"
    overrides = [f"ingest.source.path={log_dir}", f"output_root={out}", *CHEAP]
    cfg = str(SYNTHETIC)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(REPO),
           faults.KILL_AT: "split"}  # fmt: skip
    cmd = [sys.executable, "-m", "recsys_embed.cli", "-q", "--mlflow-config", str(mlflow_yml), "backtest", "--config",
           cfg, "--holdout-days", "7", *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    with get_client(sync_client=True) as client:
        parents = _running_of(client, "backtest", out)
        subflows = [r for r in _running_of(client, "embedding-pipeline", out) if root_tag(root) in r.tags]
    assert len(parents) == 1 and len(subflows) == 1, (parents, subflows)  # left RUNNING by the kill

    state = backtest_flow(cfg, overrides, str(mlflow_yml), holdout_days=7, return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        ends = {n: client.read_flow_run(r.id).state for n, r in (("parent", parents[0]), ("subflow", subflows[0]))}
        mine = client.read_flow_run_states(state.state_details.flow_run_id)
    for name, end in ends.items():
        assert end is not None and end.type == StateType.CRASHED, (name, end)
        assert "left RUNNING by a killed process" in (end.message or ""), name
    assert "/.backtest/.run.lock" in (ends["parent"].message or "")
    assert [s.type for s in mine][-1] == StateType.COMPLETED
    assert StateType.CRASHED not in [s.type for s in mine]  # the new backtest's subflow left its live parent alone


def test_second_run_on_same_output_is_refused(tmp_path: Path) -> None:
    held = run_lock(tmp_path / "retail")
    with held, pytest.raises(RunLockedError, match=r"another run is writing to .*pid"), run_lock(tmp_path / "retail"):
        pass
    with run_lock(tmp_path / "retail"):  # released at exit: the next run goes ahead
        pass


def test_a_trial_deployment_never_touches_production() -> None:
    """Issue 22: a schedule being tried wrote into the production registry and current/. `serve --trial` gives its
    runs their own output folder, registered model and deployment, and no database export."""
    from flows.deploy import build_deployment, trial_overrides
    from recsys_embed.config import MlflowSettings, load_config, registered_name

    cfg = load_config(REPO / "configs/retail.yaml", ["export.database.enabled=true"])
    trial = load_config(REPO / "configs/retail.yaml", ["export.database.enabled=true", *trial_overrides(cfg)])
    settings = MlflowSettings()
    assert trial.name == "retail-trial" and (Path(trial.output_root) / trial.name) != (Path(cfg.output_root) / cfg.name)
    assert registered_name(trial, settings) == "recsys-embed-recommender-retail-trial" != registered_name(cfg, settings)
    assert trial.export.database.enabled is False
    named = load_config(REPO / "configs/retail.yaml", ["registry.name=shop-recs"])
    assert "registry.name=shop-recs-trial" in trial_overrides(named)
    dep = build_deployment(str(REPO / "configs/retail.yaml"), ["schedule.cron=* * * * *", *trial_overrides(cfg)])
    assert dep.name == "retail-trial-nightly" and "name=retail-trial" in dep.parameters["overrides"]
