"""A real ``prefect server start`` for tests: a subprocess on a free loopback port, its database and settings in a
temporary ``PREFECT_HOME``, the UI off, shut down (with its process group) at the end even when the test fails.

Unlike ``prefect_test_harness`` (conftest.py), this is the server a user starts, with its own services running:
the scheduler that turns a deployment's cron into scheduled flow runs, and the lease repossessor. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mlflow_server import free_port

PREFECT = Path(sys.executable).with_name("prefect")
STARTUP_TIMEOUT_S = 120.0  # ~17 s on an idle 2-core box (database migrations); much more when it is busy


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """This process's environment without any PREFECT_* setting, then a private ``PREFECT_HOME`` (so no user
    profile applies), analytics off and, when given, ``PREFECT_API_URL``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING")  # fmt: skip
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(api_url + "/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@dataclass
class PrefectServer:
    """A running ``prefect server start`` subprocess."""

    folder: Path
    port: int
    proc: subprocess.Popen[bytes]
    started_s: float = 0.0  # seconds from launch to a healthy /api/health

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def log(self) -> str:
        return (self.folder / "server.log").read_text(encoding="utf-8", errors="replace")

    def env(self, home: Path | None = None) -> dict[str, str]:
        """The environment of a client process of this server (its own ``PREFECT_HOME``: ``folder/client``)."""
        return prefect_env(home or self.folder / "client", self.api_url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


@contextlib.contextmanager
def prefect_server(folder: Path, **settings: str) -> Iterator[PrefectServer]:
    """Start ``prefect server start`` on a free loopback port with ``PREFECT_HOME=folder/home``; ``settings``:
    extra ``PREFECT_*`` environment variables for the server. Stopped (and its group) on exit."""
    if not PREFECT.exists():
        pytest.skip(f"no prefect executable beside the interpreter ({PREFECT})")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**prefect_env(folder / "home"), **settings}
    t0 = time.perf_counter()
    with open(folder / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    server = PrefectServer(folder, port, proc)
    try:
        while not _healthy(server.api_url):
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode} before healthy:\n{server.log[-3000:]}")
            if time.perf_counter() - t0 > STARTUP_TIMEOUT_S:
                pytest.fail(f"prefect server not healthy after {STARTUP_TIMEOUT_S:.0f}s:\n{server.log[-3000:]}")
            time.sleep(0.25)
        server.started_s = time.perf_counter() - t0
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def background(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (e.g. ``recsys-embed serve``) in its own process group, output to ``log_path``; on exit
    SIGTERM the group (then SIGKILL), so its flow-run subprocesses go too."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
