"""The registered recommender stands alone: a fresh virtualenv built only from the model's own ``requirements.txt``
(no recsys-embed, no torch, no polars) loads ``models:/<name>@champion`` from the run's SQLite store and answers
exactly the exported top-k table for 100 users, given their IDs as ints (the export's Int64) and as strings. Two
champions: ALS (the pipeline's default winner on this slice) and EASE (the only model of its run), whose answer
for a new user's ``history`` is folded in (``source="model"``, the history's X row times B), not the fallback.

pip installs from a wheelhouse kept between runs (``$RECSYS_EMBED_WHEELHOUSE``, default
``~/.cache/recsys-embed/wheelhouse``), filled with ``pip download`` from the configured index the first time a
requirement is missing there. Both models pin the same requirements, so the module builds one venv and both tests
use it. Measured on the 2-core box: about 11 s for the venv (venv + install from the wheelhouse, no bytecode
compilation), about 25 s for each pipeline run, about 5 s for each load + predict in the venv; a first run on a
new machine adds about 2 min of downloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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
if len(sys.argv) > 4:  # a new user with this history (item IDs), and the same new user without one
    history = json.loads(sys.argv[4])
    res = model.predict(pd.DataFrame({"user_id": ["new-user", "new-user"], "history": [history, None]}),
                        params={"k": 20})
    out["fold"] = {"item_ids": [list(map(str, i)) for i in res.item_ids], "scores": [list(map(float, s))
                   for s in res.scores], "source": list(res.source)}
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


@pytest.fixture(scope="module")
def served_venv(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """The python of a fresh venv built from a model's ``requirements.txt``: one per distinct file content, shared
    by this module's tests (every registered model pins the same requirements, so they share one venv)."""
    built: dict[str, Path] = {}

    def venv_for(requirements: Path) -> Path:
        key = requirements.read_text()
        if key not in built:
            where = tmp_path_factory.mktemp("venv")
            py, seconds = _venv_from(requirements, where / "venv")
            print(f"\nfresh venv from the model's requirements.txt: {seconds:.1f} s")
            absent = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('recsys_embed'), "
                                     "u.find_spec('polars'), u.find_spec('torch'))"],
                                    capture_output=True, text=True, check=True, cwd=where)  # fmt: skip
            assert absent.stdout.split() == ["None", "None", "None"]
            built[key] = py
        return built[key]

    return venv_for


def _run_pipeline(tmp_path: Path, mlflow_yml: Path, models: list[str]) -> tuple[dict[str, Any], str, str]:
    """The retail slice through the pipeline with ``models`` (registry on); (manifest, tracking URI, model name)."""
    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.config import load_mlflow_settings
    from recsys_embed.tracking.tracker import resolve_settings

    src = tmp_path / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=N_ROWS).write_parquet(src)
    switches = [f"models.{m}.enabled={str(m in models).lower()}"
                for m in ("popularity", "ease", "als", "bpr", "two_tower")]  # fmt: skip
    overrides = [f"ingest.source.path={src}", f"output_root={tmp_path / 'out'}", *switches, "models.als.iterations=4",
                 "models.als.eval_every=0", "tuning.enabled=false"]  # fmt: skip
    manifest = embedding_pipeline(str(REPO / "configs/retail.yaml"), overrides, str(mlflow_yml))
    settings = resolve_settings(load_mlflow_settings(mlflow_yml))
    assert manifest["registry"]["alias"] == "champion"
    return manifest, settings.tracking_uri, manifest["registry"]["name"]  # the pipeline's own registered model


