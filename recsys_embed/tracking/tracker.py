"""MLflow at the edge: with ``registry`` (the Model Registry edge), the only modules that import mlflow.

Everything goes through ``MlflowClient`` with explicit run ids (no fluent "active run"), because Prefect
runs tasks in worker threads and MLflow's active-run stack is per thread.

Secrets: credentials in an http(s) tracking URI (``http://user:secret@host``) are moved into MLflow's own
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` variables and the URI MLflow sees carries none, so
nothing MLflow logs ("View run at ..."), stores or raises can show them; our own messages use ``redact_uri``.

Outages: the store is checked before any work (``check_reachable``: seconds, not minutes); each call is retried
with backoff (``Tracker._retry``), and a server that stays down becomes one ``TrackingError`` that says where
the local outputs are and how to recover. A ``Tracker`` built once the run is under way (given ``local_outputs``,
as the flow's tasks do) retries that check the same way and fails with the same mid-run wording.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import subprocess
import time
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recsys_embed.config import MlflowSettings
from recsys_embed.errors import RecsysEmbedError

log = logging.getLogger(__name__)

_MAX_PARAM = 6000  # MLflow's limit on a param value
_MAX_NOTE = 8000  # MLflow's limit on a tag value (a run description is the mlflow.note.content tag)
# MLflow's HTTP client defaults (7 retries, backoff factor 2) make one call to a dead server take minutes; these
# keep a refused call to ~3 s, and Tracker._retry adds its own backoff on top (4 tries: ~14 s measured in all).
# The request timeout stays MLflow's (120 s): large artifact uploads need it. Values in the environment win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# MLflow 3 types an experiment by this tag: "custom_model_development" opens the model-training view (runs, metric
# columns, charts); without it the UI may infer "genai_development" and open the GenAI (traces) view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# A saved view of the runs table (MLflow 3's "Saved views" menu on the Runs tab): an experiment tag
# ``mlflow.sharedViewState.<id>`` holding {name, createdAt, updatedAt, state}; ``?viewStateShareKey=<id>`` opens it.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
COMPARISON_VIEW = "model-comparison"


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


def ui_run_url(settings: MlflowSettings, experiment_id: str, run_id: str) -> str | None:
    """A clickable URL of the run in the MLflow UI, or None when the UI address is unknown.

    The address is ``settings.ui_url`` (``MLFLOW_UI_URL``), else the tracking URI when it is an http(s) server
    (which serves the UI too); a local store has none. Credentials never appear in the link.
    """
    base = settings.ui_url or (
        settings.tracking_uri if settings.tracking_uri.startswith(("http://", "https://")) else None
    )
    if not base:
        return None
    clean = split_credentials(base)[0].rstrip("/")
    return f"{clean}/#/experiments/{experiment_id}/runs/{run_id}"


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with ``//user:secret@`` and ``password=...`` masked."""
    out = re.sub(r"//([^:/@\s]+):[^@\s/]*@", r"//\1:***@", text)
    return re.sub(r"(?i)\b(password|token|secret)=[^&\s]*", r"\1=***", out)


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http(s)://user:secret@host/...`` -> (``http(s)://host/...``, user, secret), percent-decoded; other URIs
    come back unchanged with (None, None)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    creds, host = parts.netloc.rsplit("@", 1)
    user, _, secret = creds.partition(":")
    clean = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, urllib.parse.unquote(user), (urllib.parse.unquote(secret) if secret else None)


