"""Where the Prefect API is, found without importing Prefect (its import alone takes seconds), so that
``recsys-embed serve`` can refuse at once when there is no server to serve against.

``serve`` needs a Prefect server that outlives it: with none configured, each run it triggers would start its
own temporary server, whose in-memory concurrency leases the run cannot find, and Prefect cancels the run
("Deployment concurrency slot lost during provisioning"). So ``serve`` refuses, saying how to start one.

``configured_api_url`` reads ``PREFECT_API_URL`` from the sources Prefect reads, highest first: the environment,
``./.env``, ``./prefect.toml`` (``[api] url``), ``./pyproject.toml`` (``[tool.prefect.api] url``), then the active
profile in ``profiles.toml`` (``PREFECT_PROFILES_PATH``, else ``$PREFECT_HOME/profiles.toml``, else
``~/.prefect/profiles.toml``; the profile named by ``PREFECT_PROFILE`` or the file's ``active``). A test keeps it
in agreement with Prefect's own settings.
"""

from __future__ import annotations

import os
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from recsys_embed.errors import RecsysEmbedError

START_SERVER = (
    "start one with `prefect server start` (in another terminal), then `export "
    "PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect config set PREFECT_API_URL=...`) and try again"
)


class PrefectServerError(RecsysEmbedError):
    """No Prefect server is configured, or the configured one does not answer (names the URL and the fix)."""


def _toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _dotenv(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip().strip("'\"")
    return out


def _profiles_path(dotenv: dict[str, str], prefect_toml: dict[str, Any], pyproject: dict[str, Any]) -> Path | None:
    if os.environ.get("PREFECT_TEST_MODE") or os.environ.get("PREFECT_TESTING_TEST_MODE"):
        return None  # Prefect ignores profiles in test mode
    explicit = (
        os.environ.get("PREFECT_PROFILES_PATH")
        or dotenv.get("PREFECT_PROFILES_PATH")
        or prefect_toml.get("profiles_path")
        or pyproject.get("tool", {}).get("prefect", {}).get("profiles_path")
    )
    if explicit:
        return Path(explicit).expanduser()
    home = Path(os.environ["PREFECT_HOME"]).expanduser() if os.environ.get("PREFECT_HOME") else Path.home() / ".prefect"
    return home / "profiles.toml"


def configured_api_url(cwd: Path | None = None) -> str | None:
    """The ``PREFECT_API_URL`` Prefect would use from ``cwd`` (default: the working directory), or None when
    none is set (Prefect then starts an ephemeral server per process)."""
    cwd = cwd or Path.cwd()
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    dotenv = _dotenv(cwd / ".env")
    prefect_toml = _toml(cwd / "prefect.toml")
    pyproject = _toml(cwd / "pyproject.toml")
    url = (
        dotenv.get("PREFECT_API_URL")
        or prefect_toml.get("api", {}).get("url")
        or pyproject.get("tool", {}).get("prefect", {}).get("api", {}).get("url")
    )
    if url:
        return str(url)
    path = _profiles_path(dotenv, prefect_toml, pyproject)
    profiles = _toml(path) if path is not None else {}
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    profile = profiles.get("profiles", {}).get(active, {}) if active else {}
    return str(profile["PREFECT_API_URL"]) if profile.get("PREFECT_API_URL") else None


def unreachable(url: str, timeout_s: float = 2.0) -> str | None:
    """Why the Prefect API at ``url`` cannot be reached, or None when it answers (any HTTP status counts: a
    server that wants credentials is still there)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


def require_server(command: str) -> str:
    """The configured Prefect API URL for ``command`` (e.g. ``recsys-embed serve``); raise ``PrefectServerError``
    within seconds when none is configured or it does not answer."""
    url = configured_api_url()
    if url is None:
        raise PrefectServerError(
            f"{command} needs a Prefect server that outlives it, and PREFECT_API_URL is not set (an ephemeral "
            f"server would cancel the runs it triggers); {START_SERVER}"
        )
    check_server(url)
    return url


def check_server(url: str | None = None) -> None:
    """Raise ``PrefectServerError`` when the configured (or given) Prefect API does not answer; do nothing when
    none is configured (Prefect starts an ephemeral one)."""
    url = url or configured_api_url()
    if url is None:
        return
    reason = unreachable(url)
    if reason is not None:
        raise PrefectServerError(
            f"the Prefect server at {url} (PREFECT_API_URL) does not answer ({reason}); start it with "
            "`prefect server start` or point PREFECT_API_URL at a running one"
        )
