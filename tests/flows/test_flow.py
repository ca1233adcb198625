"""End to end under Prefect's test harness: a slice of the real retail log through the whole flow,
MLflow in ``tmp_path``. Also proves that a fresh process can load embeddings and top-k from the run id."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import REPO, RETAIL

pytestmark = pytest.mark.slow

N_ROWS = 60_000


@pytest.fixture(scope="module")
def retail_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("retail") / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=N_ROWS).write_parquet(p)
    return p


def _overrides(src: Path, out: Path) -> list[str]:
    return [
        f"ingest.source.path={src}",
        f"output_root={out}",
        "models.als.iterations=6",
        "models.als.eval_every=3",
        "models.bpr.iterations=20",
        "models.bpr.eval_every=10",
        "models.two_tower.enabled=true",  # off in configs/retail.yaml (CPU time); these tests cover it
        "models.two_tower.max_epochs=2",
        "export.models=[best, als, popularity]",
        "tuning.enabled=false",  # the search end to end: tests/models/test_tuning.py
    ]


def test_pipeline_end_to_end(prefect_harness: None, retail_slice: Path, tmp_path: Path, mlflow_yml: Path) -> None:
    from mlflow import MlflowClient

    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.config import load_mlflow_settings
    from recsys_embed.io import is_complete_table, read_table
    from recsys_embed.tracking.tracker import resolve_settings

    out = tmp_path / "out"
    manifest = embedding_pipeline(str(REPO / "configs/retail.yaml"), _overrides(retail_slice, out), str(mlflow_yml))

    acc = manifest["accounting"]
    assert acc["rows_read"] == N_ROWS
    assert acc["balanced"] is True
    assert acc["rows_read"] == acc["kept"] + acc["duplicates"] + acc["quarantined_total"] + acc["filtered_total"]
    assert acc["quarantined"]["null_user"] > 0  # the retail log has null customers
    assert set(manifest["metrics"]) == {"popularity", "ease", "als", "bpr", "two_tower"}
    for m in manifest["metrics"].values():
        assert 0.0 <= m["recall_at_20"] <= 1.0 and m["n_users_evaluated"] > 0
    best = manifest["best_model"]
    assert best in manifest["metrics"]
    summary = json.loads((Path(manifest["run_dir"]) / "summary.json").read_text())
    assert summary["mlflow"]["run_id"] == manifest["mlflow"]["run_id"]

    # selection read the validation window; the shipped tables are the refits, covering every user with history
    assert manifest["selection"]["basis"] == "validation window" and manifest["selection"]["best"] == best
    assert set(manifest["val_metrics"]) == set(manifest["metrics"])
    assert manifest["shipped"][: len(set(manifest["shipped"]))] == [best, *[m for m in ("als", "popularity")
                                                                          if m != best]]  # fmt: skip
    events = pl.read_parquet(Path(manifest["run_dir"]) / "full" / "train_events.parquet")
    ingest_events = pl.read_parquet(next((out / "retail" / "cache").glob("ingest-*/events.parquet")))
    history = ingest_events.select("user_id", "item_id").unique()
    n_users = ingest_events["user_id"].n_unique()
    assert events.height <= ingest_events.height
    for name, e in manifest["exports"].items():
        assert is_complete_table(e["topk"]), name
        table = read_table(e["topk"])
        # the log maps a description (ingest.columns.item_text): the tables carry it beside the ID
        assert table.columns == ["user_id", "rank", "item_id", "item_text", "score", "source", "model", "run_id"]
        assert table["item_text"].null_count() < table.height, name
        assert (table["run_id"] == manifest["mlflow"]["run_id"]).all()
        # every user with a kept event has exactly k rows; none recommends an item of the user's kept history
        counts = table.group_by("user_id").len()
        assert counts.height == n_users == e["topk_users"] and (counts["len"] == 20).all(), name
        assert table.join(history, on=["user_id", "item_id"], how="inner").height == 0, name
        assert e["trained_on"]["fit"] == "all kept events" and e["trained_on"]["rows"] == ingest_events.height
        assert e["evaluated_as"]["test"] == manifest["metrics"][name]
        n_fallback = int((table["source"] == "fallback").sum()) // 20
        assert n_fallback == e["fallback_users"] and (name == "popularity" or n_fallback > 0), name

    # MLflow: one parent, one nested run per model, params/metrics/artifacts present
    settings = resolve_settings(load_mlflow_settings(mlflow_yml))
    client = MlflowClient(settings.tracking_uri)
    parent = client.get_run(manifest["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["ingest.source.path"] == str(retail_slice)
    assert parent.data.metrics["rows_read"] == N_ROWS
    assert "data_fingerprint" in parent.data.tags
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["als", "bpr", "ease", "popularity", "two_tower"]
    als_run = next(r for r in children if r.info.run_name == "als")
    # metric names say their window, on the model runs only: no copies on the parent
    assert {"test.ndcg_at_20", "val.ndcg_at_20"} <= set(als_run.data.metrics)
    assert "ndcg_at_20" not in als_run.data.metrics
    assert not any(k.split(".")[0] in manifest["metrics"] for k in parent.data.metrics), sorted(parent.data.metrics)
    assert len(client.get_metric_history(als_run.info.run_id, "train_loss")) == 6  # one point per iteration
    arts = {a.path for a in client.list_artifacts(als_run.info.run_id)}
    assert {"embeddings", "exports", "id_maps", "plots"} <= arts
    plots = {a.path for a in client.list_artifacts(als_run.info.run_id, "plots")}
    assert {"plots/training_curves.png", "plots/popularity_bias.png", "plots/item_embeddings_2d.png"} <= plots

    parent_plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/model_comparison.png" in parent_plots
    assert "model_comparison.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.tags["comparison_view"].endswith("?viewStateShareKey=model-comparison")

    # a separate Python process loads embeddings and the top-k table given only the run id
    code = (
        "import sys; from recsys_embed.tracking.tracker import load_run_embeddings, load_run_topk\n"
        "e = load_run_embeddings(sys.argv[1], 'als', sys.argv[2]); t = load_run_topk(sys.argv[1], 'als', sys.argv[2])\n"
        "print(e.user_vectors.shape[0], e.item_vectors.shape[1], t.height)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, als_run.info.run_id, settings.tracking_uri],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    n_model_users, dim, rows = map(int, res.stdout.split())
    assert n_model_users <= manifest["exports"]["als"]["topk_users"]  # the refit ALS; the rest fall back
    assert dim == 64
    assert rows == manifest["exports"]["als"]["topk_rows"]

    # recommend / similar answer from the run's outputs, with the log's descriptions and --explain reasons
    from recsys_embed.errors import RecsysEmbedError
    from recsys_embed.serving.answer import recommend_for_user, similar_to_item

    als_table = read_table(manifest["exports"]["als"]["topk"]).filter(pl.col("source") == "model")
    als_table = als_table.sort("user_id", "rank")
    user = als_table["user_id"][0]
    answer = recommend_for_user(manifest, str(user), 3, "als", explain=True)
    ranked = [line for line in answer.splitlines() if re.match(r"^\s+\d+\. ", line)]
    assert len(ranked) == 3 and answer.count("because of") == 9  # 3 history items behind each of 3
    assert str(als_table["item_id"][0]) in answer.splitlines()[1]  # rank 1 is the exported rank 1
    item = str(als_table["item_id"][0])
    assert similar_to_item(manifest, item, 2, "als").startswith(f"Items similar to {item}")
    with pytest.raises(RecsysEmbedError, match="not in the latest run's catalog"):
        similar_to_item(manifest, "NO-SUCH-ITEM", 2, "als")

    # same log + same ingest config: the second run reuses the ingest instead of re-reading the log
    again = embedding_pipeline(
        str(REPO / "configs/retail.yaml"),
        [*_overrides(retail_slice, out), "models.bpr.enabled=false"],
        str(mlflow_yml),
    )
    assert again["ingest_cached"] is True
    assert again["accounting"]["rows_read"] == N_ROWS


def test_unreachable_tracking_server_fails_fast(prefect_harness: None, tmp_path: Path, retail_slice: Path) -> None:
    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.tracking.tracker import TrackingError

    yml = tmp_path / "mlflow.yml"
    yml.write_text("tracking_uri: http://user:s3cret@127.0.0.1:9/\nexperiment_name: x\n", encoding="utf-8")
    with pytest.raises(TrackingError) as err:
        embedding_pipeline(str(REPO / "configs/retail.yaml"), _overrides(retail_slice, tmp_path), str(yml))
    msg = str(err.value)
    assert "127.0.0.1:9" in msg and "MLFLOW_TRACKING_URI" in msg
    assert "s3cret" not in msg


def test_single_item_log_stops_before_training_naming_why(prefect_harness: None, tmp_path: Path,
                                                          mlflow_yml: Path) -> None:  # fmt: skip
    """Regression (issue 20, 6): a log whose every event is on one item exited 0 with a 0-row top-k table and the
    hint "enable split.val_quantile" (which was set); it must stop before training, saying why."""
    import os

    from prefect.settings import PREFECT_API_URL

    src = tmp_path / "one-item.parquet"
    pl.read_parquet(RETAIL, n_rows=5_000).with_columns(pl.lit("85123A").alias("item_id")).write_parquet(src)
    out = tmp_path / "out"
    sets = [f"ingest.source.path={src}", f"output_root={out}", "tuning.enabled=false", "models.two_tower.enabled=false"]
    cmd = [sys.executable, "-m", "recsys_embed.cli", "-q", "--mlflow-config", str(mlflow_yml), "run", "--config",
           str(REPO / "configs/retail.yaml"), *[a for o in sets for a in ("--set", o)]]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    last = res.stderr.strip().splitlines()[-1]
    assert re.match(r"error: the log has 1 distinct item after filtering \([\d,]+ kept events\); a recommender "
                    r"needs at least 2 items to rank", last), last  # fmt: skip
    assert "ingest.columns.item" in last
    assert "val_quantile" not in res.stdout + res.stderr
    assert not list((out / "retail" / "cache").glob("train-*"))  # stopped before any model was trained
    assert not list((out / "retail" / "runs").glob("*/models/*"))
