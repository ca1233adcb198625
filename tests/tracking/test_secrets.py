"""Secrets stay secret (issue 7): a password in the MLflow tracking URI or in the export database URI appears in
no log line, no MLflow param/tag/run name, no manifest (summary.json, summary.md), no output file and no error
message. End to end against a real ``mlflow server`` behind a proxy that demands the credentials, so the test
also proves they still reach the server after being taken out of the URI."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from recsys_embed.config import MlflowSettings
from recsys_embed.tracking.tracker import TrackingError, check_reachable, redact_text, redact_uri, split_credentials
from tests.conftest import REPO, RETAIL
from tests.mlflow_server import AuthProxy, MlflowServer, free_port, mlflow_server
from tests.pg_server import _bin, postgres_server

SECRET = "s3cr3t-Tr4ck"  # the MLflow password
DB_SECRET = "s3cr3t-Db"  # the export database password
USER = "alice"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as s:
        yield s


@pytest.fixture(scope="module")
def proxy(server: MlflowServer) -> Iterator[AuthProxy]:
    p = AuthProxy(server.port, USER, SECRET).start()
    yield p
    p.stop()


@pytest.fixture
def db_uri(tmp_path: Path) -> Iterator[str]:
    """The export database: a throwaway PostgreSQL with a password in its URI when the server binaries exist
    (trust auth: the password is carried, not checked), else a SQLite file (which has no password to leak)."""
    if _bin("initdb") and _bin("pg_ctl"):
        with postgres_server() as uri:
            yield uri.replace(":s3cret@", f":{DB_SECRET}@")
    else:
        yield f"sqlite:///{tmp_path / 'recs.db'}"


@pytest.fixture
def clean_auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """resolve_settings moves URI credentials into these variables; undo that after the test."""
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")

    def text(self) -> str:
        return "\n".join(self.lines)


def _no_secret(text: str, where: str) -> None:
    for s in (SECRET, DB_SECRET):
        assert s not in text, f"secret {s!r} leaked into {where}: ...{text[max(text.find(s) - 200, 0):][:400]}..."


# ---------------------------------------------------------------------------------------------------------
# helpers


def test_redaction_helpers() -> None:
    assert redact_uri(f"postgresql://bob:{DB_SECRET}@db:5432/x") == "postgresql://bob:***@db:5432/x"
    assert redact_uri(f"http://{USER}:{SECRET}@127.0.0.1:5000/") == f"http://{USER}:***@127.0.0.1:5000/"
    assert redact_uri("sqlite:////abs/path.db") == "sqlite:////abs/path.db"  # nothing secret, path kept
    msg = f"API request to http://{USER}:{SECRET}@h:1/api failed; dsn host=h password={DB_SECRET} user=u"
    assert redact_text(msg) == "API request to http://alice:***@h:1/api failed; dsn host=h password=*** user=u"
    assert split_credentials(f"http://{USER}:p%40{SECRET}@h:1/x") == ("http://h:1/x", USER, f"p@{SECRET}")
    assert split_credentials("sqlite:///x.db") == ("sqlite:///x.db", None, None)


def test_credentials_leave_the_uri_but_reach_the_server(proxy: AuthProxy, clean_auth_env: None) -> None:
    from recsys_embed.tracking.tracker import Tracker

    uri = f"http://{USER}:{SECRET}@127.0.0.1:{proxy.port}"
    before = proxy.accepted
    # regression: check_reachable handed user:secret@host to urllib, which looked up "alice:...@127.0.0.1"
    # as a host name, so a reachable server with credentials was reported unreachable
    check_reachable(MlflowSettings(tracking_uri=uri))
    tracker = Tracker(MlflowSettings(tracking_uri=uri, experiment_name="secrets-unit"))
    assert tracker.settings.tracking_uri == f"http://127.0.0.1:{proxy.port}"  # what MLflow (and logs) see
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET  # MLflow's own basic-auth variable
    run = tracker.start_run("r")
    tracker.end_run(run)
    assert proxy.accepted > before and proxy.rejected == 0  # every call carried the credentials

    # a wrong password: one line, the URI redacted, neither password shown
    os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(TrackingError) as e:
        check_reachable(MlflowSettings(tracking_uri=f"http://{USER}:wrong-{SECRET}@127.0.0.1:{proxy.port}"))
    assert "Unauthorized" in str(e.value) and f"127.0.0.1:{proxy.port}" in str(e.value)
    _no_secret(str(e.value), "the error")


def test_error_messages_name_the_store_not_the_secret(tmp_path: Path, clean_auth_env: None) -> None:
    from recsys_embed.serving.dbexport import DatabaseExportError, write_frames
    from recsys_embed.tracking.tracker import Tracker

    dead = free_port()
    with pytest.raises(TrackingError) as e:
        Tracker(MlflowSettings(tracking_uri=f"http://{USER}:{SECRET}@127.0.0.1:{dead}"))
    assert f"http://127.0.0.1:{dead}" in str(e.value) and "\n" not in str(e.value)
    _no_secret(str(e.value), "the tracking error")
    frame = pl.DataFrame({"user_id": ["u"], "rank": [1]})
    with pytest.raises(DatabaseExportError) as d:
        write_frames(iter([frame]), frame.schema, f"postgresql://bob:{DB_SECRET}@127.0.0.1:{dead}/x", "t")
    assert f"127.0.0.1:{dead}" in str(d.value) and "bob:***@" in str(d.value)
    _no_secret(str(d.value), "the database error")


# ---------------------------------------------------------------------------------------------------------
# the whole flow


@pytest.mark.slow
def test_flow_leaks_no_secret_anywhere(
    prefect_harness: None,
    server: MlflowServer,
    proxy: AuthProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    clean_auth_env: None,
    db_uri: str,
) -> None:
    from mlflow import MlflowClient

    from flows.embedding_pipeline import embedding_pipeline

    src = tmp_path / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=15_000).write_parquet(src)
    yml = tmp_path / "mlflow.yml"
    yml.write_text(f"tracking_uri: sqlite:///unused.db\nartifact_location: {tmp_path / 'art'}\n"
                   "experiment_name: secrets-flow\n", encoding="utf-8")  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{USER}:{SECRET}@127.0.0.1:{proxy.port}")
    overrides = [
        f"ingest.source.path={src}", f"output_root={tmp_path / 'out'}", "models.bpr.enabled=false",
        "models.two_tower.enabled=false", "models.als.iterations=2", "models.als.eval_every=1",
        "export.write_csv=true", "export.database.enabled=true", "export.database.uri_env=RECSYS_TEST_DB_URI",
        "models.ease.enabled=false", "tuning.enabled=false",
    ]  # fmt: skip
    monkeypatch.setenv("RECSYS_TEST_DB_URI", db_uri)
    accepted, rejected = proxy.accepted, proxy.rejected  # the proxy is shared by this module's tests
    records = _Records()  # every record of these loggers, whatever their propagation settings
    loggers = [logging.getLogger(n) for n in ("", "recsys_embed", "flows", "mlflow", "prefect", "urllib3", "httpx")]
    for lg in loggers:
        lg.addHandler(records)
    try:
        with caplog.at_level(logging.DEBUG):
            manifest = embedding_pipeline(str(REPO / "configs/retail.yaml"), overrides, str(yml))
    finally:
        for lg in loggers:
            lg.removeHandler(records)

    # the credentials reached the server on every call, and the run really happened
    assert proxy.rejected == rejected and proxy.accepted > accepted + 20
    assert manifest["mlflow"]["tracking_uri"] == f"http://127.0.0.1:{proxy.port}"
    assert manifest["database"] and manifest["database"]["tables"]
    if db_uri.startswith("postgresql"):
        assert "postgres:***@" in manifest["database"]["uri"]

    # logs and console (MLflow's own "View run at ..." lines, Prefect, ours)
    out = capfd.readouterr()
    console = out.out + out.err
    _no_secret(console, "stdout/stderr")
    _no_secret(caplog.text, "the log records")
    _no_secret(records.text(), "the log records")
    assert "db export: committed" in records.text()  # our line naming the (redacted) database URI was seen
    assert f"View run als at: http://127.0.0.1:{proxy.port}/" in console + records.text()  # MLflow's URL, clean

    # every param, tag and name of every run; registered versions
    client = MlflowClient(f"http://127.0.0.1:{proxy.port}")
    exp = client.get_experiment_by_name("secrets-flow")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 3  # parent + popularity + als
    parent = client.get_run(manifest["mlflow"]["run_id"])
    assert parent.data.params  # the flattened config was logged (so the check below is not vacuous)
    for r in runs:
        _no_secret(repr(r.data.params) + repr(r.data.tags) + str(r.info.run_name), f"run {r.info.run_id}")
    for m in client.search_registered_models():
        for v in client.search_model_versions(f"name='{m.name}'"):
            _no_secret(repr(v.tags) + str(v.source) + str(v.description), f"model version {m.name} v{v.version}")

    # manifests: summary.json on disk, summary.md as logged
    run_dir = Path(manifest["run_dir"])
    _no_secret((run_dir / "summary.json").read_text(encoding="utf-8"), "summary.json")
    md = Path(client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path / "dl")))
    assert "MLflow run" in md.read_text(encoding="utf-8")
    _no_secret(md.read_text(encoding="utf-8"), "summary.md")

    # and no byte of any file we or the server wrote: outputs, artifacts, the server's own store
    for folder in (tmp_path, server.folder):
        for f in folder.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                for s in (SECRET, DB_SECRET):
                    assert s.encode() not in data, f"secret {s!r} is in {f}"

