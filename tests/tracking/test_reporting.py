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
    metrics = {"test.ndcg_at_20": 0.0846, "test.recall_at_20": 0.1028, "test.map_at_20": 0.03,
               "val.ndcg_at_20": 0.0812}  # fmt: skip
    text = model_description("als", model, metrics, {"factors": "64", "alpha": "10.0"})
    assert text.startswith("**als** (implicit-cpu), trained in 12.3 s.")
    assert "`alpha=10.0`, `factors=64`" in text and "ndcg_at_20 0.0812 at iteration/epoch 10" in text
    assert "Test (warm users): test.ndcg_at_20 0.0846, test.recall_at_20 0.1028." in text and "map_at_20" not in text
    assert "Validation (warm users): val.ndcg_at_20 0.0812." in text


# ------------------------------------------------------------------------------------------------------------
# Row accounting that means what it says (issue 22)

# The retail main job's accounting after the split, in the form the manifest held before issue 22: ``kept`` was the
# rows still in use (328,349) and ``filtered`` mixed ingest's rule with the matrix's and the split's buckets.
RETAIL_SPLIT = {
    "rows_read": 541_909, "kept": 328_349, "duplicates": 5_318, "quarantined": {"null_user": 135_080},
    "filtered": {"non_product_item": 1_867, "cancelled_out": 7_102, "val_seen_in_train": 9_851,
                 "val_cold_user": 6_570, "val_cold_item": 854, "val_cancelled_out": 598,
                 "test_seen_in_train": 26_153, "test_cold_user": 15_548, "test_cold_item": 3_245,
                 "test_cancelled_out": 1_374},
    "users": 3_741, "items": 3_526, "nnz": 197_918, "val_target_pairs": 13_566, "val_warm_users": 683,
    "test_target_pairs": 30_160, "test_warm_users": 1_365,
}  # fmt: skip
RETAIL_WINDOWS = {"rows_fit": 287_715, "rows_val": 31_973, "rows_test": 79_956}  # the split's info


def test_accounting_keeps_ingest_apart_from_the_split() -> None:
    """Regression (issue 22): the summary's ``filtered 73,162`` included ``test_seen_in_train 26,153`` (rows held out
    for evaluation, not dropped), and ingest said kept 399,644 while the summary said kept 328,349."""
    from recsys_embed.data.split import TARGET_BUCKETS
    from recsys_embed.types import HELD_OUT_BUCKETS, RowReport

    assert TARGET_BUCKETS[1:] == HELD_OUT_BUCKETS  # the split's buckets are the ones the report sets apart
    report = RowReport.from_dict(RETAIL_SPLIT)
    # ingest kept = read - duplicates - quarantined - ingest's filter = 541,909 - 5,318 - 135,080 - 1,867
    assert report.ingest_kept == 399_644 and report.is_balanced()
    d = report.to_dict()
    assert d["kept"] == 399_644 and d["filtered"] == {"non_product_item": 1_867} and d["filtered_total"] == 1_867
    assert d["rows_read"] == d["kept"] + d["duplicates"] + d["quarantined_total"] + d["filtered_total"]
    assert d["matrix_dropped"] == {"cancelled_out": 7_102}
    assert d["held_out"]["test"]["seen_in_train"] == 26_153 and d["in_use"] == 328_349
    assert RowReport.from_dict(d) == report  # the new form reads back to the same report
    m = report.metrics()
    assert m["rows_kept"] == 399_644 and m["rows_filtered"] == 1_867 and m["rows_in_use"] == 328_349
    assert m["rows_held_out_test_seen_in_train"] == 26_153 and "rows_filtered_test_seen_in_train" not in m

    text = report.format(RETAIL_WINDOWS)
    kept = [line for line in text.splitlines() if line.split()[:1] == ["kept"]]
    assert len(kept) == 1 and "399,644" in kept[0] and "balanced" in kept[0]
    assert "328,349" not in text and "73,162" not in text
    filtered = next(line for line in text.splitlines() if line.split()[:1] == ["filtered"])
    assert "1,867" in filtered and "seen_in_train" not in filtered
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("    ")}
    # fit: 287,715 rows = 280,613 in the train matrix + 7,102 cancelled out
    assert rows["fit"][:4] == ["window", "287,715", "280,613", "7,102"]
    # test: 79,956 rows = 33,636 targets + 1,374 cancelled + 26,153 seen in train + 15,548 cold users + 3,245 cold items
    assert rows["test"] == ["79,956", "33,636", "1,374", "26,153", "15,548", "3,245"]

    md = summary_markdown({**_manifest("champion", None), "accounting": d, "split": RETAIL_WINDOWS}, TABLE, [10])
    assert "| **kept** | **399,644** |" in md and "| filtered: non_product_item | 1,867 |" in md
    assert "| test | 79,956 | 33,636 |" in md and "filtered: test_seen_in_train" not in md
