"""MLflow at the edge: with ``registry`` (the Model Registry edge), the only modules that import mlflow.

Everything goes through ``MlflowClient`` with explicit run ids (no fluent "active run"), because Prefect
runs tasks in worker threads and MLflow's active-run stack is per thread.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recsys_embed.config import MlflowSettings
from recsys_embed.errors import RecsysEmbedError

log = logging.getLogger(__name__)

_MAX_PARAM = 6000  # MLflow's limit on a param value


class TrackingError(RecsysEmbedError):
    """The MLflow store cannot be used (names the URI, secrets redacted, and the fix)."""


def redact_uri(uri: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``; also masks ``password=`` query values."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)
    netloc = parts.netloc
    if "@" not in netloc and not re.search(r"(?i)(password|token|secret)=", parts.query):
        return uri  # nothing secret; urlunsplit would also drop the empty host of sqlite:////abs/path
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in creds else f"{user}@{host}"
    query = re.sub(r"(?i)(password|token|secret)=[^&]*", r"\1=***", parts.query)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def resolve_settings(settings: MlflowSettings, root: Path | None = None) -> MlflowSettings:
    """Make a relative SQLite path and the artifact location absolute (relative to ``root``, default cwd)."""
    root = (root or Path.cwd()).resolve()
    out = settings.model_copy()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_absolute():
            out.tracking_uri = f"sqlite:///{(root / db).as_posix()}"
    art = settings.artifact_location
    if "://" not in art:
        p = Path(art)
        out.artifact_location = (p if p.is_absolute() else root / p).resolve().as_uri()
    return out


def check_reachable(settings: MlflowSettings, timeout_s: float = 5.0) -> None:
    """Fail fast, before any heavy work, when the tracking store cannot be used."""
    uri = settings.tracking_uri
    shown = redact_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(
                f"MLflow store {shown}: cannot create folder '{db.parent}' ({e.strerror}); "
                "fix the path in mlflow.yml or set MLFLOW_TRACKING_URI"
            ) from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(
                f"MLflow store {shown}: folder '{db.parent}' is not writable; "
                "fix its permissions or point mlflow.yml/MLFLOW_TRACKING_URI elsewhere"
            )
        return
    if uri.startswith(("http://", "https://")):
        import urllib.request

        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status == 200:
                    return
                reason = f"HTTP {resp.status}"
        except Exception as e:  # any network failure is the same answer for the user
            reason = str(getattr(e, "reason", e))
        raise TrackingError(
            f"MLflow tracking server {shown} is unreachable ({reason}); start it "
            f"(`mlflow server ...`) or set MLFLOW_TRACKING_URI to a reachable store"
        )


def git_commit(root: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Tracker:
    """Logs to one experiment of one store; every call names its run id explicitly."""

    def __init__(self, settings: MlflowSettings, root: Path | None = None, retries: int = 3) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.settings = resolve_settings(settings, root)
        self.retries = retries
        check_reachable(self.settings)
        mlflow.set_tracking_uri(self.settings.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.settings.tracking_uri)
        exp = self._retry(self.client.get_experiment_by_name, self.settings.experiment_name)
        if exp is None:
            self.experiment_id = self._retry(
                self.client.create_experiment,
                self.settings.experiment_name,
                artifact_location=self.settings.artifact_location,
            )
        else:
            self.experiment_id = exp.experiment_id

    def _retry(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call an MLflow client method, retrying transient failures with exponential backoff."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if attempt == self.retries or not _transient(e):
                    raise
                log.warning("MLflow call %s failed (%s); retrying in %.1fs", fn.__name__, e, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    @property
    def tracking_uri(self) -> str:
        return self.settings.tracking_uri

    def start_run(self, name: str, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._retry(self.client.create_run, self.experiment_id, run_name=name, tags=all_tags)
        return str(run.info.run_id)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._retry(self.client.set_terminated, run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._retry(self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(_metric_name(k), float(v), ts, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        for i in range(0, len(items), 500):
            self._retry(self.client.log_batch, run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._retry(self.client.set_tag, run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._retry(self.client.log_artifacts, run_id, str(p), artifact_path)
        else:
            self._retry(self.client.log_artifact, run_id, str(p), artifact_path)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self._retry(self.client.log_dict, run_id, obj, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._retry(self.client.log_text, run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self._retry(self.client.log_figure, run_id, figure, artifact_file)

    def log_dataset(self, run_id: str, events_path: str | Path, source: str, fingerprint: str, name: str) -> None:
        """Log the input dataset (schema, profile and digest) as a run input; the digest is the fingerprint."""
        import polars as pl
        from mlflow.data.polars_dataset import from_polars
        from mlflow.entities import DatasetInput, InputTag

        frame = pl.read_parquet(events_path, n_rows=1000)
        ds = from_polars(frame, source=source, name=name, digest=fingerprint[:32])
        ds_input = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
        self._retry(self.client.log_inputs, run_id, datasets=[ds_input])

    def run_url(self, run_id: str) -> str:
        """Where to look at a run: the UI path (``recsys-embed ui`` serves it locally)."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"

    def mark_stale_runs_failed(self, older_than_s: float = 0.0) -> list[str]:
        """Runs still RUNNING from a killed process are marked KILLED so they don't stay RUNNING forever."""
        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=500)
        now = time.time() * 1000
        killed = []
        for r in runs:
            if now - r.info.start_time >= older_than_s * 1000:
                self.client.set_terminated(r.info.run_id, status="KILLED")
                killed.append(r.info.run_id)
        return killed


def _transient(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("timeout", "connection", "temporarily", "locked", "503", "502", "unavailable"))


def _metric_name(name: str) -> str:
    """MLflow-legal metric name: letters, digits, ``_ - . / space`` only."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= _MAX_PARAM else s[: _MAX_PARAM - 3] + "..."


def lightning_logger(settings: MlflowSettings, run_id: str) -> Any:
    """A Lightning ``MLFlowLogger`` that logs into an existing (nested) run; only rank 0 writes."""
    from pytorch_lightning.loggers import MLFlowLogger

    resolved = resolve_settings(settings)
    return MLFlowLogger(
        experiment_name=resolved.experiment_name,
        tracking_uri=resolved.tracking_uri,
        run_id=run_id,
        log_model=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Loading back from a run (usable in a fresh process given only the run id)


def download_run_artifact(run_id: str, artifact_path: str, tracking_uri: str | None = None) -> Path:
    import mlflow.artifacts

    uri = tracking_uri or resolve_settings(_settings_from_env()).tracking_uri
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, tracking_uri=uri)
    return Path(local)


def _settings_from_env() -> MlflowSettings:
    from recsys_embed.config import load_mlflow_settings

    return load_mlflow_settings()


def load_run_embeddings(run_id: str, model: str, tracking_uri: str | None = None) -> Any:
    """The ``Embeddings`` a pipeline run logged for ``model`` (parent or model run id both work)."""
    from recsys_embed.store import load_embeddings

    return load_embeddings(download_run_artifact(run_id, f"embeddings/{model}", tracking_uri))


def load_run_topk(run_id: str, model: str, tracking_uri: str | None = None) -> Any:
    """The top-k table a pipeline run logged for ``model`` as a Polars frame."""
    from recsys_embed.io import read_table

    return read_table(download_run_artifact(run_id, f"exports/{model}/topk", tracking_uri))
