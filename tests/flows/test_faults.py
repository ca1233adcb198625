"""Kill and resume (issue 7): the flow is SIGKILLed at every stage boundary, and re-running the same command
completes, reuses what the killed run committed, and ends with outputs identical to an uninterrupted run;
at no point does a reader see a partial table.

How: ``recsys_embed.faults`` arms every kill point at once (``$RECSYS_EMBED_KILL_AT`` lists them) with a
marker folder (each point fires once). The *same command in the same environment* is then run again and
again, the way a supervisor restarts a job that keeps being preempted: run 1 dies at the first point, run 2
resumes and dies at the second, ..., the last run completes. After each kill the output folder is inspected
(only committed tables visible, the killed run never published); after each re-run the suite checks that the
killed run's committed stages were reused (their cache folders untouched, the new run's copies hard links to
them), that everything the re-run committed equals the uninterrupted reference, and that the killed run's
MLflow runs were marked KILLED (scoped: a live run of another output folder is left alone).

Everything is real: the CLI in a subprocess, one Prefect test server for all of them (PREFECT_API_URL), one
MLflow SQLite store, a 20k-row slice of the retail log, CPU (where runs with one seed are identical).
``pytest -m faults`` prints the table stage -> resumed / identical / no partial output / MLflow closed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from recsys_embed import faults
from recsys_embed.io import SUCCESS_MARKER, is_complete_table, read_table
from recsys_embed.store import load_embeddings
from tests.conftest import REPO, RETAIL

pytestmark = [pytest.mark.faults, pytest.mark.slow]

N_ROWS = 20_000
# In pipeline order: each run of the chain dies at the next one. Model points name ALS (the first factor model)
# and the two-tower model (Lightning); bpr is off to keep the suite inside CI's time budget.
# Evaluation (train, validate, test each model), then the production refit (the all-events data, the refits:
# their train points already fired), the shipped exports, the model runs' logging, the registry (the version
# registered with its decision, then the alias moved), the published pointers (champion.json written, current/ not
# yet) and the database.
POINTS = ["ingest", "split", "train:als", "evaluate:als", "train:two_tower", "full", "export:als", "log:als",
          "register", "register:alias", "publish:champion", "db-export"]  # fmt: skip
# Columns that say which run wrote a row: they differ between any two runs by design (a new MLflow run id, the
# registry version of that run), so tables are compared without them; every other column must be equal.
PROVENANCE = ("run_id", "model_version")
# Hidden names of uncommitted writes (recsys_embed.io): staging folders, replaced tables, temporary files.
LEFTOVER = re.compile(r"^\..+\.(staging|old|tmp)-[0-9a-f]{8}$")
RUN_TIMEOUT_S = 240


def _overrides(src: Path, out: Path) -> list[str]:
    return [
        f"ingest.source.path={src}",
        f"output_root={out}",
        "models.bpr.enabled=false",
        "models.als.iterations=4",
        "models.als.eval_every=2",
        "models.two_tower.enabled=true",  # off in configs/retail.yaml; its train point is in the chain
        "models.two_tower.max_epochs=1",
        # CPU even where CUDA exists: GPU kernels (and bf16) are not bit-reproducible, so "identical" needs CPU
        "models.two_tower.accelerator=cpu",
        "models.als.use_gpu=false",
        "export.database.enabled=true",  # SQLite under the output folder: the db-export point
        "export.models=[best, als, popularity]",  # ALS ships whichever model selection picks: the export:als point
        "models.ease.enabled=false",
        "tuning.enabled=false",  # killed and resumed searches: tests/models/test_tuning.py
        # each output folder its own registered model: the chain registers (and is killed around) its own version
        # whatever the references registered, and its champion is judged like the first reference's
        f"registry.name=faults-{out.name}",
    ]


@dataclass
class Env:
    tmp: Path
    src: Path
    mlflow_yml: Path
    tracking_uri: str
    env: dict[str, str]

    def run(self, out: Path, log_name: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``recsys-embed run`` on the slice into ``out``, in its own process (stdout/stderr kept as files)."""
        cmd = [sys.executable, "-m", "recsys_embed.cli", "--mlflow-config", str(self.mlflow_yml), "run",
               "--config", str(REPO / "configs/retail.yaml")]  # fmt: skip
        for o in _overrides(self.src, out):
            cmd += ["--set", o]
        res = subprocess.run(cmd, env={**self.env, **(extra_env or {})}, cwd=self.tmp, capture_output=True,
                             text=True, timeout=RUN_TIMEOUT_S, check=False)  # fmt: skip
        (self.tmp / f"{log_name}.stdout").write_text(res.stdout)
        (self.tmp / f"{log_name}.stderr").write_text(res.stderr)
        return res


