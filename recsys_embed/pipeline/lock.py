"""One run at a time per output folder: an exclusive, non-blocking ``flock`` on ``<root>/.run.lock``.

The lock is released by the kernel when the holding process dies, so a killed run never leaves a stale
lock behind. The file records who holds it (pid, host, start time) for the error message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from recsys_embed.errors import RecsysEmbedError

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"


class RunLockedError(RecsysEmbedError):
    """Another run holds the output folder's lock (names the holder and the fix)."""


@contextlib.contextmanager
def run_lock(root: str | Path) -> Iterator[Path]:
    """Hold ``<root>/.run.lock`` for the duration; raise ``RunLockedError`` at once if another run holds it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            raise RunLockedError(
                f"another run is writing to '{root}' (lock {path} held by {holder}); wait for it to finish, "
                "or point this run at another output_root/name"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": dt.datetime.now(dt.UTC).isoformat()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        log.debug("run lock %s taken (%s)", path, info)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
