"""Run records: absolute paths in ``summary.json``; model-run descriptions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys_embed.reporting import absolute_paths, model_description, write_manifest


def test_manifest_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "outputs/retail/runs/r1/exports/als").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/retail.yaml").write_text("name: retail\n")
    monkeypatch.chdir(tmp_path)
    manifest = {
        "config": "configs/retail.yaml",
        "exports": {"als": {"topk": "outputs/retail/runs/r1/exports/als", "topk_rows": 20}},
        "mlflow": {"tracking_uri": "sqlite:///data/mlflow.db", "ui_path": "#/experiments/1/runs/abc"},
        "best_model": "als",
        "split": {"cutoff": "2011-10-01T00:00:00"},
        "list": ["configs/retail.yaml", "not/a/file.txt"],
    }
    write_manifest(tmp_path / "summary.json", manifest)
    back = json.loads((tmp_path / "summary.json").read_text())
    assert back["config"] == str(tmp_path.resolve() / "configs/retail.yaml")
    assert back["exports"]["als"]["topk"] == str(tmp_path.resolve() / "outputs/retail/runs/r1/exports/als")
    assert back["list"] == [str(tmp_path.resolve() / "configs/retail.yaml"), "not/a/file.txt"]  # only real paths
    # URIs, UI paths and plain values are left alone
    assert back["mlflow"] == manifest["mlflow"] and back["best_model"] == "als" and back["split"] == manifest["split"]
    assert absolute_paths({"n": 3, "ok": True}) == {"n": 3, "ok": True}


def test_model_description_names_hyperparameters_and_scores() -> None:
    model = {"train_seconds": 12.34, "info": {"backend": "implicit-cpu", "best_iteration": 10,
                                              "val_metric": "ndcg_at_20", "best_val_metric": 0.0812}}  # fmt: skip
    text = model_description("als", model, {"ndcg_at_20": 0.0846, "recall_at_20": 0.1028, "map_at_20": 0.03},
                             {"factors": "64", "alpha": "10.0"})  # fmt: skip
    assert text.startswith("**als** (implicit-cpu), trained in 12.3 s.")
    assert "`alpha=10.0`, `factors=64`" in text and "ndcg_at_20 0.0812 at iteration/epoch 10" in text
    assert "ndcg_at_20 0.0846, recall_at_20 0.1028" in text and "map_at_20" not in text
