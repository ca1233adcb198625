"""The registered recommender stands alone: a fresh virtualenv built only from the model's own ``requirements.txt``
(no recsys-embed, no torch, no polars) loads ``models:/<name>@champion`` from the run's SQLite store and answers
exactly the exported top-k table for 100 users, given their IDs as ints (the export's Int64) and as strings.

pip installs from a wheelhouse kept between runs (``$RECSYS_EMBED_WHEELHOUSE``, default
``~/.cache/recsys-embed/wheelhouse``), filled with ``pip download`` from the configured index the first time a
requirement is missing there. Measured on the 2-core box: about 70 s for the venv (venv + install from the
wheelhouse, no bytecode compilation), the pipeline run and the comparison beside it; a first run on a new machine
adds about 2 min of downloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.conftest import REPO, RETAIL

pytestmark = pytest.mark.slow

N_ROWS = 30_000

PREDICT = """
import json, sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(f"models:/{sys.argv[2]}@champion")
users = json.loads(sys.argv[3])
out = {}
for kind, ids in (("int", users), ("str", [str(u) for u in users])):
    res = model.predict(pd.DataFrame({"user_id": ids}), params={"k": 20})
    out[kind] = {"user_id": [str(u) for u in res.user_id], "item_ids": [list(map(str, i)) for i in res.item_ids],
                 "scores": [list(map(float, s)) for s in res.scores], "source": list(res.source)}
