"""The MLflow experiment as users open it: typed for model training (not the GenAI view), test and validation
metrics named by their window on the model runs only, and a saved "Model comparison" view of the runs table whose
filter and sort MLflow itself accepts (SQLite store in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from recsys_embed.config import MlflowSettings
from recsys_embed.tracking import reporting
from recsys_embed.tracking.tracker import (
    COMPARISON_VIEW,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    VIEW_TAG_PREFIX,
    Tracker,
)


def _settings(tmp_path: Path, name: str = "exp") -> MlflowSettings:
    return MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          artifact_location=str(tmp_path / "mlartifacts"), experiment_name=name)  # fmt: skip


def test_experiment_is_typed_for_model_training(tmp_path: Path) -> None:
    tracker = Tracker(_settings(tmp_path))
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    # an experiment created before the tag gets it; a kind someone chose is left alone
    old = tracker.client.create_experiment("old")
    chosen = tracker.client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(_settings(tmp_path, "old"))
    Tracker(_settings(tmp_path, "chosen"))
    assert tracker.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracker.client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_model_metrics_name_their_window() -> None:
    got = reporting.model_metrics({"ndcg_at_20": 0.1}, {"ndcg_at_20": 0.2, "recall_at_20": 0.3})
    assert got == {"test.ndcg_at_20": 0.1, "val.ndcg_at_20": 0.2, "val.recall_at_20": 0.3}


def test_comparison_on_the_parent_and_a_saved_view_mlflow_accepts(tmp_path: Path) -> None:
    tracker = Tracker(_settings(tmp_path))
    parent = tracker.start_run("20250101T000000Z", tags={"pipeline": "p"})
    test = {"als": {"ndcg_at_10": 0.30, "recall_at_10": 0.5}, "ease": {"ndcg_at_10": 0.35, "recall_at_10": 0.6}}
    val = {"als": {"ndcg_at_10": 0.20, "recall_at_10": 0.4}, "ease": {"ndcg_at_10": 0.25, "recall_at_10": 0.45}}
    children = {}
    for m in test:
        children[m] = tracker.start_run(m, parent_run_id=parent, tags={"model": m})
        tracker.log_metrics(children[m], reporting.model_metrics(test[m], val[m]))
    table, val_table = reporting.metrics_frame(test), reporting.metrics_frame(val)
    path = reporting.log_comparison(tracker, parent, table, [10], "ndcg_at_10", val_table)

    assert path == f"#/experiments/{tracker.experiment_id}/runs?viewStateShareKey={COMPARISON_VIEW}"
    run = tracker.get_run(parent)
    assert run.data.metrics == {}  # no copy of any model metric on the parent
    assert run.data.tags["comparison_view"] == path
    arts = {a.path for a in tracker.client.list_artifacts(parent)} | {
        a.path for a in tracker.client.list_artifacts(parent, "plots")}  # fmt: skip
    assert {"model_comparison.csv", "plots/model_comparison.png"} <= arts
    csv = pl.read_csv(tracker.client.download_artifacts(parent, "model_comparison.csv", str(tmp_path)))
    assert csv.columns == ["model", "val.ndcg_at_10", "val.recall_at_10", "test.ndcg_at_10", "test.recall_at_10"]
    assert csv.filter(pl.col("model") == "ease")["test.ndcg_at_10"].item() == 0.35

    # the saved view: MLflow 3's envelope, and a filter + sort the tracking server runs as given
    tag = tracker.client.get_experiment(tracker.experiment_id).tags[f"{VIEW_TAG_PREFIX}{COMPARISON_VIEW}"]
    view = json.loads(tag)
    assert view["name"] == "Model comparison" and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    assert state["orderByKey"] == "metrics.`val.ndcg_at_10`" and state["orderByAsc"] is False
    assert state["selectedColumns"][:3] == ["metrics.`val.ndcg_at_10`", "metrics.`test.recall_at_10`",
                                            "metrics.`test.ndcg_at_10`"]  # fmt: skip
    found = tracker.client.search_runs([tracker.experiment_id], state["searchFilter"],
                                       order_by=[f"{state['orderByKey']} DESC"])  # fmt: skip
    assert [r.info.run_name for r in found] == ["ease", "als"]  # the model runs, best validation first
    # saved again by the next run: its creation time stays
    tracker.save_comparison_view(["test.ndcg_at_10"], "val.ndcg_at_10", "ndcg_at_10")
    again = json.loads(tracker.client.get_experiment(tracker.experiment_id).tags[f"{VIEW_TAG_PREFIX}{COMPARISON_VIEW}"])
    assert again["createdAt"] == view["createdAt"] and again["updatedAt"] >= view["updatedAt"]
