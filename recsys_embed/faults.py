"""Fault-injection points (failpoints) for the reliability suite.

Production code calls ``checkpoint("<point>")`` at the boundaries the fault suite kills at (``ingest``,
``split``, ``train:<model>``, ``evaluate:<model>``, ``log:<model>``, ``export:<model>``, ``export-shard:<i>``
...). It does nothing unless ``$RECSYS_EMBED_KILL_AT`` names the point (shell-style patterns allowed,
e.g. ``train:*``); then the process is SIGKILLed on the spot, the way an OOM killer or a preempted node would.

``$RECSYS_EMBED_KILL_MARKER`` (a file path) makes the fault fire once: the first hit creates the marker and
dies, later hits (the re-run, a retried Dask task) see the marker and carry on.
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
    pattern = os.environ.get(KILL_AT)
    if not pattern or not fnmatch.fnmatchcase(point, pattern):
        return
    marker = os.environ.get(KILL_MARKER)
    if marker:
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
