"""A throwaway PostgreSQL server for tests: initdb + pg_ctl on a temp dir, a free loopback port, trust auth.

Skips (with the reason) when the server binaries are absent; ``apt-get install postgresql`` provides them
(the Makefile's ``test`` target does that on Debian/Ubuntu when run as root). PostgreSQL refuses to run as
root, so as root the server runs as ``nobody`` through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield ``postgresql://postgres:s3cret@127.0.0.1:<port>/postgres`` (trust auth ignores the password)."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed; apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg not installed; pip install -c constraints.txt 'psycopg[binary]'")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if not runuser:
            pytest.skip("running as root and runuser is missing; PostgreSQL refuses to run as root")
        prefix = [runuser, "-u", "nobody", "--"]
        shutil.chown(root, "nobody", "nogroup")
    root.chmod(0o700)
    data = root / "data"
    port = _free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)

    run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log.txt"), "-w", "-t", "60", "start")
    try:
        yield f"postgresql://postgres:s3cret@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(Exception):
            run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
