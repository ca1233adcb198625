"""Run records: the Prefect summary artifact (a real link to the MLflow run when the UI address is known, and a
champion decision that says which version ``@champion`` loads: a challenger was once described as if it were
loaded by ``@champion``); absolute paths in ``summary.json``; model-run descriptions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from recsys_embed.config import MlflowSettings
from recsys_embed.tracking.reporting import absolute_paths, model_description, summary_markdown, write_manifest
from recsys_embed.tracking.tracker import ui_run_url


def _manifest(alias: str, ui_url: str | None) -> dict[str, Any]:
    promoted = alias == "champion"
    reason = "0.3000 beats the champion's 0.2000 by more than 0" if promoted else (
        "0.1000 does not beat the champion's 0.2000 by more than 0")
    mlflow = {"run_id": "abc", "tracking_uri": "sqlite:///x.db", "ui_path": "#/experiments/1/runs/abc",
              "ui_url": ui_url}
    registry = {"name": "rec", "version": "3", "alias": alias, "promoted": promoted, "metric": "ndcg_at_10",
                "margin": 0.0, "previous_champion": "2", "reason": reason}
    accounting = {"rows_read": 10, "kept": 10, "duplicates": 0, "quarantined": {}, "filtered": {}}
    return {"run_name": "20250101T030000Z", "mlflow": mlflow, "primary_metric": "ndcg_at_10", "best_model": "als",
            "accounting": accounting, "exports": {}, "registry": registry}


TABLE = pl.DataFrame({"model": ["als"], "ndcg_at_10": [0.3]})


def test_challenger_is_not_what_champion_loads() -> None:
    md = summary_markdown(_manifest("challenger", None), TABLE, [10])
    assert "version **3** (als) is **challenger**" in md
    assert "The champion stays v2: `models:/rec@champion` still loads it" in md
    assert 'load this version with `mlflow.pyfunc.load_model("models:/rec@challenger")`' in md
    assert "previous champion" not in md  # v2 is still the champion, not a previous one


def test_new_champion_names_the_previous_one() -> None:
    md = summary_markdown(_manifest("champion", None), TABLE, [10])
    assert "is **champion**" in md and "previous champion: v2" in md and '"models:/rec@champion"' in md


def test_summary_links_the_mlflow_run_when_the_ui_is_known() -> None:
    url = "http://mlflow.example:5000/#/experiments/1/runs/abc"
    assert f"[open it in the MLflow UI]({url})" in summary_markdown(_manifest("champion", url), TABLE, [10])
    local = summary_markdown(_manifest("champion", None), TABLE, [10])
    assert "UI path `#/experiments/1/runs/abc`" in local and "ui_url" in local


@pytest.mark.parametrize(
    ("tracking_uri", "ui_url", "expected"),
    [
        ("sqlite:///data/mlflow.db", None, None),  # a local store has no UI address
        ("sqlite:///data/mlflow.db", "http://ui:5000/", "http://ui:5000/#/experiments/7/runs/r1"),
        ("https://bob:s3cret@mlflow.example", None, "https://mlflow.example/#/experiments/7/runs/r1"),  # no secret
        ("http://tracking:5000", "https://ui.example/mlflow", "https://ui.example/mlflow/#/experiments/7/runs/r1"),
    ],
)
def test_ui_run_url(tracking_uri: str, ui_url: str | None, expected: str | None) -> None:
    settings = MlflowSettings(tracking_uri=tracking_uri, ui_url=ui_url)
    assert ui_run_url(settings, "7", "r1") == expected


def test_mlflow_ui_url_from_the_environment(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys_embed.config import load_mlflow_settings

    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///x.db\nui_url: http://from-file:5000\n")
    assert load_mlflow_settings(tmp_path / "mlflow.yml").ui_url == "http://from-file:5000"
    monkeypatch.setenv("MLFLOW_UI_URL", "http://from-env:5000")
    assert load_mlflow_settings(tmp_path / "mlflow.yml").ui_url == "http://from-env:5000"


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
