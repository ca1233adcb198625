"""``recsys-embed init``: a newcomer's own log -> a commented config that loads, ingests and runs
(``recsys_embed.data.sniff`` and the CLI subcommand)."""

from __future__ import annotations

import csv
import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml

from recsys_embed.cli import main
from recsys_embed.config import load_config
from recsys_embed.data.ingest import load_events
from recsys_embed.data.sniff import default_name, propose, read_sample, render_yaml
from recsys_embed.errors import IngestError
from tests.conftest import REPO, RETAIL

OTTO = REPO / "data" / "otto-sample" / "events.parquet"
SHOP_WEIGHTS = {"purchase": 1.0, "add_to_cart": 0.5, "click": 0.3, "view": 0.1, "return": -1.0}


def _shop_csv(path: Path, n: int = 3000, seed: int = 7, sep: str = ",") -> Path:
    """A shop log with other column names (customer, sku, ts, action), ISO times, and planted tastes: customer c
    mostly buys from item group c % 8, so a model must beat popularity."""
    rng = random.Random(seed)
    start = datetime(2024, 3, 1, 8)
    actions = ["view"] * 6 + ["click"] * 3 + ["add_to_cart"] * 2 + ["purchase"] * 2
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=sep)
        w.writerow(["customer", "sku", "ts", "action"])
        for _ in range(n):
            c = rng.randrange(400)
            g = c % 8 if rng.random() < 0.85 else rng.randrange(8)
            sku = f"SKU-{g}{min(int(rng.expovariate(0.12)), 29):03d}"
            action = rng.choice(actions) if rng.random() > 0.01 else "return"
            t = start + timedelta(seconds=rng.randrange(60 * 86400))
            w.writerow([f"C{c:04d}", sku, t.strftime("%Y-%m-%dT%H:%M:%S"), action])
    return path