@pytest.fixture(scope="module")
def env(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Env:
    from prefect.settings import PREFECT_API_URL

    tmp = tmp_path_factory.mktemp("faults")
    src = tmp / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=N_ROWS).write_parquet(src)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    yml = tmp / "mlflow.yml"
    yml.write_text(f"tracking_uri: {uri}\nartifact_location: {tmp / 'mlartifacts'}\nexperiment_name: faults\n")
    api_url = PREFECT_API_URL.value()
    assert api_url, "the Prefect test harness exposes no API URL"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RECSYS_EMBED_"))}
    child_env.update(
        PREFECT_API_URL=api_url,  # the session's test server: no ~10 s ephemeral server per process
        PREFECT_LOCAL_STORAGE_PATH=str(tmp / "prefect-results"),  # persisted task results stay in this test
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MPLBACKEND="Agg",
        PYTHONPATH=str(REPO),
    )
    return Env(tmp, src, yml, uri, child_env)


@pytest.fixture(scope="module")
def references(env: Env) -> tuple[Path, Path]:
    """Two uninterrupted runs with the same seed, each in a fresh output folder (nothing cached)."""
    roots = []
    for i in (1, 2):
        out = env.tmp / f"reference-{i}"
        res = env.run(out, f"reference-{i}")
        assert res.returncode == 0, res.stderr[-4000:]
        roots.append(out / "retail")
    return roots[0], roots[1]


# ----------------------------------------------------------------------------------------------------------
# Reading what a reader would see


def _manifest(root: Path) -> dict[str, Any]:
    """The run ``latest.json`` publishes: what readers (recommend/similar, people) are pointed at."""
    latest = json.loads((root / "latest.json").read_text())
    return dict(json.loads((Path(latest["run_dir"]) / "summary.json").read_text()))


def _table(path: str | Path) -> pl.DataFrame:
    """A committed table as data: provenance columns dropped, rows in a canonical order."""
    t = read_table(path)
    t = t.drop([c for c in PROVENANCE if c in t.columns])
    return t.sort(t.columns[:2])  # (user_id | item_id, rank): the key of both tables


def _db_table(db: Path, table: str) -> pl.DataFrame:
    with sqlite3.connect(db) as conn:
        t = pl.read_database(f"SELECT * FROM {table}", conn)
    t = t.drop([c for c in PROVENANCE if c in t.columns])
    return t.sort(t.columns[:2])


def _same_embeddings(a: Path, b: Path) -> bool:
    ea, eb = load_embeddings(a), load_embeddings(b)
    return (
        ea.users.ids.equals(eb.users.ids)
        and ea.items.ids.equals(eb.items.ids)
        and np.array_equal(ea.user_vectors, eb.user_vectors)
        and np.array_equal(ea.item_vectors, eb.item_vectors)
    )


def _differing_files(a: Path, b: Path) -> list[str]:
    """Data files of two stage folders that differ as data (Parquet frames, sparse matrices); records (paths,
    timings) and the two-tower encoder's files (covered by its embeddings) are not compared."""
    from recsys_embed.store import load_csr

    out = []
    names = sorted(f.name for f in a.iterdir() if f.suffix in (".parquet", ".npz"))
    if names != sorted(f.name for f in b.iterdir() if f.suffix in (".parquet", ".npz")):
        return [f"file list {names}"]
    for name in names:
        if name.endswith(".parquet"):
            same = pl.read_parquet(a / name).equals(pl.read_parquet(b / name))
        else:
            x, y = load_csr(a / name), load_csr(b / name)
            same = x.shape == y.shape and x.dtype == y.dtype and (x != y).nnz == 0
        if not same:
            out.append(name)
    return out