def resolve_settings(settings: MlflowSettings, root: Path | None = None) -> MlflowSettings:
    """Make a relative SQLite path and the artifact location absolute (relative to ``root``, default cwd).

    Credentials in an http(s) tracking URI move to ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
    (MLflow's own basic-auth variables, set in this process) and the returned URI holds none.
    """
    root = (root or Path.cwd()).resolve()
    out = settings.model_copy()
    uri, user, secret = split_credentials(settings.tracking_uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if secret is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = secret
        out.tracking_uri = uri
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
    """Fail fast, before any heavy work, when the tracking store cannot be used (the start-up wording: start the
    server or point at another store)."""
    t0 = time.perf_counter()
    reason = _unhealthy(settings, timeout_s)
    if reason is not None:
        raise TrackingError(
            f"MLflow tracking server {redact_uri(settings.tracking_uri)} is unreachable ({reason}, after "
            f"{time.perf_counter() - t0:.1f}s); start it (`mlflow server ...`) or set MLFLOW_TRACKING_URI to a "
            "reachable store"
        )


def _unhealthy(settings: MlflowSettings, timeout_s: float) -> str | None:
    """Why the server's ``/health`` does not answer 200 (redacted), or None when it does (or the store is local).

    Raises:
        TrackingError: a local SQLite store whose folder cannot be created or written.
    """
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
        if not db.exists():
            create_sqlite_store(db, settings.artifact_location)
        return None
    if uri.startswith(("http://", "https://")):
        import urllib.request

        clean, user, secret = split_credentials(uri)  # urllib cannot take user:secret@ in the host
        user = user or os.environ.get("MLFLOW_TRACKING_USERNAME")
        secret = secret or os.environ.get("MLFLOW_TRACKING_PASSWORD")
        request = urllib.request.Request(clean.rstrip("/") + "/health")
        if user:
            token = base64.b64encode(f"{user}:{secret or ''}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                if resp.status == 200:
                    return None
                return f"HTTP {resp.status}"
        except Exception as e:  # any network failure is the same answer for the user
            return redact_text(str(getattr(e, "reason", e)))
    return None


def create_sqlite_store(db: Path, artifact_location: str) -> None:
    """Create a new SQLite MLflow store at ``db`` in one step: its schema is built in a hidden file beside it, then
    linked into place only if ``db`` is still absent (another process may have created it meanwhile).

    MLflow builds a new store by running its schema migrations one by one; a run killed during that (the first run
    on a fresh machine takes a few seconds there) left a half-built store that every later run refused with
    ``table ... already exists``. A kill here leaves only the hidden file.
    """
    import uuid

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f".{db.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp.as_posix()}", artifact_location)
        store.engine.dispose()
        with contextlib.suppress(FileExistsError):  # created by another process in the meantime: theirs stands
            os.link(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


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

    def __init__(
        self, settings: MlflowSettings, root: Path | None = None, retries: int = 3, local_outputs: Path | None = None
    ) -> None:
        """Connect (failing within seconds when the store is unusable) and find or create the experiment.

        Args:
            settings: tracking settings; credentials in the URI are moved out of it (see the module doc).
            root: folder that relative store paths are resolved against (default: the working directory).
            retries: extra tries per MLflow call on a transient failure (backoff 0.5 s, 1 s, 2 s, ...).
            local_outputs: where this run's local outputs live; named in the error when MLflow stays down
                (set it later with ``tracker.local_outputs = run_dir`` once the run folder is known). Given here,
                the run is under way (a tracker built inside a task): an unreachable server is retried like any
                call and reported with the mid-run wording (outputs kept, re-run once the server is back), not
                the start-up one.
        """
        import mlflow
        from mlflow import MlflowClient

        from recsys_embed import progress

        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        # MLflow's own upload/download bars follow the project's rule for bars (an interactive terminal, not --quiet)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if progress.enabled() else "false")
        self.settings = resolve_settings(settings, root)
        self.retries = retries
        self.local_outputs = local_outputs
        if local_outputs is None:
            check_reachable(self.settings)  # before any work: seconds, not minutes
        else:
            self._retry(self.health_check)
        mlflow.set_tracking_uri(self.settings.tracking_uri)
        try:
            self.client = MlflowClient(tracking_uri=self.settings.tracking_uri)
            exp = self._retry(self.client.get_experiment_by_name, self.settings.experiment_name)
        except Exception as e:
            # a schema MLflow cannot build on: tables from a killed first run ("already exists", "duplicate column")
            if type(e).__name__ == "OperationalError" and self.settings.tracking_uri.startswith("sqlite:"):
                raise TrackingError(
                    f"MLflow store {redact_uri(self.settings.tracking_uri)} is half-built (an earlier version's first "
                    f"run was killed while MLflow created its tables: {_short_reason(e)}); it holds no complete run: "
                    "move it aside (or delete it) and re-run, and recsys-embed builds a new one in one step"
                ) from None
            raise
        if exp is None:
            self.experiment_id = self._retry(
                self.client.create_experiment,
                self.settings.experiment_name,
                artifact_location=self.settings.artifact_location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        else:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # created before the tag; a kind someone chose is kept
                self._retry(self.client.set_experiment_tag, self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def _retry(self, fn: Any, *args: Any, retries: int | None = None, **kwargs: Any) -> Any:
        """Call an MLflow client method, retrying transient failures with exponential backoff.

        Raises:
            TrackingError: the store stayed unreachable through every try; the message names the (redacted)
                URI, the number of tries, where the local outputs are, and how to recover.
        """
        retries = self.retries if retries is None else retries
        delay = 0.5
        for attempt in range(retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not _transient(e):
                    raise
                if attempt == retries:
                    raise self._unreachable(fn.__name__, attempt + 1, _short_reason(e)) from e
                log.warning("MLflow call %s failed (%s); retrying in %.1fs", fn.__name__, _short_reason(e), delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def health_check(self) -> None:
        """The start-up check, mid-run: raise ``ConnectionError`` (transient, so ``_retry`` retries it) while the
        server does not answer."""
        reason = _unhealthy(self.settings, timeout_s=5.0)
        if reason is not None:
            raise ConnectionError(reason)

    def _unreachable(self, call: str, tries: int, reason: str) -> TrackingError:
        where = f"in '{self.local_outputs}'" if self.local_outputs else "under the configured output folder"
        return TrackingError(
            f"MLflow at {redact_uri(self.settings.tracking_uri)} unreachable after {tries} tries ({call}: "
            f"{reason}); local outputs are kept {where}; re-run the same command once the server is back: "
            "completed stages are reused from the cache and the MLflow run left RUNNING is marked KILLED"
        )

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
        """Terminate a run. FINISHED retries like any call; FAILED/KILLED is best effort (one try, a warning
        on failure), since it runs while another error is already on its way to the user."""
        if status == "FINISHED":
            self._retry(self.client.set_terminated, run_id, status=status)
            return
        try:
            self._retry(self.client.set_terminated, run_id, status=status, retries=0)
        except Exception as e:
            reason = _short_reason(e.__cause__ if isinstance(e, TrackingError) and e.__cause__ else e)
            log.warning("could not mark MLflow run %s %s at %s (%s); it stays RUNNING until the next run marks it "
                        "KILLED", run_id, status, redact_uri(self.settings.tracking_uri), reason)  # fmt: skip

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._retry(self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int = 0, dataset: tuple[str, str] | None = None
    ) -> None:
        """Log numeric ``metrics`` at ``step``; ``dataset`` = (name, digest) links them to that dataset (MLflow 3:
        a model logged later in the run carries the link)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        name, digest = dataset if dataset is not None else (None, None)
        items = [
            Metric(_metric_name(k), float(v), ts, step, dataset_name=name, dataset_digest=digest)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        for i in range(0, len(items), 500):
            self._retry(self.client.log_batch, run_id, metrics=items[i : i + 500])

    def get_run(self, run_id: str) -> Any:
        """The run entity (params, tags, metrics, inputs)."""
        return self._retry(self.client.get_run, run_id)

    def set_description(self, run_id: str, markdown: str) -> None:
        """The run's description in the UI (the ``mlflow.note.content`` tag, rendered as Markdown)."""
        self._retry(self.client.set_tag, run_id, "mlflow.note.content", markdown[:_MAX_NOTE])

    def log_dataset_inputs(self, run_id: str, datasets: list[Any], context: str = "training") -> None:
        """Log dataset entities (e.g. another run's ``inputs.dataset_inputs[i].dataset``) as inputs of ``run_id``."""
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(d, tags=[InputTag("mlflow.data.context", context)]) for d in datasets]
        if inputs:
            self._retry(self.client.log_inputs, run_id, datasets=inputs)

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
        with warnings.catch_warnings():
            # MLflow registers its local-file source class twice ("file" and ""), then warns that a local path
            # "can be interpreted in multiple ways": both are the same class, so there is nothing to act on.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            ds = from_polars(frame, source=source, name=name, digest=fingerprint[:32])
        ds_input = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
        self._retry(self.client.log_inputs, run_id, datasets=[ds_input])

    def run_url(self, run_id: str) -> str:
        """Where to look at a run: the UI path (``recsys-embed ui`` serves it locally)."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"

    def save_comparison_view(
        self, columns: list[str], order_by: str, charts: str, name: str = "Model comparison"
    ) -> str:
        """Save the runs-table view that compares the models (MLflow 3's "Saved views" menu); its UI path.

        The view lists the model runs (those with ``order_by``, a metric the parent run does not carry), best
        ``order_by`` first, with one column per metric in ``columns`` (metric names, e.g. ``test.ndcg_at_20``);
        the chart view shows the metrics whose name contains ``charts`` (e.g. ``ndcg_at_20``). Saved again on every
        run (the metric list follows ``eval.ks``); its creation time is kept.

        Returns:
            ``#/experiments/<id>/runs?viewStateShareKey=model-comparison`` (prefix the UI address).
        """
        import json

        key = f"{VIEW_TAG_PREFIX}{COMPARISON_VIEW}"
        exp = self._retry(self.client.get_experiment, self.experiment_id)
        now = int(time.time() * 1000)
        try:
            created = int(json.loads(exp.tags[key])["createdAt"]) if key in exp.tags else now
        except (ValueError, KeyError, TypeError):
            created = now
        self._retry(self.client.set_experiment_tag, self.experiment_id, key,
                    comparison_view(columns, order_by, charts, name, created, now))  # fmt: skip
        return f"#/experiments/{self.experiment_id}/runs?viewStateShareKey={COMPARISON_VIEW}"

    def pipeline_runs(self, scope: Mapping[str, str]) -> list[Any]:
        """Every run (parents and nested model runs, any status) of ``scope`` (tags a run must carry, e.g.
        ``{"pipeline": "retail", "output_root": "/abs/outputs/retail"}``), newest first."""
        found: list[Any] = []
        token = None
        while True:  # tags are compared here, not in the filter string: values may hold quotes
            page = self._retry(self.client.search_runs, [self.experiment_id], "", max_results=1000,
                               order_by=["attributes.start_time DESC"], page_token=token)  # fmt: skip
            found.extend(r for r in page if all(r.data.tags.get(k) == v for k, v in scope.items()))
            token = page.token
            if not token:
                return found

    def mark_stale_runs_failed(self, scope: Mapping[str, str], older_than_s: float = 0.0) -> list[str]:
        """Mark KILLED the runs of ``scope`` that a killed process left RUNNING; returns their ids (logged).

        ``scope``: tags a run must carry, e.g. ``{"pipeline": "retail", "output_root": "/abs/outputs/retail"}``;
        the nested runs of a matching run are included. Call it only while holding that output folder's run lock
        (``lock.run_lock``): then no live run of the scope exists, so every RUNNING one is stale. Runs of other
        pipelines or output folders in the same experiment are never touched.
        """
        running: list[Any] = []
        token = None
        while True:  # tags are compared here, not in the filter string: values may hold quotes
            page = self._retry(self.client.search_runs, [self.experiment_id], "attributes.status = 'RUNNING'",
                               max_results=1000, page_token=token)  # fmt: skip
            running.extend(page)
            token = page.token
            if not token:
                break
        now = time.time() * 1000
        stale = {
            r.info.run_id
            for r in running
            if all(r.data.tags.get(k) == v for k, v in scope.items()) and now - r.info.start_time >= older_than_s * 1000
        }
        stale |= {r.info.run_id for r in running if r.data.tags.get("mlflow.parentRunId") in stale}
        killed = sorted(stale)
        for run_id in killed:
            self._retry(self.client.set_terminated, run_id, status="KILLED")
        if killed:
            shown = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in running if r.info.run_id in stale)
            log.warning("marked %d MLflow run(s) of %s left RUNNING by a killed run as KILLED: %s",
                        len(killed), dict(scope), shown)  # fmt: skip
        return killed


def delete_artifacts(artifact_uri: str, dry_run: bool = False) -> int | None:
    """Delete everything stored under ``artifact_uri`` (a run's or a LoggedModel's artifact root) through MLflow's
    artifact repository for that URI; returns the bytes it held when they can be counted (a local store), else
    None. ``dry_run`` only counts."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    size = artifact_bytes(artifact_uri)
    if not dry_run:
        get_artifact_repository(artifact_uri).delete_artifacts()
    return size


def artifact_bytes(artifact_uri: str) -> int | None:
    """Bytes that deleting a local (``file:`` or plain path) artifact URI frees; None for a remote store.

    A file hard-linked from elsewhere (the pipeline links cached stages into run folders) frees nothing while
    another link remains, so it counts only when every link to it lies below the path."""
    if "://" in artifact_uri and not artifact_uri.startswith("file:"):
        return None
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(artifact_uri).path) if "://" in artifact_uri
                else artifact_uri)  # fmt: skip
    if not path.exists():
        return 0
    files = [f for f in path.rglob("*") if f.is_file() and not f.is_symlink()] if path.is_dir() else [path]
    links: dict[tuple[int, int], list[os.stat_result]] = {}
    for f in files:
        st = f.stat()
        links.setdefault((st.st_dev, st.st_ino), []).append(st)
    return sum(seen[0].st_size for seen in links.values() if len(seen) >= seen[0].st_nlink)


def comparison_view(
    columns: list[str], order_by: str, charts: str, name: str, created_ms: int, updated_ms: int
) -> str:
    """The saved-view tag value (MLflow 3.x's envelope ``{name, createdAt, updatedAt, state}``, ``state`` the
    runs page's search facets and table state as JSON) for ``Tracker.save_comparison_view``."""
    import json

    def col(metric: str) -> str:
        return f"metrics.`{metric}`"

    state = {
        "searchFilter": f"{col(order_by)} >= 0",  # model runs only: the parent run carries no model metric
        "orderByKey": col(order_by),
        "orderByAsc": False,
        "selectedColumns": [col(m) for m in dict.fromkeys([order_by, *columns])] + ["attributes.`Models`"],
        "chartsSearchFilter": charts,
        "hideEmptyCharts": True,
    }
    return json.dumps({"name": name, "createdAt": created_ms, "updatedAt": updated_ms, "state": json.dumps(state)})


def _short_reason(e: BaseException) -> str:
    """The gist of a failed call, redacted: the OS error (``[Errno 111] Connection refused``) when there is one,
    else the first line of the message (at most 200 characters)."""
    text = redact_text(str(e).strip())
    m = re.search(r"\[Errno -?\d+\][^'\")]*|(?:Read|Connect)?\s*timed out|HTTP \d{3}[^;]*", text)
    if m:
        return m.group(0).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first[:200]


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
