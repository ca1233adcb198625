"""The backtest: ``ingest.until`` cuts the log with full accounting, the scorer on worked examples, the two
baselines, and the whole flow on a tiny generated log under Prefect's harness with MLflow in ``tmp_path``."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from recsys_embed.config import IngestConfig, SourceConfig, load_config
from recsys_embed.data.generate import generate, preset
from recsys_embed.data.ingest import UNTIL_RULE, load_events
from recsys_embed.evaluation import backtest
from recsys_embed.pipeline import stages
from tests.conftest import REPO

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _events(rows: list[tuple[str, str, int, float]]) -> pl.DataFrame:
    """Clean events from (user, item, day offset from T0, weight)."""
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "ts": [T0 + timedelta(days=r[2]) for r in rows],
            "weight": [r[3] for r in rows],
        },
        schema={"user_id": pl.String, "item_id": pl.String, "ts": pl.Datetime("us", "UTC"), "weight": pl.Float64},
    )


def _table(rows: dict[str, list[str]]) -> pl.DataFrame:
    users, ranks, items = [], [], []
    for u, lst in rows.items():
        for r, i in enumerate(lst, 1):
            users.append(u)
            ranks.append(r)
            items.append(i)
    return pl.DataFrame({"user_id": users, "rank": ranks, "item_id": items},
                        schema={"user_id": pl.String, "rank": pl.Int64, "item_id": pl.String})  # fmt: skip


# Before the cutoff (day 10): u1 bought a and b, u2 bought b, u3 bought a then cancelled it (weight -1 is still
# a kept event: a is in u3's history). After it: u1 buys c, d and a again (a is not new to u1), u2 buys e,
# u3 buys a (not new), u4 (no history: cold) buys a; u2 also cancels something (weight < 0: never a target).
LOG = _events([
    ("u1", "a", 1, 1.0), ("u1", "b", 2, 1.0), ("u2", "b", 3, 1.0), ("u3", "a", 4, 1.0), ("u3", "a", 5, -1.0),
    ("u1", "c", 11, 1.0), ("u1", "d", 12, 1.0), ("u1", "a", 12, 1.0), ("u2", "e", 13, 1.0), ("u3", "a", 14, 1.0),
    ("u4", "a", 14, 1.0), ("u2", "f", 15, -1.0),
])  # fmt: skip
CUTOFF = T0 + timedelta(days=10)


# ----------------------------------------------------------------------------------------------------------
# ingest.until


def _csv(tmp_path: Path) -> Path:
    p = tmp_path / "events.csv"
    p.write_text(
        "user_id,item_id,timestamp,event_type\n"
        "1,10,2024-01-01T00:00:00,purchase\n"
        "1,11,2024-01-05T00:00:00,purchase\n"
        "2,10,2024-01-09T23:59:59,purchase\n"
        "2,12,2024-01-10T00:00:00,purchase\n"  # exactly at until: removed (half-open, like the split)
        "3,12,2024-01-11T00:00:00,purchase\n"
        "3,12,2024-01-11T00:00:00,purchase\n",  # an exact duplicate: counted as a duplicate, not as after_until
        encoding="utf-8",
    )
    return p


def test_until_cuts_the_log_and_the_accounting_balances(tmp_path: Path) -> None:
    src = _csv(tmp_path)
    full = load_events(IngestConfig(source=SourceConfig(path=str(src))))
    cut = load_events(IngestConfig(source=SourceConfig(path=str(src)), until=datetime(2024, 1, 10)))  # naive: UTC
    r = cut.report
    assert r.rows_read == 6 and r.duplicates == 1 and r.filtered[UNTIL_RULE] == 2 and r.kept == 3
    assert r.rows_read == r.kept + r.duplicates + r.n_quarantined + r.n_filtered
    assert cut.events.height == r.kept
    assert (cut.events["ts"] < datetime(2024, 1, 10, tzinfo=UTC)).all()
    assert full.report.kept == 5 and UNTIL_RULE not in full.report.filtered
    # the same cut as backtest.split_at on the whole log
    before, after = backtest.split_at(full.events, datetime(2024, 1, 10, tzinfo=UTC))
    assert before.equals(cut.events) and after.height == 2


def test_until_is_in_the_ingest_cache_key(tmp_path: Path) -> None:
    src = _csv(tmp_path)
    whole = IngestConfig(source=SourceConfig(path=str(src)))
    cut = whole.model_copy(update={"until": datetime(2024, 1, 10, tzinfo=UTC)})
    fp = stages.input_fingerprint(whole)
    assert stages.ingest_cache_key(fp, whole) != stages.ingest_cache_key(fp, cut)
    a = stages.run_ingest(whole, tmp_path / "cache")
    b = stages.run_ingest(cut, tmp_path / "cache")
    assert b["cached"] is False and b["key"] != a["key"]
    assert b["report"]["filtered"] == {UNTIL_RULE: 2} and a["report"]["kept"] == 5
    assert stages.run_ingest(cut, tmp_path / "cache")["cached"] is True


def test_until_needs_a_timestamp_column(tmp_path: Path) -> None:
    from recsys_embed.errors import IngestError

    cfg = IngestConfig.model_validate(
        {"source": {"path": str(_csv(tmp_path))}, "columns": {"timestamp": None}, "until": "2024-01-10"}
    )
    with pytest.raises(IngestError, match=r"ingest\.until needs a timestamp column"):
        load_events(cfg)


# ----------------------------------------------------------------------------------------------------------
# Truth and scoring


def test_truth_keeps_only_items_new_to_warm_users() -> None:
    truth = backtest.build_truth(*backtest.split_at(LOG, CUTOFF))
    assert truth.users.to_list() == ["u1", "u2"]  # u3 bought only a, already in its history; u4 is cold
    assert truth.targets.rows() == [("u1", "c"), ("u1", "d"), ("u2", "e")]
    assert truth.info["cold_buyers_after"] == 1 and truth.info["warm_users"] == 2
    # c, d and e were never bought before the cutoff: new to the catalog, still targets
    assert truth.info["target_pairs_new_to_catalog"] == 3


def test_scorer_worked_example() -> None:
    truth = backtest.build_truth(*backtest.split_at(LOG, CUTOFF))
    # u1 gets [e, c, a]: a was already bought (not a target, counted as a seen row), c hits at rank 2.
    # u2 has no row at all: scored as a user with zero hits, never dropped.
    table = _table({"u1": ["e", "c", "a"], "u3": ["b", "c", "d"], "u9": ["c"]})
    m = backtest.score_table(table, truth, [3])
    # u1: targets {c, d}; recall = 1 / min(2, 3) = 0.5; DCG = 1/log2(3) = 0.63093, IDCG = 1 + 1/log2(3) = 1.63093,
    #     NDCG = 0.38685; hit rate 1.  u2: 0, 0, 0.  Means over the 2 warm users:
    assert m["n_users_evaluated"] == 2
    assert m["recall_at_3"] == pytest.approx(0.25)
    assert m["ndcg_at_3"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)) / 2)  # 0.193426
    assert m["ndcg_at_3"] == pytest.approx(0.193426, abs=1e-6)
    assert m["hit_rate_at_3"] == pytest.approx(0.5)
    assert m["users_without_rows"] == 1 and m["seen_rows"] == 1 and m["rows_scored"] == 3


def test_an_item_seen_before_the_cutoff_is_never_a_hit() -> None:
    truth = backtest.build_truth(*backtest.split_at(LOG, CUTOFF))
    # u1 bought a again after the cutoff, but a was in its history: recommending it earns nothing
    assert backtest.score_table(_table({"u1": ["a"], "u2": ["b"]}), truth, [1])["recall_at_1"] == 0.0
    # while the new item does: u1 recall@1 = 1/min(2,1) = 1, u2 0 -> 0.5
    assert backtest.score_table(_table({"u1": ["c"], "u2": ["b"]}), truth, [1])["recall_at_1"] == 0.5


def test_a_user_missing_from_the_table_counts_as_zero() -> None:
    truth = backtest.build_truth(*backtest.split_at(LOG, CUTOFF))
    both = backtest.score_table(_table({"u1": ["c", "d"], "u2": ["e"]}), truth, [2])
    one = backtest.score_table(_table({"u1": ["c", "d"]}), truth, [2])
    assert both["recall_at_2"] == 1.0 and both["users_without_rows"] == 0
    assert one["recall_at_2"] == 0.5 and one["users_without_rows"] == 1 and one["n_users_evaluated"] == 2


def test_table_ids_of_another_type_are_read_as_the_logs() -> None:
    log = LOG.with_columns(pl.col("item_id").replace({"a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6"}))
    log = log.with_columns(pl.col("item_id").cast(pl.Int64))
    truth = backtest.build_truth(*backtest.split_at(log, CUTOFF))
    table = _table({"u1": ["3"], "u2": ["5"]})  # text IDs against the log's integer IDs
    # u1: 1 hit / min(2, 1) = 1; u2: 1 / min(1, 1) = 1
    assert backtest.score_table(table, truth, [1])["recall_at_1"] == 1.0
    with pytest.raises(backtest.BacktestError, match="do not read as the log's"):
        backtest.score_table(_table({"u1": ["x"]}), truth, [1])


# ----------------------------------------------------------------------------------------------------------
# Baselines, cutoff, table lookup


def test_popularity_baseline_excludes_history() -> None:
    before, _ = backtest.split_at(LOG, CUTOFF)
    t = backtest.popularity_table(before, pl.Series(["u1", "u2"]), 2)
    # distinct buyers: a 2 (u1, u3), b 2 (u1, u2); u1 has both, so it gets nothing; u2 gets a
    assert t.filter(pl.col("user_id") == "u2")["item_id"].to_list() == ["a"]
    assert t.filter(pl.col("user_id") == "u1").height == 0


def test_hand_glued_als_recommends_unseen_items_deterministically() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    n = 4000
    log = _events([(f"u{rng.integers(60)}", f"i{rng.integers(80)}", int(rng.integers(20)), 1.0) for _ in range(n)])
    before, _ = backtest.split_at(log, T0 + timedelta(days=15))
    users = before["user_id"].unique().sort()
    a = backtest.hand_glued_als_table(before, users, 10, seed=3)
    b = backtest.hand_glued_als_table(before, users, 10, seed=3)
    assert a.equals(b)
    assert a.group_by("user_id").len()["len"].to_list() == [10] * users.len()
    seen = before.select("user_id", "item_id").unique()
    assert a.join(seen, on=["user_id", "item_id"], how="semi").height == 0


def test_resolve_cutoff_and_names() -> None:
    first, last = T0, T0 + timedelta(days=100)
    assert backtest.resolve_cutoff(first, last, 60, None) == T0 + timedelta(days=40)
    with pytest.raises(backtest.BacktestError, match="no event before it"):
        backtest.resolve_cutoff(first, last, 100, None)
    with pytest.raises(backtest.BacktestError, match="no event after it"):
        backtest.resolve_cutoff(first, last, None, T0 + timedelta(days=101))
    with pytest.raises(backtest.BacktestError, match="exactly one"):
        backtest.resolve_cutoff(first, last, 60, T0)
    assert backtest.backtest_name("retail", backtest.backtest_tag(60, None)) == "retail-backtest-60d"
    assert backtest.backtest_tag(None, datetime(2011, 10, 1, tzinfo=UTC)) == "2011-10-01"
    assert "ingest.until=2024-01-11T00:00:00+00:00" in backtest.pipeline_overrides("x", CUTOFF)


def test_shipped_tables_best_first() -> None:
    exports = {"als": {"topk": "e/als"}, "popularity": {"topk": "e/pop"}}
    assert list(backtest.shipped_tables({"exports": exports, "best_model": "popularity"})) == ["popularity", "als"]
    # the manifest's "shipped" (a list of names) does not change where the tables are read from
    manifest = {"exports": exports, "shipped": ["als"], "best_model": "als"}
    assert list(backtest.shipped_tables(manifest)) == ["als", "popularity"]


# ----------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate(preset("tiny", n_events=30_000, n_users=400, n_items=300, days=30), out)
    return out


def test_backtest_flow_end_to_end(prefect_harness: None, tiny_log: Path, tmp_path: Path, mlflow_yml: Path) -> None:
    from mlflow import MlflowClient

    from flows.backtest import backtest_flow
    from recsys_embed.config import load_mlflow_settings
    from recsys_embed.tracking.tracker import resolve_settings

    out = tmp_path / "out"
    overrides = [f"ingest.source.path={tiny_log}", f"output_root={out}", "models.als.iterations=4",
                 "models.als.eval_every=2", "models.bpr.enabled=false", "models.ease.enabled=false",
                 "tuning.enabled=false"]  # fmt: skip
    result = backtest_flow(str(REPO / "configs/synthetic.yaml"), overrides, str(mlflow_yml), holdout_days=7)

    name = "synthetic-1m-backtest-7d"
    root = out / name
    assert result["name"] == name
    cutoff = datetime.fromisoformat(result["cutoff"])
    assert cutoff == datetime.fromisoformat(result["last_event"]) - timedelta(days=7)
    # the pipeline ran on the cut log only, in its own folder, with no registry
    summary = json.loads((Path(result["pipeline"]["run_dir"]) / "summary.json").read_text())
    assert Path(summary["run_dir"]).parent.parent == root.resolve()
    assert summary["registry"] is None
    acc = summary["accounting"]
    assert acc["filtered"][UNTIL_RULE] > 0 and acc["balanced"] is True
    assert not (out / "synthetic-1m").exists()
    cfg = load_config(REPO / "configs/synthetic.yaml", [*overrides, f"ingest.until={cutoff.isoformat()}"])
    cut = pl.read_parquet(stages.run_ingest(cfg.ingest, tmp_path / "check")["events"])
    assert cut["ts"].max() < cutoff  # type: ignore[operator]

    names = [c["name"] for c in result["contenders"]]
    assert set(names) == {"popularity", "als", backtest.POPULARITY, backtest.BASELINE}
    assert names[0] == summary["best_model"] and result["contenders"][0]["best"] is True
    assert result["truth"]["warm_users"] > 50
    for c in result["contenders"]:
        assert c["metrics"]["n_users_evaluated"] == result["truth"]["warm_users"]
        assert 0.0 <= c["metrics"]["recall_at_20"] <= 1.0
    base = next(c for c in result["contenders"] if c["name"] == backtest.BASELINE)
    assert base["ratios"]["recall_at_20_ratio"] == pytest.approx(1.0)
    als = next(c for c in result["contenders"] if c["name"] == "als")
    assert als["ratios"]["ndcg_at_20_ratio"] == pytest.approx(
        als["metrics"]["ndcg_at_20"] / base["metrics"]["ndcg_at_20"]
    )

    # results on disk, atomically written, and the same table in MLflow
    on_disk = json.loads((root / "backtest.json").read_text())
    assert on_disk["contenders"] == json.loads(json.dumps(result["contenders"]))
    md = (root / "backtest.md").read_text()
    assert f"**{summary['best_model']}** (best)" in md and backtest.BASELINE in md and "Recall@20 ratio" in md
    client = MlflowClient(resolve_settings(load_mlflow_settings(mlflow_yml)).tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "backtest"
    assert run.data.tags["pipeline_run_id"] == summary["mlflow"]["run_id"]
    assert run.data.metrics["als.recall_at_20"] == pytest.approx(als["metrics"]["recall_at_20"])
    assert run.data.metrics[f"{backtest.BASELINE}.recall_at_20_ratio"] == pytest.approx(1.0)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"backtest.md", "backtest.json"} <= artifacts


def test_per_model_backtest_scores_every_model_with_defaults_and_tuned(
    prefect_harness: None, tiny_log: Path, tmp_path: Path, mlflow_yml: Path
) -> None:
    from flows.backtest import backtest_flow
    from recsys_embed.store import load_embeddings

    out = tmp_path / "out"
    overrides = [f"ingest.source.path={tiny_log}", f"output_root={out}", "models.als.iterations=4",
                 "models.als.eval_every=2", "models.bpr.enabled=false", "models.ease.enabled=false",
                 "tuning.enabled=true", "tuning.n_trials=3", "tuning.budget_minutes=null"]  # fmt: skip
    with pytest.raises(backtest.BacktestError, match=r"tuning\.enabled is false"):
        backtest_flow(str(REPO / "configs/synthetic.yaml"), [*overrides, "tuning.enabled=false"], str(mlflow_yml),
                      holdout_days=7, per_model=True)  # fmt: skip
    assert not out.exists()  # refused before any pipeline ran

    result = backtest_flow(str(REPO / "configs/synthetic.yaml"), overrides, str(mlflow_yml), holdout_days=7,
                           per_model=True)  # fmt: skip
    name = "synthetic-1m-backtest-7d"
    tuned_run = json.loads((Path(result["pipelines"]["tuned"]["run_dir"]) / "summary.json").read_text())
    plain_run = json.loads((Path(result["pipelines"]["defaults"]["run_dir"]) / "summary.json").read_text())
    assert Path(tuned_run["run_dir"]).parent.parent == (out / name).resolve()
    assert Path(plain_run["run_dir"]).parent.parent == (out / f"{name}-defaults").resolve()
    assert plain_run["tuning"] is None or not plain_run["tuning"].get("models")  # the second run searched nothing
    searched = tuned_run["tuning"]["models"]["als"]["params"]
    width = {run["run_dir"]: load_embeddings(run["exports"]["als"]["model_embeddings"]).item_vectors.shape[1]
             for run in (tuned_run, plain_run)}  # fmt: skip
    assert width[plain_run["run_dir"]] == load_config(REPO / "configs/synthetic.yaml").models.als.factors
    assert width[tuned_run["run_dir"]] == searched["factors"]  # the refit used the search's parameters

    kinds = {(c["model"], c["kind"]) for c in result["contenders"] if c["model"]}
    assert kinds == {(m, k) for m in ("popularity", "als") for k in ("tuned", "defaults")}
    als = next(c for c in result["contenders"] if c["name"] == "als")
    assert als["params"] == searched and als["best"] == (tuned_run["best_model"] == "als")
    als_defaults = next(c for c in result["contenders"] if c["name"] == "als (defaults)")
    assert als_defaults["params"] == {} and als_defaults["best"] is False
    assert als["table"] != als_defaults["table"]

    md = result["markdown"]
    assert "| als |" in md and "tuned / defaults" in md
    row = next(r for r in backtest.defaults_vs_tuned(_result(result)) if r["model"] == "als")
    assert row["gain"] == pytest.approx(als["metrics"]["ndcg_at_20"] / als_defaults["metrics"]["ndcg_at_20"])
    assert f"{row['gain']:.3f}x" in md


def _result(d: dict[str, Any]) -> backtest.BacktestResult:
    fields = {k: d[k] for k in backtest.BacktestResult.__dataclass_fields__}
    fields["contenders"] = [backtest.Contender(**c) for c in d["contenders"]]
    return backtest.BacktestResult(**fields)
