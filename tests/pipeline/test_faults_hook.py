"""The failpoint hook: silent unless named, kills the process once when a marker is given."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from recsys_embed import faults

SCRIPT = "from recsys_embed.faults import checkpoint; checkpoint('train:als'); print('survived')"


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, **env}, capture_output=True, text=True)


def test_checkpoint_is_silent_when_not_named():
    assert _run({faults.KILL_AT: "split"}).stdout.strip() == "survived"


def test_checkpoint_kills_once_with_marker(tmp_path):
    marker = tmp_path / "fired"
    env = {faults.KILL_AT: "train:*", faults.KILL_MARKER: str(marker)}
    first = _run(env)
    assert first.returncode == -signal.SIGKILL and "survived" not in first.stdout
    assert faults.fired(marker) == "train:als"
    second = _run(env)  # the re-run sees the marker and carries on
    assert second.returncode == 0 and second.stdout.strip() == "survived"
