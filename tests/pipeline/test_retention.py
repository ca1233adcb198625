"""``recsys-embed gc`` on a real MLflow store (SQLite and artifacts in tmp_path): four pipeline runs, three
registered versions, the champion on the oldest one and ``current/`` on the second. With ``keep_runs=1`` and
``keep_versions=0`` the champion (its version, bundle and runs) and what ``current/`` serves survive and still
answer; the other old run loses its files but keeps its metrics; the other versions go with their bundles."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed.cli import main
from recsys_embed.config import ExportConfig, MlflowSettings, PipelineConfig, RetentionConfig, registered_name
from recsys_embed.pipeline.retention import PRUNED_TAG, collect
from recsys_embed.serving.registry import CHAMPION, ServedInputs, list_versions, log_recommender
from recsys_embed.tracking.tracker import Tracker, artifact_bytes
from recsys_embed.types import Embeddings, IdMap

pytestmark = pytest.mark.slow  # three registered versions: ~20 s


def _emb(seed: int) -> tuple[Embeddings, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    users = IdMap(pl.Series("id", np.arange(100, 130), dtype=pl.Int64))
    items = IdMap(pl.Series("id", [f"sku{i}" for i in range(20)], dtype=pl.String))
    seen = sp.random(30, 20, density=0.1, format="csr", random_state=seed, dtype=np.float32)
    return Embeddings(rng.standard_normal((30, 4)), rng.standard_normal((20, 4)), users, items, "als"), seen


def _pipeline_run(tracker: Tracker, root: Path, scope: dict[str, str], name: str) -> tuple[str, str]:
    """A parent run and its model run with artifacts and metrics, and its local run folder (as the flow leaves
    them); (parent id, model run id)."""
    parent = tracker.start_run(name, tags=scope)
    child = tracker.start_run("als", parent_run_id=parent, tags={**scope, "model": "als"})
    run_dir = root / "runs" / name
    table = run_dir / "exports" / "als" / "topk"
    table.mkdir(parents=True)
    (table / "part-00000.parquet").write_bytes(os.urandom(20_000))
    (run_dir / "summary.json").write_text(json.dumps({"mlflow": {"run_id": parent, "model_runs": {"als": child}}}))
    tracker.log_artifact(parent, run_dir / "summary.json")
    tracker.log_artifact(child, table, "exports/als/topk")
    tracker.log_metrics(child, {"test.ndcg_at_20": 0.1, "val.ndcg_at_20": 0.2})
    for run in (child, parent):
        tracker.end_run(run)
    time.sleep(0.02)  # distinct start times: "newest first" is well defined
    return parent, child


def _artifacts(tracker: Tracker, run_id: str) -> int | None:
    return artifact_bytes(tracker.get_run(run_id).info.artifact_uri)


def test_gc_keeps_the_champion_and_current(tmp_path: Path) -> None:
    settings = MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_location=str(tmp_path / "mlartifacts"), experiment_name="test")  # fmt: skip
    cfg = PipelineConfig.model_validate({"name": "p", "output_root": str(tmp_path / "out")})
    root = (tmp_path / "out" / "p").resolve()
    tracker = Tracker(settings)
    scope = {"pipeline": "p", "output_root": str(root)}
    runs = [_pipeline_run(tracker, root, scope, f"2025010{i}T030000Z") for i in range(4)]
    other = tracker.start_run("20250101T000000Z", tags={"pipeline": "p", "output_root": "/elsewhere"})
    tracker.log_artifact(other, root / "runs" / "20250100T030000Z" / "summary.json")

    name = registered_name(cfg, settings)
    for i in range(3):  # v1, v2, v3 from runs 0, 1, 2
        emb, seen = _emb(i)
        log_recommender(settings, runs[i][1], ServedInputs(emb, seen), ExportConfig(), 5,
                        {"pipeline_run_id": runs[i][0]}, name=name)  # fmt: skip
    tracker.client.set_registered_model_alias(name, CHAMPION, "1")  # the champion: the oldest run's model
    os.symlink("runs/20250101T030000Z/exports/als", root / "current")  # current/: the second run's tables
    (root / "latest.json").write_text(json.dumps({"run_dir": str(root / "runs" / "20250103T030000Z"),
                                                  "run_id": runs[3][0]}))  # fmt: skip
    versions, _ = list_versions(settings, name)
    bundles = {str(v.version): tracker.client.get_logged_model(v.source.removeprefix("models:/")).artifact_location
               for v in versions}  # fmt: skip
    keep = RetentionConfig(keep_runs=1, keep_versions=0)

    dry = collect(cfg, settings, keep, dry_run=True)
    assert dry.versions == ["v3", "v2"] and set(dry.runs) == set(runs[2]) and dry.freed_bytes > 0
    assert len(list_versions(settings, name)[0]) == 3 and all(_artifacts(tracker, r) for r in runs[2])

    report = collect(cfg, settings, keep)
    assert report.versions == ["v3", "v2"] and set(report.runs) == set(runs[2])
    assert report.freed_bytes >= dry.freed_bytes - 1  # the same items (the tag written since weighs nothing)
    # the champion: its version, its bundle (it still answers) and its runs' artifacts
    versions, aliases = list_versions(settings, name)
    assert [str(v.version) for v in versions] == ["1"] and aliases == {CHAMPION: "1"}
    assert artifact_bytes(bundles["1"]) and not artifact_bytes(bundles["2"]) and not artifact_bytes(bundles["3"])
    mlflow.set_tracking_uri(tracker.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    assert len(model.predict(pd.DataFrame({"user_id": [100]}), params={"k": 3})["item_ids"][0]) == 3
    assert all(_artifacts(tracker, r) for r in runs[0])
    # current/: its folder and its runs' artifacts; the latest run too
    assert (root / "current" / "topk" / "part-00000.parquet").exists()
    assert all(_artifacts(tracker, r) for r in (*runs[1], *runs[3]))
    assert (root / "runs" / "20250103T030000Z").is_dir()
    # the rest: files gone, the record (metrics, a tag saying so) kept; another output folder's run untouched
    assert not any(_artifacts(tracker, r) for r in runs[2])
    pruned = tracker.get_run(runs[2][1])
    assert pruned.data.metrics["test.ndcg_at_20"] == 0.1 and pruned.data.tags[PRUNED_TAG]
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["20250101T030000Z", "20250103T030000Z"]
    assert _artifacts(tracker, other)

    # again: nothing left to prune; and the command line says the same through the run lock
    assert collect(cfg, settings, keep).runs == []
    yml = tmp_path / "mlflow.yml"
    yml.write_text(f"tracking_uri: {settings.tracking_uri}\nartifact_location: {settings.artifact_location}\n"
                   "experiment_name: test\n")  # fmt: skip
    argv = ["gc", "--mlflow-config", str(yml), "--config", str(tmp_path / "none.yaml"), "--set", "name=p",
            "--set", f"output_root={tmp_path / 'out'}", "--keep-runs", "1", "--keep-versions", "0"]  # fmt: skip
    (tmp_path / "none.yaml").write_text("{}\n")
    assert main(argv) == 0
    assert [str(v.version) for v in list_versions(settings, name)[0]] == ["1"]