def _compare_committed(root: Path, run_dir: Path | None, ref: Path) -> tuple[list[str], list[str]]:
    """Compare everything committed so far under ``root`` (cached models, ``run_dir``'s models and export
    tables, the database tables) with the reference run; returns (what was compared, what differed)."""
    ref_manifest = _manifest(ref)
    ref_run = Path(ref_manifest["run_dir"])
    compared, differ = [], []
    for folder in sorted((root / "cache").glob("*")):
        if folder.name.startswith(".") or not is_complete_table(folder):
            continue
        stage = re.sub(r"-[0-9a-f]{16}$", "", folder.name)
        compared.append(f"cache:{stage}")
        # content-addressed: the same log, config and seed must give the reference's key
        twin = ref / "cache" / folder.name
        if not twin.is_dir():
            differ.append(f"{folder.name}: the uninterrupted run has no such cache key")
        elif stage.startswith(("train-", "refit-")) and not _same_embeddings(folder, twin):
            differ.append(f"embeddings of {stage}")
        else:
            differ += [f"{folder.name}/{f}" for f in _differing_files(folder, twin)]
    if run_dir is not None:
        for folder in sorted((run_dir / "models").glob("*")):
            if folder.name.endswith("_encoder") or not is_complete_table(folder):
                continue
            compared.append(f"models/{folder.name}")
            if not _same_embeddings(folder, ref_run / "models" / folder.name):
                differ.append(f"embeddings in {folder}")
        for table in sorted((run_dir / "exports").glob("*/*")):
            if not table.is_dir() or table.name.startswith(".") or not is_complete_table(table):
                continue
            rel = table.relative_to(run_dir)
            compared.append(str(rel))
            if not _table(table).equals(_table(ref_run / rel)):
                differ.append(f"table {rel}")
    db, ref_db = root / "recommendations.db", ref / "recommendations.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for t in tables:
            compared.append(f"db:{t}")
            if not _db_table(db, t).equals(_db_table(ref_db, t)):
                differ.append(f"database table {t}")
    return compared, differ


def _visible_problems(root: Path, killed_runs: set[str]) -> tuple[list[str], list[str]]:
    """What a reader could wrongly take for output: (problems, hidden leftovers seen).

    Every non-hidden folder where a table lives (``cache/*``, ``runs/*/split``, ``runs/*/models/*``,
    ``runs/*/exports/*/*``) must be committed (``_SUCCESS``) and readable; everything hidden must be an
    uncommitted write's name (never read: readers and the documented globs only open committed folders);
    ``latest.json`` must point at a finished run, never at a killed one; a killed run publishes no summary.
    """
    problems, leftovers = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if name.startswith(".") and name != ".run.lock":
                if LEFTOVER.match(name):
                    leftovers.append(str(Path(dirpath, name).relative_to(root)))
                else:
                    problems.append(f"unexpected hidden entry {Path(dirpath, name)}")
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for t in _table_folders(root):
        if not is_complete_table(t):
            problems.append(f"{t.relative_to(root)} is visible without {SUCCESS_MARKER}")
        elif "exports" in t.parts:
            read_table(t)  # a committed table reads whole
    if (root / "latest.json").exists():
        latest = Path(json.loads((root / "latest.json").read_text())["run_dir"])
        if latest.name in killed_runs or not (latest / "summary.json").exists():
            problems.append(f"latest.json points at an unfinished run {latest.name}")
    for run in killed_runs:
        if (root / "runs" / run / "summary.json").exists():
            problems.append(f"killed run {run} published a summary")
    db = root / "recommendations.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            problems += [f"database staging table {n} visible" for n in names if "__" in n]
            for n in names:  # a swapped-in table holds one run's rows
                runs = conn.execute(f"SELECT DISTINCT run_id FROM {n}").fetchall()
                if len(runs) != 1:
                    problems.append(f"database table {n} holds rows of runs {runs}")
    return problems, leftovers


def _table_folders(root: Path) -> list[Path]:
    """Where tables live: every one a reader may open must be committed (hidden names are never opened)."""
    found = [*root.glob("cache/*"), *root.glob("runs/*/split"), *root.glob("runs/*/models/*"),
             *root.glob("runs/*/exports/*/*")]  # fmt: skip
    return [t for t in found if not t.name.startswith(".") and t.suffix != ".csv"]


