"""Incremental runs through the real flow: the second run, with one more day of log in a new file, reads only
that file's rows, extends the ID maps without moving old indices, warm-starts its models from the first run's,
and moves ``champion`` only on a real gain."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import REPO, RETAIL

pytestmark = pytest.mark.slow


def test_second_run_ingests_only_the_new_day(prefect_harness: None, tmp_path: Path, mlflow_yml: Path) -> None:
    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.errors import IngestError
    from recsys_embed.types import IdMap

    log = pl.read_parquet(RETAIL, n_rows=25_000).sort("timestamp")
    last_day = dt.datetime.fromtimestamp(int(log["timestamp"].max()), dt.UTC).date()
    start = int(dt.datetime.combine(last_day, dt.time(), dt.UTC).timestamp())
    old, extra = log.filter(pl.col("timestamp") < start), log.filter(pl.col("timestamp") >= start)
    assert old.height and extra.height
    logs = tmp_path / "logs"
    logs.mkdir()
    old.write_parquet(logs / "day-000.parquet")
    overrides = [
        f"ingest.source.path={logs}",
        f"output_root={tmp_path / 'out'}",
        "incremental.enabled=true",
        "models.bpr.enabled=false",
        "models.als.iterations=3",
        "models.als.eval_every=0",
        "models.two_tower.max_epochs=2",
        "registry.margin=0.001",
        "models.ease.enabled=false",
        "tuning.enabled=false",
    ]
    cfg = str(REPO / "configs/retail.yaml")
    first = embedding_pipeline(cfg, overrides, str(mlflow_yml))
    assert first["incremental"]["new_rows_read"] == old.height
    assert first["accounting"]["rows_read"] == old.height
    assert first["incremental"]["previous_models"] is None
    for name in ("als", "two_tower"):  # nothing to start from yet
        assert first["exports"][name]["info"]["warm_start"] is False, name

    extra.write_parquet(logs / "day-001.parquet")  # one more day lands
    second = embedding_pipeline(cfg, overrides, str(mlflow_yml))
    inc = second["incremental"]
    assert inc["new_rows_read"] == extra.height  # only the new rows were read
    assert [Path(f).name for f in inc["new_files"]] == ["day-001.parquet"]
    assert [Path(f).name for f in inc["skipped_files"]] == ["day-000.parquet"]
    acc = second["accounting"]
    assert acc["rows_read"] == old.height + extra.height and acc["balanced"]  # nothing counted twice

    for what in ("user_map", "item_map"):
        before = IdMap.load(Path(first["run_dir"]) / "split" / f"{what}.parquet").ids
        after = IdMap.load(Path(second["run_dir"]) / "split" / f"{what}.parquet").ids
        assert after.len() >= before.len()
        assert after.head(before.len()).to_list() == before.to_list(), what  # old IDs keep their indices

    # models warm-started from the first run's: recorded in the manifest and as MLflow params of the model run
    first_models = Path(first["run_dir"]) / "models"
    assert Path(inc["previous_models"]) == first_models
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=second["mlflow"]["tracking_uri"])
    for name, source in (("als", first_models / "als"), ("two_tower", first_models / "two_tower_encoder" / "encoder")):
        info = second["exports"][name]["info"]
        assert info["warm_start"] is True and Path(info["warm_start_from"]).resolve() == source, (name, info)
        params = client.get_run(second["mlflow"]["model_runs"][name]).data.params
        assert params["info.warm_start"] == "True" and params["info.warm_start_from"] == info["warm_start_from"]
    n_old_users = IdMap.load(first_models.parent / "split" / "user_map.parquet").ids.len()
    assert second["exports"]["als"]["info"]["warm_start_users"] == n_old_users  # every old user kept its vector

    reg1, reg2 = first["registry"], second["registry"]
    assert reg1["alias"] == "champion"
    # the champion sat this run's exam: re-scored on the new test window, not its own run's stored metric
    assert reg2["champion_basis"] == "re-scored on this run's test window", reg2
    gained = reg2["value"] > reg2["champion_value"] + 0.001
    assert reg2["alias"] == ("champion" if gained else "challenger"), (reg1, reg2)
    assert reg2["promoted"] is gained

    # a changed, already-ingested file is refused (append-only), naming the file and the fix
    old.head(10).write_parquet(logs / "day-000.parquet")
    with pytest.raises(IngestError, match=r"day-000.parquet.*incremental.enabled=false"):
        embedding_pipeline(cfg, overrides, str(mlflow_yml))
