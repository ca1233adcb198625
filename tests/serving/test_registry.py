"""Registry + database export through the real flow (Prefect harness, MLflow and SQLite in tmp_path).

Run 1 registers the best model as champion and writes the SQLite tables; run 2 on the same log and config
registers nothing (no churn), and the database and ``current/`` keep serving the champion. A fresh process loads
``models:/<name>@champion`` and must return exactly the exported top-k for 100 sampled users.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from recsys_embed.serving.registry import decide
from tests.conftest import REPO, RETAIL

pytestmark = pytest.mark.slow

N_ROWS = 30_000


def test_decide_margin() -> None:
    assert decide(0.30, None, 0.01) == (True, "no champion yet")
    assert decide(0.32, 0.30, 0.01)[0] is True  # 0.32 > 0.30 + 0.01
    assert decide(0.305, 0.30, 0.01)[0] is False  # a gain below the margin keeps the champion
    promoted, why = decide(0.30, 0.30, 0.0)
    assert promoted is False and "does not beat" in why  # an identical rerun never churns the alias


def test_champion_pyfunc_and_database(prefect_harness: None, tmp_path: Path, mlflow_yml: Path) -> None:
    from mlflow import MlflowClient

    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.config import load_mlflow_settings
    from recsys_embed.io import read_table
    from recsys_embed.serving.dbexport import read_db_table
    from recsys_embed.tracking.tracker import resolve_settings

    src = tmp_path / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=N_ROWS).write_parquet(src)
    db = tmp_path / "recs.db"
    overrides = [
        f"ingest.source.path={src}",
        f"output_root={tmp_path / 'out'}",
        "models.bpr.enabled=false",
        "models.als.iterations=4",
        "models.als.eval_every=0",
        "export.database.enabled=true",
        f"export.database.uri=sqlite:///{db}",
        "models.ease.enabled=false",
        "tuning.enabled=false",
    ]
    cfg = str(REPO / "configs/retail.yaml")
    first = embedding_pipeline(cfg, overrides, str(mlflow_yml))
    reg = first["registry"]
    assert first["current"]["moved"] is True
    assert reg["alias"] == "champion" and reg["version"] == "1" and reg["reason"] == "no champion yet"

    best = first["best_model"]
    topk = read_table(first["exports"][best]["topk"])
    table = read_db_table(f"sqlite:///{db}", "recsys_topk")
    assert table.height == first["exports"][best]["topk_rows"] == first["exports"][best]["topk_users"] * 20
    assert set(table["run_id"]) == {first["mlflow"]["run_id"]} and set(table["model_version"]) == {"1"}
    assert first["database"]["tables"]["recsys_topk"] == table.height

    second = embedding_pipeline(cfg, overrides, str(mlflow_yml))
    reg2 = second["registry"]
    # an identical re-run (same data fingerprint and config) registers nothing: no churn
    assert reg2["version"] == "1" and reg2["registered"] is False and reg2["reason"].startswith("unchanged"), reg2
    settings = resolve_settings(load_mlflow_settings(mlflow_yml))
    client = MlflowClient(settings.tracking_uri)
    name = reg["name"]
    assert name == f"{settings.registered_model_name}-retail"  # one registered model per pipeline
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    tags = client.get_model_version(name, "1").tags
    assert tags["pipeline"] == "retail" and tags["metric_basis"].startswith("validation window")
    assert tags["training_window_last"] != "None" and int(tags["training_rows"]) > 0 and tags["data_fingerprint"]
    parent = client.get_run(second["mlflow"]["run_id"])
    assert parent.data.tags["champion_decision"].startswith("v1 champion: unchanged")
    # the database and the stable path serve the champion
    assert set(read_db_table(f"sqlite:///{db}", "recsys_topk")["model_version"]) == {"1"}
    current = Path(second["current"]["current"])
    assert current.is_symlink() and read_table(current / "topk").height == table.height

    # a fresh process loads the champion and answers like the exported table of run 1
    users = topk["user_id"].unique().sort().sample(100, seed=7).cast(pl.String).to_list()
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "m = mlflow.pyfunc.load_model(f'models:/{sys.argv[2]}@champion')\n"
        "out = m.predict(pd.DataFrame({'user_id': json.loads(sys.argv[3])}), params={'k': 20})\n"
        "print(json.dumps({u: [list(i), [float(x) for x in s]] for u, i, s in "
        "zip(out.user_id, out.item_ids, out.scores)}))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, settings.tracking_uri, name, json.dumps(users)],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    answers = json.loads(res.stdout.strip().splitlines()[-1])
    want = topk.with_columns(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)).sort(
        "user_id", "rank"
    )
    for u in users:
        rows = want.filter(pl.col("user_id") == u)
        items, scores = answers[u]
        assert items == rows["item_id"].to_list(), u
        assert scores == pytest.approx(rows["score"].to_list(), rel=1e-5, abs=1e-6)

    # the CLI answers from the registry too
    cli = subprocess.run(
        [sys.executable, "-m", "recsys_embed.cli", "--mlflow-config", str(mlflow_yml), "recommend", "--user", users[0],
         "-k", "5", "--from-registry", "--config", cfg, *[a for o in overrides for a in ("--set", o)]],
        capture_output=True, text=True, check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert answers[users[0]][0][0] in cli.stdout and "@champion" in cli.stdout
