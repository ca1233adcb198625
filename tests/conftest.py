"""Shared fixtures: one Prefect test harness per session, MLflow in a temp dir, a planted-structure log."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RETAIL = REPO / "data" / "online-retail" / "events.parquet"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's ephemeral test server, started once (about 10 s) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_yml(tmp_path: Path) -> Path:
    """An mlflow.yml pointing at a SQLite store and artifacts inside ``tmp_path``."""
    p = tmp_path / "mlflow.yml"
    p.write_text(
        f"tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\n"
        f"artifact_location: {tmp_path / 'mlartifacts'}\n"
        "experiment_name: test\n",
        encoding="utf-8",
    )
    return p


@pytest.fixture(autouse=True)
def _no_env_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    # a developer's MLFLOW_TRACKING_URI must never leak into tests
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