def _init(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["init", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------------------
# the two-command path: init, then the config is what run reads


def test_init_writes_a_commented_config_that_loads_and_ingests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _shop_csv(tmp_path / "data" / "shop.csv")
    rc, out, _ = _init(["data/shop.csv"], capsys)
    assert rc == 0
    assert (
        "customer" in out and "Wrote configs/shop.yaml" in out and "recsys-embed run --config configs/shop.yaml" in out
    )
    assert "naive" not in out and "carry no zone" in out  # what to check: the zone of ISO times without one

    cfg = load_config("configs/shop.yaml")
    assert cfg.name == "shop"  # outputs/shop/, apart from the retail pipeline's outputs/retail/
    cols = cfg.ingest.columns
    assert (cols.user, cols.item, cols.timestamp, cols.event_type) == ("customer", "sku", "ts", "action")
    assert (cols.quantity, cols.item_text, cols.rating, cols.weight) == (None, None, None, None)
    assert cfg.ingest.event_weights == SHOP_WEIGHTS
    assert cfg.split.method == "auto" and not cfg.models.two_tower.enabled  # auto: no choice made on a thin window
    assert cfg.models.ease.enabled and cfg.tuning.enabled  # the strong recipe from the defaults in code

    # every choice carries a comment
    text = (tmp_path / "configs" / "shop.yaml").read_text()
    section = text.split("  columns:\n", 1)[1].split("\nsplit:", 1)[0]
    mapping_lines = [ln for ln in section.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert mapping_lines and all(" # " in ln for ln in mapping_lines if "_interactions: 1" not in ln)

    ev = load_events(cfg.ingest)
    ev.report.check()
    assert ev.report.rows_read == 3000 and ev.report.n_quarantined == 0 and ev.report.kept == 3000
    assert ev.events["ts"].null_count() == 0 and ev.events.schema["user_id"] == pl.String


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _shop_csv(tmp_path / "shop.csv", n=200)
    target = tmp_path / "configs" / "mine.yaml"
    target.parent.mkdir()
    target.write_text("# my own edits\n")
    rc, _, err = _init(["shop.csv", "--name", "mine"], capsys)
    assert rc == 2 and "configs/mine.yaml' already exists; pass --force" in err
    assert target.read_text() == "# my own edits\n"
    rc, _, _ = _init(["shop.csv", "--name", "mine", "--force"], capsys)
    assert rc == 0 and load_config(target).name == "mine"
    assert sorted(p.name for p in target.parent.iterdir()) == ["mine.yaml"]  # no temporary file left
    rc, _, err = _init(["shop.csv", "--name", "../x"], capsys)
    assert rc == 2 and "must be a plain folder name" in err


# ---------------------------------------------------------------------------------------------------------
# proposals


def test_proposals_for_the_shipped_logs() -> None:
    retail = propose(read_sample(str(RETAIL)), "retail-init")
    ch = {role: c.column for role, c in retail.choices.items()}
    assert ch["user"] == "user_id" and ch["item"] == "item_id" and ch["event_type"] == "event_type"
    assert ch["timestamp"] in ("timestamp", "event_time") and ch["quantity"] == "quantity"
    assert ch["item_text"] == "description" and ch["rating"] is None and ch["weight"] is None
    assert {g.value: g.weight for g in retail.event_types} == {"purchase": 1.0, "cancellation": -1.0}
    assert retail.rows_estimate == 541_909

    otto = propose(read_sample(str(OTTO)), "otto")
    ch = {role: c.column for role, c in otto.choices.items()}
    assert (ch["user"], ch["item"], ch["event_type"]) == ("session_id", "item_id", "event_type")
    assert otto.choices["user"].check  # sessions stand in for users: flagged
    assert ch["timestamp"] in ("timestamp", "ts_ms")
    assert {g.value: g.weight for g in otto.event_types} == {"orders": 1.0, "carts": 0.5, "clicks": 0.3}


def test_columns_told_by_content_when_names_say_nothing(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    # user IDs are 10-digit numbers, in the range of epoch seconds: numbers are times only when the name says so
    rows = [
        f"{1_600_000_000 + k % 50},p{k % 37},2024-01-0{1 + k % 9} 10:00:00+01:00,{'purchase' if k % 5 else 'view'}"
        for k in range(500)
    ]
    p.write_text("a,b,c,d\n" + "\n".join(rows) + "\n")
    prop = propose(read_sample(str(p)), "x")
    ch = prop.choices
    found = (ch["user"].column, ch["item"].column, ch["timestamp"].column, ch["event_type"].column)
    assert found == ("a", "b", "c", "d")
    assert ch["user"].check and ch["item"].check  # guessed from content only: marked CHECK
    assert not prop.naive_times  # the times carry their offset
    assert any("ID-like by content only" in c for c in prop.checks)
    assert "CHECK: ID-like by content only" in render_yaml(prop, "recsys-embed init x.csv")


def test_hints_win_and_a_missing_hint_column_is_named(tmp_path: Path) -> None:
    sample = read_sample(str(_shop_csv(tmp_path / "shop.csv", n=200)))
    prop = propose(sample, "shop", {"user": "sku", "item": "customer"})
    assert (prop.choices["user"].column, prop.choices["item"].column) == ("sku", "customer")
    with pytest.raises(IngestError, match=r"--user 'client': the log has no such column \(found: \['customer'"):
        propose(sample, "shop", {"user": "client"})


def test_log_without_time_or_event_type_gets_nulls_and_a_random_split(tmp_path: Path) -> None:
    p = tmp_path / "pairs.csv"
    p.write_text("user_id,item_id\n" + "".join(f"{k % 30},{k % 17}\n" for k in range(300)))
    prop = propose(read_sample(str(p)), "pairs")
    assert prop.choices["timestamp"].column is None and prop.choices["event_type"].column is None
    cfg_path = tmp_path / "pairs.yaml"
    cfg_path.write_text(render_yaml(prop, "recsys-embed init pairs.csv"))
    cfg = load_config(cfg_path)
    assert cfg.split.method == "random" and cfg.ingest.event_weights == {}
    assert cfg.ingest.columns.timestamp is None and cfg.ingest.columns.event_type is None
    ev = load_events(cfg.ingest)
    assert ev.report.kept + ev.report.duplicates == 300 and set(ev.events["weight"]) == {1.0}


def test_pandas_float_ids_are_proposed_as_int_ids(tmp_path: Path) -> None:
    # pandas writes an integer column with gaps as 17850.0; the proposal reads such IDs as integers, so the same
    # customer written 17850 in another file is the same user
    d = tmp_path / "logs"
    d.mkdir()
    (d / "a.csv").write_text("user_id,item_id,timestamp\n17850.0,i1,1700000000\n,i2,1700000001\n12.0,i3,1700000002\n")
    (d / "b.csv").write_text("user_id,item_id,timestamp\n17850,i4,1700000003\n12,i1,1700000004\n")
    prop = propose(read_sample(str(d)), "logs")
    assert prop.id_types["user"].column == "int" and "17850.0" in prop.id_types["user"].why
    assert prop.id_types["item"].column == "auto"
    cfg_path = tmp_path / "logs.yaml"
    cfg_path.write_text(render_yaml(prop, "recsys-embed init logs"))
    ev = load_events(load_config(cfg_path).ingest)
    assert dict(ev.events.group_by("user_id").len().rows()) == {17850: 2, 12: 2}


def test_event_types_that_need_quoting_round_trip(tmp_path: Path) -> None:
    values = ["yes", "1", "null-ish", "a: b", "#tag", "Ümlaut view", "purchase"]
    p = tmp_path / "odd.ndjson"
    p.write_text(
        "".join(
            json.dumps({"user": f"u{k}", "item": f"i{k % 7}", "time": 1_700_000_000 + k, "type": values[k % 7]}) + "\n"
            for k in range(70)
        )
    )
    prop = propose(read_sample(str(p)), "odd")
    assert prop.choices["event_type"].column == "type" and prop.choices["timestamp"].column == "time"
    text = render_yaml(prop, "recsys-embed init odd.ndjson")
    weights = yaml.safe_load(text)["ingest"]["event_weights"]
    assert set(weights) == set(values) and all(isinstance(k, str) for k in weights)
    assert weights["purchase"] == 1.0 and weights["Ümlaut view"] == 0.1 and weights["yes"] == 0.5
    cfg_path = tmp_path / "odd.yaml"
    cfg_path.write_text(text)
    ev = load_events(load_config(cfg_path).ingest)
    assert ev.report.kept == 70 and ev.report.n_quarantined == 0


def test_separator_and_partitioned_folders(tmp_path: Path) -> None:
    semi = _shop_csv(tmp_path / "semi.csv", n=100, sep=";")
    sample = read_sample(str(semi))
    assert sample.csv_separator == ";" and sample.frame.columns == ["customer", "sku", "ts", "action"]
    prop = propose(sample, "semi")
    cfg_path = tmp_path / "semi.yaml"
    cfg_path.write_text(render_yaml(prop, "recsys-embed init semi.csv"))
    cfg = load_config(cfg_path)
    assert cfg.ingest.source.csv_separator == ";" and load_events(cfg.ingest).report.kept == 100

    root = tmp_path / "events"
    for day in range(5):
        part = root / f"day=2024-01-0{day + 1}"
        part.mkdir(parents=True)
        pl.DataFrame(
            {"user_id": [day, day + 1], "product_id": [10, 11], "event_time": [1_704_067_200 + day * 86400] * 2}
        ).write_parquet(part / "part-0.parquet")
    sample = read_sample(str(root))
    assert (sample.files, sample.files_read, sample.frame.height) == (5, 3, 6)  # first, middle and last day
    prop = propose(sample, default_name(str(root)))
    assert prop.name == "events" and prop.choices["item"].column == "product_id"
    assert prop.choices["timestamp"].column == "event_time"


def test_default_name() -> None:
    assert default_name("data/shop_log.csv.gz") == "shop_log"
    assert default_name("logs/2024/*.parquet") == "2024"
    assert default_name("exports/events/") == "events"
    assert default_name("my log (v2).csv") == "my-log-v2"


# ---------------------------------------------------------------------------------------------------------
# end to end: init, then run --config (the flow under Prefect's harness, MLflow in tmp_path)


@pytest.mark.slow
def test_init_then_run_end_to_end(
    prefect_harness: None,
    tmp_path: Path,
    mlflow_yml: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flows.embedding_pipeline import embedding_pipeline

    monkeypatch.chdir(tmp_path)
    _shop_csv(tmp_path / "data" / "shop.csv", n=5000)
    rc, _, _ = _init(["data/shop.csv"], capsys)
    assert rc == 0
    manifest = embedding_pipeline("configs/shop.yaml", [], str(mlflow_yml))
    acc = manifest["accounting"]
    assert acc["balanced"] and acc["rows_read"] == 5000 and acc["quarantined_total"] == 0
    assert Path(manifest["run_dir"]).resolve().is_relative_to((tmp_path / "outputs" / "shop").resolve())
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["shop"]  # nothing of another pipeline
    # the strong set from the defaults in code (init leaves models and tuning to them): EASE in, every model searched
    assert set(manifest["metrics"]) == {"popularity", "ease", "als", "bpr"}
    assert set(manifest["tuning"]["models"]) == {"ease", "als", "bpr"}
    assert manifest["split"]["rule"].startswith("auto:")
    # the planted tastes are learnt: the factor models beat popularity by a wide margin
    ndcg = {m: v["ndcg_at_20"] for m, v in manifest["metrics"].items()}
    assert ndcg["als"] > 1.5 * ndcg["popularity"] and ndcg["bpr"] > 1.5 * ndcg["popularity"]


def _ratings_csv(path: Path, n_users: int = 2000, seed: int = 3) -> Path:
    """A ratings log with one global clock, as MovieLens: users arrive one after another over two years and each
    rates 20-40 movies within a week of arriving, so the last 10% of time holds only the latest arrivals."""
    rng = random.Random(seed)
    start = datetime(2020, 1, 1)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for u in range(n_users):
            arrive = start + timedelta(days=730 * u / n_users)
            for m in rng.sample(range(500), rng.randrange(20, 40)):
                t = arrive + timedelta(seconds=rng.randrange(7 * 86400))
                w.writerow([u, m, rng.choice([3, 4, 5]), int(t.timestamp())])
    return path


def test_global_clock_log_is_not_chosen_on_a_thin_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19: `init` on a ratings log with a global clock wrote split.method: temporal, whose validation window
    held a few dozen users, and popularity was shipped on them. Now init writes auto, which falls back to a per-user
    holdout; an explicit temporal split stops before training with the fix."""
    from recsys_embed.errors import ConfigError
    from recsys_embed.pipeline import stages

    monkeypatch.chdir(tmp_path)
    _ratings_csv(tmp_path / "ratings.csv")
    rc, _, _ = _init(["ratings.csv"], capsys)
    assert rc == 0
    cfg = load_config("configs/ratings.yaml")
    assert cfg.split.method == "auto" and cfg.ingest.columns.rating == "rating"
    ingest = stages.run_ingest(cfg.ingest, tmp_path / "cache")
    split = stages.run_split(ingest, cfg.ingest, cfg.split, tmp_path / "split")
    rule = split["split"]["rule"]
    assert rule.startswith("auto: last_n (temporal rejected: the val window holds") and "to choose on" in rule
    assert split["select_users"] >= cfg.split.min_eval_users  # the choice rests on enough users
    explicit = cfg.split.model_copy(update={"method": "temporal"})
    with pytest.raises(ConfigError, match=r"so the model shipped would be chosen on noise.*split.method: auto"):
        stages.run_split(ingest, cfg.ingest, explicit, tmp_path / "split2")
