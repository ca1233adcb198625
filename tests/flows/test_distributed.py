"""The distributed path on a real Dask LocalCluster (2 worker processes): sharded top-k export equals the
single-process export row for row and value for value, survives a SIGKILLed worker, and runs inside the flow."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed import faults
from recsys_embed.config import ExportConfig
from recsys_embed.serving.export import export_topk, read_export
from recsys_embed.store import save_csr, save_embeddings
from recsys_embed.types import Embeddings, IdMap
from tests.conftest import REPO, RETAIL

pytestmark = pytest.mark.slow

N_USERS, N_ITEMS, DIM = 1_500, 2_000, 64  # 64 factors: OpenBLAS's small-tile kernel differs in the last bit here
CFG = ExportConfig(k=20, chunk_users=128, rows_per_file=7_000, write_csv=True, deny_items=["1003", "1017"])


@pytest.fixture(scope="module")
def emb() -> Embeddings:
    rng = np.random.default_rng(7)
    return Embeddings(
        user_vectors=rng.standard_normal((N_USERS, DIM)).astype(np.float32),
        item_vectors=rng.standard_normal((N_ITEMS, DIM)).astype(np.float32),
        users=IdMap(pl.Series("id", [f"u{i:05d}" for i in range(N_USERS)])),
        items=IdMap(pl.Series("id", np.arange(1000, 1000 + N_ITEMS, dtype=np.int64))),
        model="als",
    )


@pytest.fixture(scope="module")
def seen() -> sp.csr_matrix:
    """1% of the matrix seen; the last 100 users are cold (no train items)."""
    m = sp.random(N_USERS, N_ITEMS, density=0.01, format="lil", random_state=3, dtype=np.float32)
    m[N_USERS - 100 :] = 0
    return sp.csr_matrix(m)


@pytest.fixture(scope="module")
def single(emb: Embeddings, seen: sp.csr_matrix, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process export (the reference): table folder; ``topk.csv`` beside it."""
    out = tmp_path_factory.mktemp("single")
    export_topk(emb, seen, CFG, out, "run-1")
    return out / "topk"


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The once-marker of the worker kill; present (so disarmed) until a test removes it."""
    p = tmp_path_factory.mktemp("fault") / "killed"
    p.write_text("disarmed", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def cluster(marker: Path) -> Iterator[Any]:
    """2 worker processes whose environment holds the kill point export-shard:1 (fires once the marker is gone)."""
    from distributed import LocalCluster

    from flows.distributed import close_quietly

    env = {faults.KILL_AT: "export-shard:1", faults.KILL_MARKER: str(marker)}
    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", env=env)
    yield c
    close_quietly(c)


def _assert_same_table(table: Path, reference: Path) -> None:
    """Row for row, value for value, in the same order; and the CSV byte for byte."""
    got, want = read_export(table), read_export(reference)
    assert got.schema == want.schema
    assert got.height == want.height > 0
    assert got.equals(want)
    assert got.sort("user_id", "rank").equals(want.sort("user_id", "rank"))
    assert got.select("user_id", "rank").is_duplicated().sum() == 0
    csv = table.with_name("topk.csv")
    assert csv.read_bytes() == reference.with_name("topk.csv").read_bytes()
    assert not list(table.parent.glob(".topk.*")), "staging folders left behind"


def test_sharded_export_on_dask_equals_single_process(
    emb: Embeddings, seen: sp.csr_matrix, single: Path, cluster: Any, tmp_path: Path
) -> None:
    """The library alone on Dask (no Prefect): plan here, shards on the workers, commit here."""
    from distributed import Client

    from recsys_embed.serving.shards import commit_topk_shards, export_topk_shard, plan_topk_shards

    plan = plan_topk_shards(N_USERS, CFG.chunk_users, 5, tmp_path / "topk")
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 384), (384, 768), (768, 1024), (1024, 1280),
                                                        (1280, 1500)]  # 12 chunks of 128 as 3+3+2+2+2  # fmt: skip
    with Client(cluster, set_as_default=False) as client:
        emb_f, seen_f = client.scatter(emb, broadcast=True), client.scatter(seen, broadcast=True)
        futures = [client.submit(export_topk_shard, emb_f, seen_f, CFG, plan, i, "run-1", pure=False)
                   for i in reversed(range(len(plan.shards)))]  # fmt: skip
        results = client.gather(futures)
        where = client.run(os.getpid)
    assert len(set(where.values())) == 2  # two worker processes
    res = commit_topk_shards(plan, CFG)
    assert res.rows == sum(r.rows for r in results) == read_export(single).height
    assert res.users == N_USERS
    _assert_same_table(tmp_path / "topk", single)


def test_existing_cluster_by_address(cluster: Any) -> None:
    """distributed.address: the run connects (nothing started or stopped) and sizes its shards by the workers."""
    from flows.distributed import dask_cluster
    from recsys_embed.config import DistributedConfig

    with dask_cluster(DistributedConfig(enabled=True, address=cluster.scheduler_address)) as found:
        assert found is not None and found.address == cluster.scheduler_address
        assert (found.n_workers, found.shards) == (2, 4)  # shards=0: 2 x the cluster's workers
    with dask_cluster(DistributedConfig(enabled=False, address=cluster.scheduler_address)) as off:
        assert off is None
    assert len(cluster.scheduler_info["workers"]) == 2  # still running


def test_killed_worker_shard_is_rerun_and_table_is_complete(
    prefect_harness: None, emb: Embeddings, seen: sp.csr_matrix, single: Path, cluster: Any, marker: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The Prefect subflow on the cluster; the worker running shard 1 is SIGKILLed once, after it wrote its rows
    and before its receipt, so the rerun must replace them (not add to them)."""
    from distributed import Client
    from prefect_dask import DaskTaskRunner

    from flows.distributed import sharded_export

    model = {"model": "als", "embeddings": str(save_embeddings(emb, tmp_path / "models" / "als"))}
    split = {"train": str(save_csr(seen, tmp_path / "train.npz"))}
    with Client(cluster, set_as_default=False) as client:
        before = set(client.run(os.getpid).values())
        marker.unlink()  # arm the fault
        t0 = time.perf_counter()
        runner: Any = DaskTaskRunner(address=cluster.scheduler_address)
        out = str(tmp_path / "exports")
        record = sharded_export.with_options(task_runner=runner)(model, split, CFG, 4, out, "run-1")
        assert faults.fired(marker) == "export-shard:1"  # the worker running shard 1 died...
        client.wait_for_workers(2, timeout=30)
        after = set(client.run(os.getpid).values())
    assert len(after - before) == 1  # ...and its nanny started a fresh process in its place
    assert record["topk_shards"] == 4
    assert record["topk_rows"] == read_export(single).height
    assert record["topk_users"] == N_USERS
    assert record["similar_rows"] == N_ITEMS * CFG.similar_k
    _assert_same_table(Path(record["topk"]), single)
    assert time.perf_counter() - t0 < 60


