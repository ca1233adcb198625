"""Incremental runs through the real flow: the second run, with one more day of log in a new file, reads only
that file's rows, extends the ID maps without moving old indices, warm-starts its models from the first run's,
and moves ``champion`` only on a real gain."""

from __future__ import annotations

import datetime as dt
import time
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
        "models.two_tower.enabled=true",  # off in configs/retail.yaml (CPU time); these tests cover it
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
        assert first["models"][name]["info"]["warm_start"] is False, name

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
        info = second["models"][name]["info"]
        assert info["warm_start"] is True and Path(info["warm_start_from"]).resolve() == source, (name, info)
        params = client.get_run(second["mlflow"]["model_runs"][name]).data.params
        assert params["info.warm_start"] == "True" and params["info.warm_start_from"] == info["warm_start_from"]
    n_old_users = IdMap.load(first_models.parent / "split" / "user_map.parquet").ids.len()
    assert second["models"]["als"]["info"]["warm_start_users"] == n_old_users  # every old user kept its vector

    reg1, reg2 = first["registry"], second["registry"]
    assert reg1["alias"] == "champion"
    # a new day of data: the same recipe refit on more events replaces the champion; another recipe is judged
    # against the champion's recipe fitted on this run's fit window (never the champion model on its own data)
    assert reg2["registered"] is True and reg2["previous_champion"] == reg1["version"], reg2
    if reg2["champion_basis"] == "same recipe":
        assert reg2["promoted"] is True and reg2["alias"] == "champion"
    else:
        assert "this run's fit window" in reg2["champion_basis"], reg2
        assert reg2["promoted"] is (reg2["alias"] == "champion")

    # a changed, already-ingested file is refused (append-only), naming the file and the fix
    old.head(10).write_parquet(logs / "day-000.parquet")
    with pytest.raises(IngestError, match=r"day-000.parquet.*incremental.enabled=false"):
        embedding_pipeline(cfg, overrides, str(mlflow_yml))


def test_nothing_new_means_nothing_done(prefect_harness: None, tmp_path: Path, mlflow_yml: Path) -> None:
    """Regression (issue 13): a scheduled incremental run with no new file retrained, re-exported and registered
    a new version. Now it ends Completed at once, says "nothing new since <run>" (log, result, Prefect artifact)
    and touches nothing; ``force`` re-runs anyway."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.deploy import deployment_parameters
    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.config import load_config
    from recsys_embed.data.generate import generate, preset

    generate(preset("tiny", n_events=20_000, n_users=500, n_items=300), tmp_path / "log")
    config = str(REPO / "configs/synthetic.yaml")
    overrides = [f"ingest.source.path={tmp_path / 'log'}", f"output_root={tmp_path / 'out'}",
                 "models.bpr.enabled=false", "models.als.iterations=2", "models.als.eval_every=0"]  # fmt: skip
    # exactly the parameters of a scheduled run of `recsys-embed serve` (schedule.overrides: incremental on)
    params = deployment_parameters(config, overrides, str(mlflow_yml), load_config(config, overrides))
    first = embedding_pipeline(**params)
    root = tmp_path / "out" / "synthetic-1m"
    client = MlflowClient(tracking_uri=first["mlflow"]["tracking_uri"])

    def footprint() -> tuple[int, int, list[str], str]:
        runs = client.search_runs([first["mlflow"]["experiment_id"]])
        versions = client.search_model_versions(f"name='{first['registry']['name']}'")
        return len(runs), len(versions), sorted(p.name for p in (root / "runs").iterdir()), \
            (root / "latest.json").read_text()  # fmt: skip

    before = footprint()
    t0 = time.perf_counter()
    state = embedding_pipeline(**params, return_state=True)
    wall = time.perf_counter() - t0
    print(f"nothing-new run: {wall:.1f} s")
    assert state.is_completed(), state
    second = state.result()
    assert second["nothing_new"] == f"nothing new since run {first['run_name']} (90 log file(s), all ingested)"
    assert footprint() == before  # no MLflow run, no model version, no run folder, latest unchanged
    assert wall < 30, wall
    with get_client(sync_client=True) as prefect:
        notes = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            key=ArtifactFilterKey(any_=["recsys-embed-nothing-new"])))  # fmt: skip
    assert len(notes) == 1 and f"Nothing new since run {first['run_name']}" in str(notes[0].data)

    forced = embedding_pipeline(**params, force=True)  # --force: the whole run, on the same events
    assert "nothing_new" not in forced and forced["run_name"] != first["run_name"]
    assert forced["incremental"]["new_files"] == [] and forced["accounting"]["rows_read"] == 20_000
    runs, versions, folders, _ = footprint()
    assert (runs, versions, len(folders)) > (before[0], before[1], len(before[2]))
    # the same events and config: the forced run trains and exports again but registers no duplicate version
    assert forced["registry"]["registered"] is False and forced["registry"]["reason"].startswith("unchanged")


def test_nothing_new_names_the_last_finished_run(tmp_path: Path) -> None:
    from recsys_embed.config import load_config
    from recsys_embed.data.incremental import commit_state, nothing_new, run_incremental_ingest

    logs, root = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    log = pl.read_parquet(RETAIL, n_rows=4_000)
    log.head(2_000).write_parquet(logs / "day-000.parquet")
    cfg = load_config(REPO / "configs/retail.yaml", [f"ingest.source.path={logs}", "incremental.enabled=true"])
    assert nothing_new(cfg.ingest, root, cfg.incremental) is None  # no run yet
    ingest = run_incremental_ingest(cfg.ingest, root, cfg.incremental, "R1")
    assert nothing_new(cfg.ingest, root, cfg.incremental) is None  # R1 has not finished: its files are still new
    commit_state(root, cfg.incremental, ingest, str(root / "runs" / "R1" / "split"))
    assert nothing_new(cfg.ingest, root, cfg.incremental) == "nothing new since run R1 (1 log file(s), all ingested)"
    log.tail(2_000).write_parquet(logs / "day-001.parquet")  # a new file: work to do
    assert nothing_new(cfg.ingest, root, cfg.incremental) is None
    (logs / "day-001.parquet").unlink()
    log.head(10).write_parquet(logs / "day-000.parquet")  # changed: the run goes ahead and refuses it there
    assert nothing_new(cfg.ingest, root, cfg.incremental) is None