class Watcher(threading.Thread):
    """A reader polling the output folder while a run writes (and is killed): at no instant may a table folder
    be visible without ``_SUCCESS``, nor ``latest.json`` point at a run without its summary."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.halt = threading.Event()
        self.problems: set[str] = set()
        self.scans = 0

    def run(self) -> None:
        while not self.halt.is_set():
            for t in _table_folders(self.root):
                if t.is_dir() and not is_complete_table(t) and t.exists():
                    self.problems.add(f"{t.relative_to(self.root)} seen without {SUCCESS_MARKER} while running")
            latest = self.root / "latest.json"
            if latest.exists():
                run_dir = Path(json.loads(latest.read_text())["run_dir"])
                if not (run_dir / "summary.json").exists():
                    self.problems.add(f"latest.json seen pointing at unfinished {run_dir.name}")
            self.scans += 1
            self.halt.wait(0.05)

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join()


def _cache_state(root: Path) -> dict[str, tuple[int, int]]:
    """Committed cache folders -> (inode, mtime_ns) of their record.json: a recomputed stage would change it."""
    out = {}
    for folder in sorted((root / "cache").glob("*")):
        if is_complete_table(folder):
            st = (folder / "record.json").stat()
            out[folder.name] = (st.st_ino, st.st_mtime_ns)
    return out


def _reuse_problems(root: Path, before: dict[str, tuple[int, int]], run_dir: Path | None) -> list[str]:
    """The re-run must reuse every stage the killed run committed: the cache folders stay as they were (not
    rewritten, no second folder of the same stage), and the new run's split/models are hard links to them."""
    problems = []
    after = _cache_state(root)
    for name, st in before.items():
        if after.get(name) != st:
            problems.append(f"cache/{name} was recomputed")
    kinds = [re.sub(r"-[0-9a-f]{16}$", "", n) for n in after]
    problems += [f"two cache folders for {k}" for k in set(kinds) if kinds.count(k) > 1]
    if run_dir is None:
        return problems
    for name in before:
        copy = None
        if name.startswith("split-"):
            copy, file = run_dir / "split", "train.npz"
        elif name.startswith("train-"):
            model = json.loads((root / "cache" / name / "record.json").read_text())["model"]
            copy, file = run_dir / "models" / model, "user_embeddings.parquet"
        if (
            copy is not None
            and (copy / file).exists()
            and (copy / file).stat().st_ino != (root / "cache" / name / file).stat().st_ino
        ):
            problems.append(f"{copy.relative_to(root)} is not the cached {name}")
    return problems


