"""A real ``mlflow server`` for tests (a subprocess on a free loopback port, SQLite store in a temp folder) and a
loopback proxy that demands HTTP Basic credentials in front of it, the way an authenticating deployment does.

Both are started by the test and shut down at its end; nothing is mocked. The server runs in its own process
group so a test can SIGKILL it mid-run (an outage) and the fixture still cleans up exactly what it started.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).with_name("mlflow")
STARTUP_TIMEOUT_S = 240.0  # a cold start migrates the SQLite store: ~15 s idle, much more on a busy 2-core box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@dataclass
class MlflowServer:
    """A running ``mlflow server`` subprocess."""

    folder: Path
    port: int
    proc: subprocess.Popen[bytes]
    started_s: float = 0.0  # seconds from launch to a healthy /health

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return (self.folder / "server.log").read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL the server's process group (the CLI and its uvicorn worker): an outage, no goodbye."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` on a free port with its store in ``folder``; stop it (and its group) on exit."""
    if not MLFLOW.exists():
        pytest.skip(f"no mlflow executable beside the interpreter ({MLFLOW})")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    t0 = time.perf_counter()
    with open(folder / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = MlflowServer(folder, port, proc)
    try:
        while not _healthy(server.url):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode} before it was healthy:\n{server.log[-3000:]}")
            if time.perf_counter() - t0 > STARTUP_TIMEOUT_S:
                pytest.fail(f"mlflow server not healthy after {STARTUP_TIMEOUT_S:.0f}s:\n{server.log[-3000:]}")
            time.sleep(0.25)
        server.started_s = time.perf_counter() - t0
        yield server
    finally:
        server.stop()


@dataclass
class AuthProxy:
    """Forwards HTTP to ``upstream_port`` only when the request carries ``Authorization: Basic user:password``;
    anything else gets 401. Counts both, so a test can show that the credentials really travelled."""

    upstream_port: int
    user: str
    password: str
    accepted: int = 0
    rejected: int = 0
    server: ThreadingHTTPServer | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> AuthProxy:
        proxy = self
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if self.headers.get("Authorization") != expected:
                    proxy.rejected += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                proxy.accepted += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the test reads the counters

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