def _champion_venv(tracking_uri: str, name: str, served_venv: Callable[[Path], Path]) -> Path:
    """The venv python for ``name@champion``, whose requirements must name only the served model's imports."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{name}@champion"))
    reqs = [line.split("==")[0].strip().lower() for line in requirements.read_text().splitlines() if line.strip()]
    assert set(reqs) == {"mlflow", "numpy", "pandas", "pyarrow", "scipy"}, reqs  # no recsys-embed, torch, polars
    return served_venv(requirements)


def _predict(py: Path, tracking_uri: str, name: str, users: list[Any], where: Path,
             history: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """PREDICT's answers from ``name@champion``, run in the venv of ``py``."""
    args = [str(py), "-c", PREDICT, tracking_uri, name, json.dumps(users)] + ([json.dumps(history)] if history else [])
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, check=False, cwd=where)
    assert res.returncode == 0, res.stderr[-3000:]
    print(f"load + predict in the venv: {time.perf_counter() - t0:.1f} s")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def _check_equals_topk(out: dict[str, Any], topk: pl.DataFrame, users: list[Any]) -> None:
    """The venv's answers (as ints and as strings) are the exported top-k table's rows; an unknown user falls back."""
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


def test_champion_loads_and_answers_in_a_fresh_venv(prefect_harness: None, tmp_path: Path, mlflow_yml: Path,
                                                    served_venv: Callable[[Path], Path]) -> None:  # fmt: skip
    from recsys_embed.io import read_table

    manifest, tracking_uri, name = _run_pipeline(tmp_path, mlflow_yml, ["popularity", "als"])
    assert manifest["best_model"] == "als"
    _check_mlflow_records(manifest, tracking_uri, name)
    py = _champion_venv(tracking_uri, name, served_venv)

    topk = read_table(manifest["exports"][manifest["best_model"]]["topk"])
    assert topk["user_id"].dtype == pl.Int64
    users = topk["user_id"].unique().sort().sample(100, seed=11).to_list()
    _check_equals_topk(_predict(py, tracking_uri, name, users, tmp_path), topk, users)


def test_ease_champion_folds_in_a_new_user_in_a_fresh_venv(prefect_harness: None, tmp_path: Path, mlflow_yml: Path,
                                                           served_venv: Callable[[Path], Path]) -> None:  # fmt: skip
    """Issue 19 item 6: with EASE the champion, a new user's history got the popularity fallback."""
    from recsys_embed.io import read_table
    from recsys_embed.store import load_embeddings

    manifest, tracking_uri, name = _run_pipeline(tmp_path, mlflow_yml, ["ease"])
    assert manifest["best_model"] == "ease"
    py = _champion_venv(tracking_uri, name, served_venv)

    topk = read_table(manifest["exports"]["ease"]["topk"])
    users = topk["user_id"].unique().sort().sample(20, seed=11).to_list()
    first = topk.filter(pl.col("source") == "model").sort("user_id", "rank")
    history = first["item_id"].head(3).cast(pl.String).to_list()  # three items the model knows (a user's top 3)
    out = _predict(py, tracking_uri, name, users, tmp_path, history)
    _check_equals_topk(out, topk, users)  # known users: the EASE champion answers like its export

    fold = out["fold"]
    assert fold["source"] == ["model", "fallback"], fold["source"]
    got, fallback = fold["item_ids"]
    assert len(got) == 20 and not set(got) & set(history)
    popular = [i for i in fallback if i not in history]  # the fallback's ranking for this history
    assert got[: len(popular)] != popular
    # history · B: the served item vectors are B's columns (+ the popularity dimension, 0 for a folded-in user);
    # retail's EASE is recency-weighted, and a history without timestamps weighs 1.0 per item
    emb = load_embeddings(manifest["exports"]["ease"]["embeddings"])
    ids = emb.items.ids.cast(pl.String).to_list()
    x = np.zeros(len(ids), dtype=np.float32)
    x[[ids.index(h) for h in history]] = 1.0
    scores = emb.item_vectors[:, : len(ids)] @ x
    scores[[ids.index(h) for h in history]] = -np.inf
    want = np.sort(scores)[::-1][:20]
    assert fold["scores"][0] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)
    assert [float(scores[ids.index(i)]) for i in got] == pytest.approx(fold["scores"][0], rel=1e-5, abs=1e-6)


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
    assert linked["test.ndcg_at_20"] == (dataset.name, dataset.digest)  # test metrics say their window
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
