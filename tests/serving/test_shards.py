"""Sharded top-k export in one process: the plan's layout, commit checks, retries and the empty table.
The same protocol on a real Dask cluster (and a killed worker) is in test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_embed.config import ExportConfig, load_config
from recsys_embed.errors import ConfigError
from recsys_embed.serving.export import export_topk, read_export
from recsys_embed.serving.shards import ShardError, ShardPlan, commit_topk_shards, export_topk_shard, plan_topk_shards
from recsys_embed.types import Embeddings, IdMap

N_USERS, N_ITEMS = 50, 30


@pytest.fixture
def emb() -> Embeddings:
    rng = np.random.default_rng(0)
    return Embeddings(
        user_vectors=rng.standard_normal((N_USERS, 4)),
        item_vectors=rng.standard_normal((N_ITEMS, 4)),
        users=IdMap(pl.Series("id", np.arange(100, 100 + N_USERS, dtype=np.int64))),
        items=IdMap(pl.Series("id", [f"i{j}" for j in range(N_ITEMS)])),
        model="als",
    )


def _run_all(emb: Embeddings, cfg: ExportConfig, plan: ShardPlan, skip: int | None = None) -> None:
    for i in range(len(plan.shards)):
        if i != skip:
            export_topk_shard(emb, None, cfg, plan, i, "r")


def test_plan_cuts_whole_chunks_evenly(tmp_path: Path) -> None:
    # 50 users in chunks of 8: 7 chunks (the last of 2 users) -> 3 shards of 3, 2, 2 chunks
    plan = plan_topk_shards(50, 8, 3, tmp_path / "topk")
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 24), (24, 40), (40, 50)]
    assert Path(plan.staging).is_dir() and Path(plan.staging).name.startswith(".topk.shards-")
    assert len(plan_topk_shards(50, 8, 100, tmp_path / "b").shards) == 7  # never more shards than chunks
    assert [(s.start, s.stop) for s in plan_topk_shards(0, 8, 4, tmp_path / "c").shards] == [(0, 0)]
    assert ShardPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # survives a JSON round trip


def test_commit_names_the_missing_shard_and_publishes_nothing(emb: Embeddings, tmp_path: Path) -> None:
    cfg = ExportConfig(k=5, chunk_users=10)
    plan = plan_topk_shards(N_USERS, 10, 3, tmp_path / "topk")
    _run_all(emb, cfg, plan, skip=1)
    with pytest.raises(ShardError, match=r"1 of 3 shards .*shard 1 \(users 20\.\.40\): no receipt"):
        commit_topk_shards(plan, cfg)
    assert not (tmp_path / "topk").exists()
    export_topk_shard(emb, None, cfg, plan, 1, "r")  # the missing shard arrives: now the commit goes through
    assert commit_topk_shards(plan, cfg).rows == N_USERS * 5


def test_retried_shard_and_commit_never_duplicate_rows(emb: Embeddings, tmp_path: Path) -> None:
    cfg = ExportConfig(k=5, chunk_users=10, rows_per_file=7)
    export_topk(emb, None, cfg, tmp_path / "single", "r")
    plan = plan_topk_shards(N_USERS, 10, 2, tmp_path / "topk")
    _run_all(emb, cfg, plan)
    export_topk_shard(emb, None, cfg, plan, 0, "r")  # a retry after the first attempt finished
    first = commit_topk_shards(plan, cfg)
    again = commit_topk_shards(plan, cfg)  # a retried commit task: already committed, nothing redone
    assert first.rows == again.rows == N_USERS * 5
    got = read_export(tmp_path / "topk")
    assert got.equals(read_export(tmp_path / "single" / "topk"))
    assert not list(tmp_path.glob(".topk.*"))  # staging removed


def test_stray_part_in_a_shard_is_refused(emb: Embeddings, tmp_path: Path) -> None:
    cfg = ExportConfig(k=5, chunk_users=25)
    plan = plan_topk_shards(N_USERS, 25, 2, tmp_path / "topk")
    _run_all(emb, cfg, plan)
    stray = Path(plan.staging) / "shard-00000" / "part-00099.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(stray)
    with pytest.raises(ShardError, match="differ from its receipt"):
        commit_topk_shards(plan, cfg)


def test_shard_refuses_embeddings_the_plan_was_not_made_for(emb: Embeddings, tmp_path: Path) -> None:
    plan = plan_topk_shards(N_USERS + 1, 10, 2, tmp_path / "topk")
    with pytest.raises(ShardError, match=r"plan was made for 51 users"):
        export_topk_shard(emb, None, ExportConfig(chunk_users=10), plan, 0, "r")


def test_empty_table_keeps_its_schema_and_csv_header(emb: Embeddings, tmp_path: Path) -> None:
    cfg = ExportConfig(k=3, chunk_users=10, allow_items=["i1"], deny_items=["i1"], write_csv=True)
    with pytest.warns(UserWarning):
        export_topk(emb, None, cfg, tmp_path / "single", "r")
    plan = plan_topk_shards(N_USERS, 10, 3, tmp_path / "topk")
    with pytest.warns(UserWarning):
        _run_all(emb, cfg, plan)
    res = commit_topk_shards(plan, cfg)
    assert res.rows == 0 and len(res.files) == 2  # one empty part + the CSV
    got, want = read_export(tmp_path / "topk"), read_export(tmp_path / "single" / "topk")
    assert got.schema == want.schema and got.height == 0
    assert (tmp_path / "topk.csv").read_bytes() == (tmp_path / "single" / "topk.csv").read_bytes()


def test_distributed_config_rejects_unknown_keys() -> None:
    cfg = load_config(None, ["distributed.enabled=true", "distributed.address=tcp://10.0.0.5:8786"])
    assert cfg.distributed.address == "tcp://10.0.0.5:8786" and cfg.distributed.shards == 0
    with pytest.raises(ConfigError, match=r"distributed\.workers"):
        load_config(None, ["distributed.workers=4"])


def test_late_duplicate_shard_after_commit_writes_nothing(emb: Embeddings, tmp_path: Path) -> None:
    """Dask may recompute a shard whose result was lost with a worker after the commit already ran."""
    cfg = ExportConfig(k=5, chunk_users=25)
    plan = plan_topk_shards(N_USERS, 25, 2, tmp_path / "topk")
    _run_all(emb, cfg, plan)
    commit_topk_shards(plan, cfg)
    late = export_topk_shard(emb, None, cfg, plan, 1, "r")
    assert late.rows == 25 * 5 and late.parts == []
    assert not Path(plan.staging).exists()  # the staging folder is not re-created
