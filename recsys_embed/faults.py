"""Fault-injection points (failpoints) for the reliability suite.

Production code calls ``checkpoint("<point>")`` at the boundaries the fault suite kills at. The points:

- ``ingest``: events and quarantine written into the staging folder, not committed (``stages.run_ingest``);
- ``split``: mid-split, the train matrix staged, ID maps and targets not (``stages.run_split``);
- ``train:<model>``: fitted, nothing saved (``stages.run_train``);
- ``evaluate:<model>``: test metrics computed, not returned (``stages.run_evaluate``);
- ``export:<model>``: top-k table committed, similar-items table not written (``shipping.run_export``);
- ``log:<model>``: the model's MLflow run half logged (``reporting.log_model_run``);
- ``register``: a registry version created with its decision, no alias moved yet (``registry.register_best``);
- ``register:alias``: the decision's alias moved, the version's decision not marked applied, ``champion.json`` not
  written (``registry.register_best``);
- ``publish:champion``: ``champion.json`` names the new champion, the ``current`` link not moved
  (``shipping.run_publish``);
- ``db-export``: the top-k database table swapped in, the similar-items one not (``shipping.run_db_export``);
- ``export-shard:<i>``: one Dask shard of the top-k table written (``shards``);
- ``tune-trial:<model>:<n>``: trial number n of a search fitted and scored, not stored as finished (``tuning``);
- ``tune:<model>:<n>``: the n-th trial of a model's search stored, the next not started (``tuning``).

``tests/flows/test_faults.py`` kills the flow at each one and checks the re-run. ``checkpoint`` does nothing unless
``$RECSYS_EMBED_KILL_AT`` names the point (shell-style patterns allowed, e.g. ``train:*``; several separated by
commas); then the process is SIGKILLed on the spot, the way an OOM killer or a preempted node would.

``$RECSYS_EMBED_KILL_MARKER`` makes a fault fire once. A file path: the first hit of any named point creates the
marker and dies, later hits (the re-run, a retried Dask task) see the marker and carry on. An existing folder:
one marker per point inside it, so each named point fires once, and re-running the same command in the same
environment dies at the next named point until every one has fired (``fired_points`` lists them in order).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

KILL_AT = "RECSYS_EMBED_KILL_AT"
KILL_MARKER = "RECSYS_EMBED_KILL_MARKER"


def checkpoint(point: str) -> None:
    """SIGKILL this process if ``$RECSYS_EMBED_KILL_AT`` matches ``point`` (and the once-marker is absent)."""
    patterns = os.environ.get(KILL_AT)
    if not patterns or not any(fnmatch.fnmatchcase(point, p.strip()) for p in patterns.split(",") if p.strip()):
        return
    marker = os.environ.get(KILL_MARKER)
    if marker:
        if os.path.isdir(marker):  # one marker per point
            marker = os.path.join(marker, _marker_name(point))
        try:  # O_EXCL: exactly one process fires even if several hit the point at once
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, point.encode())
        os.close(fd)
    log.warning("fault injection: SIGKILL at %s (pid %d)", point, os.getpid())
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fired(marker: str | Path) -> str | None:
    """The point a once-fault fired at, or None if it has not fired."""
    p = Path(marker)
    return p.read_text() if p.exists() else None


def _marker_name(point: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in point)


def fired_points(marker_dir: str | Path) -> list[str]:
    """The points that fired into the marker folder ``marker_dir``, oldest first."""
    files = sorted((p for p in Path(marker_dir).iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    return [p.read_text() for p in files]