def _runs(client: Any, experiment_id: str, root: Path) -> list[Any]:
    """The parent MLflow runs of pipeline runs on ``root``, oldest first."""
    runs = client.search_runs([experiment_id], "", max_results=1000)
    mine = [r for r in runs if r.data.tags.get("output_root") == str(root.resolve())]
    return sorted((r for r in mine if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)


@dataclass
class Row:
    point: str
    resumed: list[str] = field(default_factory=list)  # problems; empty = fine
    identical: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    mlflow: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        return ["yes" if not x else "NO: " + "; ".join(x) for x in (self.resumed, self.identical, self.partial,
                                                                    self.mlflow)]  # fmt: skip


def _print_table(rows: list[Row], seconds: list[float]) -> None:
    head = ["stage killed", "resumed correctly", "outputs identical", "no partial output visible",
            "killed MLflow runs KILLED"]  # fmt: skip
    body = [[r.point, *r.cells()] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print("\n\nKill-and-resume fault suite (SIGKILL at each point, then the same command again):")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print(line)
    for r, b in zip(rows, body, strict=True):
        print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + (f"   ({'; '.join(r.notes)})"
                                                                              if r.notes else ""))  # fmt: skip
    print(f"{len(seconds)} runs of the same command, {sum(seconds):.0f} s in all "
          f"({', '.join(f'{s:.0f}' for s in seconds)} s)\n")  # fmt: skip


def _champion_problems(
    client: Any, root: Path, ref: Path, manifest: dict[str, Any], parents: set[str]
) -> list[str]:
    """The chain must end with the champion an uninterrupted run ends with: its version registered once (however
    many runs were killed around the registry) and holding the ``champion`` alias like the reference run's, its
    decision applied, ``champion.json`` naming it, ``current`` pointing at the tables it names, and those tables
    equal to the reference champion's."""
    from recsys_embed.serving.registry import DECISION_RECORD

    problems = []
    reg, ref_reg = manifest["registry"], _manifest(ref)["registry"]
    if reg["alias"] != ref_reg["alias"]:
        problems.append(f"the chain's version is {reg['alias']}, the uninterrupted run's {ref_reg['alias']}")
    versions = [v for v in client.search_model_versions(f"name = '{reg['name']}'")
                if v.tags.get("pipeline_run_id") in parents]  # fmt: skip
    if [str(v.version) for v in versions] != [reg["version"]]:
        problems.append(f"the chain registered versions {[str(v.version) for v in versions]}, not once")
    champion = client.get_model_version_by_alias(reg["name"], "champion")
    if str(champion.version) != reg["version"]:
        problems.append(f"the champion alias is on v{champion.version}, not the chain's v{reg['version']}")
    record = json.loads(champion.tags.get(DECISION_RECORD) or "{}")
    if not record.get("applied"):
        problems.append(f"the champion's decision was never marked applied: {record}")
    pointer = json.loads((root / "champion.json").read_text())
    ref_pointer = json.loads((ref / "champion.json").read_text())
    if str(pointer.get("version")) != reg["version"]:
        problems.append(f"champion.json names v{pointer.get('version')}, the alias v{reg['version']}")
    if not (root / "current").is_symlink() or (root / "current").resolve() != Path(pointer["topk_path"]).parent:
        problems.append("current/ does not point at the tables champion.json names")
    elif not _table(root / "current" / "topk").equals(_table(ref_pointer["topk_path"])):
        problems.append("the champion's top-k differs from the uninterrupted run's")
    return problems


def test_kill_at_every_stage_and_resume(
    env: Env, references: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    ref = references[0]
    out = env.tmp / "chain"
    root = out / "retail"
    markers = env.tmp / "fired"
    markers.mkdir()
    chaos = {faults.KILL_AT: ",".join(POINTS), faults.KILL_MARKER: str(markers)}
    client = MlflowClient(env.tracking_uri)
    experiment_id = client.get_experiment_by_name("faults").experiment_id
    # A live run of the same pipeline on another output folder: no run of ours may touch it.
    decoy = client.create_run(
        experiment_id,
        run_name="decoy",
        tags={"pipeline": "retail", "output_root": str((env.tmp / "elsewhere").resolve())},
    )

    rows: list[Row] = []
    seconds: list[float] = []
    killed_runs: set[str] = set()
    prev_leftovers: list[str] = []
    scans = 0
    final_watch: list[str] = []
    completed = False
    for attempt in range(len(POINTS) + 1):
        before_cache = _cache_state(root) if root.exists() else {}
        before_runs = {r.info.run_name for r in _runs(client, experiment_id, root)}
        before_fired = len(faults.fired_points(markers))
        t0 = time.perf_counter()
        with Watcher(root) as watcher:
            res = env.run(out, f"chain-{attempt}", chaos)
        scans += watcher.scans
        seconds.append(time.perf_counter() - t0)
        # this process's run: its MLflow parent run is named like its folder (which a kill at ingest never made)
        new_runs = sorted({r.info.run_name for r in _runs(client, experiment_id, root)} - before_runs)
        run_dir = root / "runs" / new_runs[-1] if new_runs else None
        fired = faults.fired_points(markers)[before_fired:]

        if rows:  # this run is the re-run of the previous kill: did it resume it?
            prev = rows[-1]
            passed = res.returncode == 0 or (res.returncode == -signal.SIGKILL and fired
                                             and POINTS.index(fired[0]) > POINTS.index(prev.point))  # fmt: skip
            if not passed:
                prev.resumed.append(f"re-run ended with rc {res.returncode} (fired {fired}): {res.stderr[-2000:]}")
            prev.resumed += _reuse_problems(root, before_cache, run_dir)
            reused = [n.split("-")[0] + ("" if not n.startswith("train-") else ":" + n.split("-")[1])
                      for n in before_cache]  # fmt: skip
            prev.notes.append("reused " + (", ".join(reused) if reused else "nothing (nothing was committed)"))
            compared, differ = _compare_committed(root, run_dir, ref)
            prev.identical += differ
            if not compared:
                prev.identical.append("nothing committed to compare")
            prev.partial += [f"leftover {x} of the kill survived the re-run" for x in prev_leftovers
                             if (root / x).exists()]  # fmt: skip
            stale = [r for r in _runs(client, experiment_id, root) if r.info.run_name in killed_runs]
            prev.mlflow += [f"{r.info.run_name} still {r.info.status}" for r in stale if r.info.status != "KILLED"]
            children = client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
            prev.mlflow += [f"nested run {c.info.run_name} of a killed run still RUNNING" for c in children
                            if c.data.tags.get("output_root") == str(root.resolve())
                            and c.data.tags.get("mlflow.parentRunId") in {r.info.run_id for r in stale}]  # fmt: skip
            marked = {r.info.run_id for r in stale if r.info.run_name == sorted(killed_runs)[-1]}
            if not all(m in res.stderr for m in marked):
                prev.mlflow.append("the re-run did not log the runs it marked KILLED")

        if res.returncode == 0:
            completed = True
            final_watch = sorted(watcher.problems)
            break
        point = fired[0] if fired else "?"
        row = Row(point)
        rows.append(row)
        row.partial += sorted(watcher.problems)  # seen by the concurrent reader up to the kill
        expected = POINTS[len(rows) - 1]
        if res.returncode != -signal.SIGKILL or point != expected:
            row.resumed.append(f"expected a SIGKILL at {expected}, got rc {res.returncode} at {fired}: "
                               f"{res.stderr[-3000:]}")  # fmt: skip
            break
        assert run_dir is not None
        killed_runs.add(run_dir.name)
        # right after the kill, before anything cleans up: only committed tables are visible
        problems, prev_leftovers = _visible_problems(root, killed_runs)
        row.partial += problems
        leftovers = prev_leftovers
        row.notes.append(f"{len(leftovers)} hidden leftover(s) at kill" if leftovers else "no leftovers")
        # the killed run's MLflow run is RUNNING now (a killed process cannot say otherwise)
        if not any(r.info.status == "RUNNING" and r.info.run_name == run_dir.name
                   for r in _runs(client, experiment_id, root)):  # fmt: skip
            row.mlflow.append("the killed run left no RUNNING MLflow run (nothing to check)")

    final: list[str] = []
    if completed:
        final += final_watch
        manifest = _manifest(root)
        run_dir = Path(manifest["run_dir"])
        ref_manifest = _manifest(ref)
        if manifest["metrics"] != ref_manifest["metrics"]:
            final.append(f"metrics differ: {manifest['metrics']} vs {ref_manifest['metrics']}")
        if sorted(manifest["exports"]) != sorted(ref_manifest["exports"]):
            final.append("a different set of models was exported")
        compared, differ = _compare_committed(root, run_dir, ref)
        final += differ
        wanted = {f"exports/{m}/topk" for m in ref_manifest["exports"]} | {"db:recsys_topk", "db:recsys_similar_items"}
        final += [f"{w} was not compared" for w in sorted(wanted - set(compared))]
        if not all(manifest["reused"]["models"].values()) or not manifest["reused"]["split"]:
            final.append(f"the last run retrained something: {manifest['reused']}")
        problems, leftovers = _visible_problems(root, killed_runs)
        final += problems + [f"leftover {x} survived the re-runs" for x in leftovers]
        parents = _runs(client, experiment_id, root)
        statuses = [r.info.status for r in parents]
        if statuses != ["KILLED"] * len(POINTS) + ["FINISHED"]:
            final.append(f"MLflow parent runs ended {statuses}")
        final += _champion_problems(client, root, ref, manifest, {r.info.run_id for r in parents})
    if client.get_run(decoy.info.run_id).info.status != "RUNNING":
        final.append("the live run of another output folder was marked")
    client.set_terminated(decoy.info.run_id)

    with capsys.disabled():
        _print_table(rows, seconds)
        print(f"a concurrent reader scanned the output folder {scans} times while the runs wrote and died")
        print("final run: " + ("outputs identical to the uninterrupted run, nothing left over" if completed
                               and not final else "; ".join(final) or "never completed"))  # fmt: skip

    assert completed, f"the same command never completed after {len(rows)} kills"
    assert [r.point for r in rows] == POINTS
    bad = {r.point: r.cells() for r in rows if any(c != "yes" for c in r.cells())}
    assert not bad, bad
    assert not final, final


def test_two_uninterrupted_runs_are_identical(references: tuple[Path, Path]) -> None:
    """Determinism on CPU: the same seed in a fresh output folder gives the same tables (as data, provenance
    excluded), the same embeddings (bit for bit) and the same metrics."""
    a, b = (_manifest(r) for r in references)
    assert a["metrics"] == b["metrics"]
    assert sorted(a["exports"]) == sorted(b["exports"]) and {"als", "popularity"} <= set(a["exports"])
    assert not a["reused"]["split"] and not any(b["reused"]["models"].values())  # b recomputed everything
    for model, e in a["exports"].items():
        f = b["exports"][model]
        assert _table(e["topk"]).equals(_table(f["topk"])), model
        assert _table(e["topk"]).height == e["topk_rows"] > 0
        if e.get("similar_items"):
            assert _table(e["similar_items"]).equals(_table(f["similar_items"])), model
        assert _same_embeddings(Path(e["embeddings"]), Path(f["embeddings"])), model
    dbs = [r / "recommendations.db" for r in references]
    for t in ("recsys_topk", "recsys_similar_items"):
        assert _db_table(dbs[0], t).equals(_db_table(dbs[1], t)), t