def _overrides(src: Path, out: Path) -> list[str]:
    return [
        f"ingest.source.path={src}",
        f"output_root={out}",
        "models.bpr.enabled=false",
        "models.two_tower.enabled=false",
        "models.als.iterations=4",
        "models.als.eval_every=0",
        "registry.enabled=false",
        "export.chunk_users=256",
        "models.ease.enabled=false",
        "tuning.enabled=false",
    ]


def test_flow_with_distributed_export_equals_single_process_run(
    prefect_harness: None, tmp_path: Path, mlflow_yml: Path
) -> None:
    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.io import is_complete_table

    src = tmp_path / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=40_000).write_parquet(src)
    config = str(REPO / "configs/retail.yaml")
    plain = embedding_pipeline(config, _overrides(src, tmp_path / "plain"), str(mlflow_yml))
    dist = embedding_pipeline(
        config,
        [*_overrides(src, tmp_path / "dist"), "distributed.enabled=true", "distributed.shards=3"],
        str(mlflow_yml),
    )
    assert set(dist["exports"]) == set(plain["exports"]) == {"popularity", "als"}
    assert dist["metrics"] == plain["metrics"]
    for name, e in dist["exports"].items():
        assert e["topk_shards"] == 3, name
        assert is_complete_table(e["topk"])
        got, want = read_export(e["topk"]), read_export(plain["exports"][name]["topk"])
        assert got.height == want.height == e["topk_rows"] > 0
        assert got.drop("run_id").equals(want.drop("run_id")), name  # run ids differ between the two runs
        assert (got["run_id"] == dist["mlflow"]["run_id"]).all()
        assert e.get("similar_rows") == plain["exports"][name].get("similar_rows")
