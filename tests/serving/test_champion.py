"""An honest registry, per pipeline, through the real flow (Prefect harness, MLflow SQLite in tmp_path).

- Another pipeline on the same MLflow store never touches this pipeline's registered model or champion.
- A challenger with another recipe is judged against the champion's *recipe* re-fitted on the challenger run's
  fit window, never against the champion model itself: a champion refit on a later window has seen the windows
  the challenger run scores on. The test measures how much that leak would inflate the champion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.conftest import REPO, RETAIL

pytestmark = pytest.mark.slow

CONFIG = str(REPO / "configs/retail.yaml")


def _slice(tmp_path: Path, name: str, start: int, stop: int) -> Path:
    p = tmp_path / f"{name}.parquet"
    pl.read_parquet(RETAIL, n_rows=stop).slice(start).write_parquet(p)
    return p


def _overrides(src: Path, out: Path, *extra: str) -> list[str]:
    # ALS alone competes (popularity still refits as the fallback inside the refit), so the champion's recipe is
    # an ALS config and a changed factor count is a different recipe
    return [
        f"ingest.source.path={src}", f"output_root={out}", "models.popularity.enabled=false",
        "models.bpr.enabled=false", "models.two_tower.enabled=false", "models.als.iterations=4",
        "models.ease.enabled=false", "tuning.enabled=false",
        "models.als.eval_every=2", "split.method=temporal", "split.min_eval_users=1", "export.models=[best]", *extra,
    ]  # fmt: skip


def test_pipelines_are_isolated_and_recipes_are_compared(
    prefect_harness: None, tmp_path: Path, mlflow_yml: Path
) -> None:
    from mlflow import MlflowClient

    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.config import load_mlflow_settings
    from recsys_embed.io import read_table
    from recsys_embed.tracking.tracker import resolve_settings

    retail, other = _slice(tmp_path, "retail", 0, 30_000), _slice(tmp_path, "other", 30_000, 60_000)
    out = tmp_path / "out"
    first = embedding_pipeline(CONFIG, _overrides(retail, out), str(mlflow_yml))
    name = first["registry"]["name"]
    assert first["registry"]["alias"] == "champion" and name.endswith("-retail")

    # another pipeline (its own name, its own log) on the same store registers its own model
    second = embedding_pipeline(CONFIG, _overrides(other, out, "name=other"), str(mlflow_yml))
    assert second["registry"]["name"].endswith("-other") and second["registry"]["reason"] == "no champion yet"
    client = MlflowClient(resolve_settings(load_mlflow_settings(mlflow_yml)).tracking_uri)
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert not (out / "retail" / "runs" / second["run_name"]).exists()  # outputs in out/other only

    # a retail run with another recipe: judged against the champion's recipe re-fitted on this run's fit window
    third = embedding_pipeline(CONFIG, _overrides(retail, out, "models.als.factors=16"), str(mlflow_yml))
    reg = third["registry"]
    assert reg["version"] == "2" and reg["previous_champion"] == "1"
    assert reg["champion_basis"] == "its recipe re-fitted on this run's fit window, scored on its validation window"
    assert reg["paired"]["users"] > 0 and reg["promoted"] == (reg["alias"] == "champion")
    assert (Path(third["run_dir"]) / "champion_recipe" / "als").is_dir()

    # the CLI answers from the retail champion, whatever ran on the store in between
    champ = first if reg["alias"] == "challenger" else third
    table = read_table(champ["exports"]["als"]["topk"])
    user = str(table.filter(pl.col("source") == "model")["user_id"][0])
    cli = subprocess.run(
        [sys.executable, "-m", "recsys_embed.cli", "--mlflow-config", str(mlflow_yml), "recommend", "--user", user,
         "-k", "3", "--from-registry", "--config", CONFIG, *[a for o in _overrides(retail, out) for a in ("--set", o)]],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    want = table.filter(pl.col("user_id").cast(pl.String) == user).sort("rank")["item_id"].cast(pl.String)
    assert f"{name}@champion" in cli.stdout and want[0] in cli.stdout


def test_a_later_champion_is_not_rescored_on_its_own_training_data(
    prefect_harness: None, tmp_path: Path, mlflow_yml: Path
) -> None:
    import scipy.sparse as sp

    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.evaluation.compare import rescore
    from recsys_embed.store import load_csr, load_embeddings
    from recsys_embed.types import IdMap

    later, earlier = _slice(tmp_path, "later", 0, 60_000), _slice(tmp_path, "earlier", 0, 40_000)
    out = tmp_path / "out"
    champion = embedding_pipeline(CONFIG, _overrides(later, out), str(mlflow_yml))  # refit on all 60k rows
    assert champion["registry"]["alias"] == "champion"

    # an earlier window, another recipe: the champion (fitted on rows this run holds out) must not be scored here
    run = embedding_pipeline(CONFIG, _overrides(earlier, out, "models.als.factors=16"), str(mlflow_yml))
    reg = run["registry"]
    assert reg["champion_basis"].startswith("its recipe re-fitted on this run's fit window")
    honest = reg["champion_value"]

    # the same recipe fitted on this run's fit window by a run of its own gives exactly that value
    same = embedding_pipeline(CONFIG, _overrides(earlier, out, "registry.enabled=false"), str(mlflow_yml))
    assert same["val_metrics"]["als"]["ndcg_at_20"] == pytest.approx(honest, abs=1e-9)

    # what re-scoring the champion model itself on this validation window would have claimed: it trained on it
    split = Path(run["run_dir"]) / "split"
    emb = load_embeddings(champion["exports"]["als"]["model_embeddings"])
    leaked = rescore(emb, IdMap.load(split / "user_map.parquet"), IdMap.load(split / "item_map.parquet"),
                     load_csr(split / "train.npz"), sp.csr_matrix(load_csr(split / "val_targets.npz")),
                     [20])["ndcg_at_20"]  # fmt: skip
    assert leaked > 1.2 * honest, (leaked, honest)
    assert np.isfinite(honest) and honest > 0


def test_a_cut_run_never_takes_the_champion_from_the_full_run(
    prefect_harness: None, tmp_path: Path, mlflow_yml: Path
) -> None:
    """Issue 20.2: the same files read with ``ingest.until`` are older data, not "the same data": the cut run's
    version becomes challenger, and a plain run afterwards finds the full run's version still champion. The
    versions say what their metrics measured apart from what the model was trained on."""
    from mlflow import MlflowClient

    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.config import load_mlflow_settings
    from recsys_embed.tracking.tracker import resolve_settings

    log, out = _slice(tmp_path, "retail", 0, 30_000), tmp_path / "out"  # events 2010-12-01 .. 2010-12-14
    full = embedding_pipeline(CONFIG, _overrides(log, out), str(mlflow_yml))
    assert full["registry"]["alias"] == "champion"
    cut = embedding_pipeline(CONFIG, _overrides(log, out, "ingest.until=2010-12-10"), str(mlflow_yml))
    reg = cut["registry"]
    assert reg["registered"] is True and reg["alias"] == "challenger", reg
    assert "older data" in reg["reason"] and "registry.allow_older" in reg["reason"]
    again = embedding_pipeline(CONFIG, _overrides(log, out), str(mlflow_yml))
    assert again["registry"]["version"] == full["registry"]["version"] and again["registry"]["alias"] == "champion"
    assert again["registry"]["reason"].startswith("unchanged"), again["registry"]

    client = MlflowClient(resolve_settings(load_mlflow_settings(mlflow_yml)).tracking_uri)
    name = reg["name"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == full["registry"]["version"]
    mine, theirs = (client.get_model_version(name, r["registry"]["version"]).tags for r in (cut, full))
    assert mine["data_fingerprint"] == theirs["data_fingerprint"]  # the same files ...
    assert mine["data_until"] == "2010-12-10T00:00:00" and theirs["data_until"] == "None"
    assert mine["training_window_last"] < "2010-12-10" < theirs["training_window_last"]  # ... other events
    assert mine["data_identity"] != theirs["data_identity"]
    assert json.loads((out / "retail" / "champion.json").read_text())["version"] == full["registry"]["version"]
    # what the metrics measured (the evaluation fit's test window) apart from what the model was trained on
    window = full["exports"]["als"]["trained_on"]["window"]
    assert f"scored on the test window [{full['split']['cutoff']}, {window['last']}]" in theirs["metrics_measured"]
    assert theirs["trained_on"].startswith(f"trained on: all kept events {window['first']} .. {window['last']}")