cold = model.predict(pd.DataFrame({"user_id": ["not-a-user"]}))
out["cold"] = {"n": len(cold.item_ids[0]), "source": cold.source[0]}
print(json.dumps(out))
"""


def _pip(venv_python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv_python), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, check=False)  # fmt: skip


def _venv_from(requirements: Path, where: Path) -> tuple[Path, float]:
    """A virtualenv with only ``requirements`` installed; (its python, seconds spent)."""
    wheelhouse = Path(os.environ.get("RECSYS_EMBED_WHEELHOUSE", Path.home() / ".cache/recsys-embed/wheelhouse"))
    wheelhouse.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, capture_output=True)
    py = where / "bin" / "python"
    local = ("install", "-q", "--no-compile", "--no-index", "--find-links", str(wheelhouse), "-r", str(requirements))
    res = _pip(py, *local)
    if res.returncode != 0:  # a requirement is not in the wheelhouse yet: fetch it (not timed), then install
        seconds = time.perf_counter() - t0
        got = _pip(py, "download", "-q", "-d", str(wheelhouse), "-r", str(requirements))
        assert got.returncode == 0, got.stderr[-3000:]
        t0 = time.perf_counter() - seconds
        res = _pip(py, *local)
    assert res.returncode == 0, res.stderr[-3000:]
    return py, time.perf_counter() - t0


def test_champion_loads_and_answers_in_a_fresh_venv(prefect_harness: None, tmp_path: Path, mlflow_yml: Path) -> None:
    import mlflow

    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.config import load_mlflow_settings
    from recsys_embed.io import read_table
    from recsys_embed.tracking.tracker import resolve_settings

    src = tmp_path / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=N_ROWS).write_parquet(src)
    overrides = [f"ingest.source.path={src}", f"output_root={tmp_path / 'out'}", "models.bpr.enabled=false",
                 "models.two_tower.enabled=false", "models.als.iterations=4", "models.als.eval_every=0",
                 "models.ease.enabled=false", "tuning.enabled=false"]  # fmt: skip
    manifest = embedding_pipeline(str(REPO / "configs/retail.yaml"), overrides, str(mlflow_yml))
    settings = resolve_settings(load_mlflow_settings(mlflow_yml))
    name = manifest["registry"]["name"]  # the pipeline's own registered model
    assert manifest["registry"]["alias"] == "champion"

    _check_mlflow_records(manifest, settings.tracking_uri, name)

    mlflow.set_tracking_uri(settings.tracking_uri)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{name}@champion"))
    reqs = [line.split("==")[0].strip().lower() for line in requirements.read_text().splitlines() if line.strip()]
    assert set(reqs) == {"mlflow", "numpy", "pandas", "pyarrow", "scipy"}, reqs  # no recsys-embed, torch, polars

    py, seconds = _venv_from(requirements, tmp_path / "venv")
    print(f"\nfresh venv from the model's requirements.txt: {seconds:.1f} s")
    absent = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('recsys_embed'), "
                             "u.find_spec('polars'), u.find_spec('torch'))"],
                            capture_output=True, text=True, check=True, cwd=tmp_path)  # fmt: skip
    assert absent.stdout.split() == ["None", "None", "None"]

    topk = read_table(manifest["exports"][manifest["best_model"]]["topk"])
    assert topk["user_id"].dtype == pl.Int64
    users = topk["user_id"].unique().sort().sample(100, seed=11).to_list()
    t0 = time.perf_counter()
    res = subprocess.run([str(py), "-c", PREDICT, settings.tracking_uri, name, json.dumps(users)],
                         capture_output=True, text=True, check=False, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    print(f"load + predict in the venv: {time.perf_counter() - t0:.1f} s")
    out = json.loads(res.stdout.strip().splitlines()[-1])

    want = topk.with_columns(pl.col("item_id").cast(pl.String)).sort("user_id", "rank")
    for kind in ("int", "str"):
        got = out[kind]
        assert got["user_id"] == [str(u) for u in users]
        for row, u in enumerate(users):
            rows = want.filter(pl.col("user_id") == u)
            assert got["source"][row] == rows["source"][0], (kind, u)  # model, or the refit's popularity fallback
            assert got["item_ids"][row] == rows["item_id"].to_list(), (kind, u)
            assert got["scores"][row] == pytest.approx(rows["score"].to_list(), rel=1e-6, abs=1e-7), (kind, u)
    assert out["cold"] == {"n": 20, "source": "fallback"}  # an unknown user gets the popularity top-k


def _check_mlflow_records(manifest: dict[str, Any], tracking_uri: str, name: str) -> None:
    """MLflow 3 done natively: a LoggedModel on the best model's run with its hyperparameters and test metrics linked
    to the dataset; nested runs with hyperparameters and descriptions; summary.json with absolute paths only."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    best = manifest["best_model"]
    run_id = manifest["mlflow"]["model_runs"][best]
    version = client.get_model_version(name, manifest["registry"]["version"])
    assert version.source == manifest["registry"]["model_uri"] and version.run_id == run_id
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert model.source_run_id == run_id and model.name == "recommender"
    assert {"factors", "alpha", "regularization", "iterations"} <= set(model.params)  # ALS's hyperparameters
    linked = {m.key: (m.dataset_name, m.dataset_digest) for m in model.metrics}
    parent = client.get_run(manifest["mlflow"]["run_id"])
    dataset = parent.inputs.dataset_inputs[0].dataset
    assert linked["ndcg_at_20"] == (dataset.name, dataset.digest)
    assert mlflow.search_logged_models(experiment_ids=[model.experiment_id], output_format="list")  # Models tab
    run = client.get_run(run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {dataset.digest}
    for m, rid in manifest["mlflow"]["model_runs"].items():
        child = client.get_run(rid)
        assert child.data.tags["mlflow.note.content"].startswith(f"**{m}**")
    assert {"factors", "alpha", "regularization", "info.backend"} <= set(run.data.params)  # the nested ALS run
    assert parent.data.tags["mlflow.note.content"].startswith("# recsys-embed run")

    summary = json.loads((Path(manifest["run_dir"]) / "summary.json").read_text())

    def paths(obj: Any) -> list[str]:
        if isinstance(obj, dict):
            return [p for v in obj.values() for p in paths(v)]
        if isinstance(obj, list):
            return [p for v in obj for p in paths(v)]
        return [obj] if isinstance(obj, str) and "/" in obj and ":/" not in obj and not obj.startswith("#") else []

    found = paths(summary)
    assert found and all(Path(p).is_absolute() for p in found), [p for p in found if not Path(p).is_absolute()]
