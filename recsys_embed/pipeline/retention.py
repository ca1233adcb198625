"""Retention: the store stays bounded (``recsys-embed gc``, and after every run with ``retention.after_run``).

What one pipeline run adds (measured on retail, ``configs/retail.yaml``): ~50 MB of MLflow run artifacts (the
models' embeddings, most of it EASE's item x item matrix, the table previews and plots), the registered version's
LoggedModel bundle when it registers one, and ~200 MB of local run folder (``<root>/runs/<run>``). ``collect``
keeps the newest ``keep_runs`` runs and ``keep_versions`` versions and prunes the rest:

- old runs (parent and model runs) lose their artifacts, not their record: params, metrics and tags stay, so
  the experiment's comparison across runs still shows them; each is tagged ``artifacts_pruned``;
- old local run folders are deleted;
- old registered versions are deleted with their LoggedModel and its bundle.

Never pruned, whatever the counts: the version an alias names (``champion``, ``challenger``) and the runs behind
it; the version ``champion.json`` names; the run whose tables ``current/`` points at, its MLflow runs and its
folder; the latest run (``latest.json``); the run the incremental state extends (``split_dir``); and any run
still RUNNING. The caller holds the output folder's run lock (``lock.run_lock``) so no run writes meanwhile.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_embed.config import MlflowSettings, PipelineConfig, RetentionConfig, registered_name
from recsys_embed.tracking.tracker import Tracker, artifact_bytes, delete_artifacts

log = logging.getLogger(__name__)

PRUNED_TAG = "artifacts_pruned"  # run tag: when its artifacts were deleted (the run's record stays)


@dataclass
class GcReport:
    """What ``collect`` pruned (or, with ``dry_run``, would prune).

    Attributes:
        runs: MLflow run ids whose artifacts were deleted (parents and their model runs).
        folders: local run folders deleted.
        versions: registered versions deleted (``<name> v<n>``).
        freed_bytes: bytes freed where countable (local stores); ``unknown`` counts the items that were not.
        kept: why each protected item was kept (``"v3: champion"``, ``"runs/2025...: current/"``).
        dry_run: nothing was deleted.
    """

    runs: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    unknown: int = 0
    kept: list[str] = field(default_factory=list)
    dry_run: bool = False

    def add(self, size: int | None) -> None:
        if size is None:
            self.unknown += 1
        else:
            self.freed_bytes += size

    def format(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        size = f"{self.freed_bytes / 2**20:,.1f} MB" + (f" (+{self.unknown} of unknown size)" if self.unknown else "")
        lines = [
            f"MLflow runs pruned (artifacts; params and metrics stay): {len(self.runs)}",
            f"local run folders deleted: {len(self.folders)}",
            f"registered versions deleted: {', '.join(self.versions) or 'none'}",
            f"{verb}: {size}",
        ]
        if self.kept:
            lines.append("kept whatever the counts: " + "; ".join(self.kept))
        return "\n".join(lines)


def collect(
    cfg: PipelineConfig, settings: MlflowSettings, retention: RetentionConfig | None = None, dry_run: bool = False,
    tracker: Tracker | None = None,
) -> GcReport:  # fmt: skip
    """Prune the MLflow runs, local run folders and registered versions of ``cfg``'s pipeline beyond
    ``retention`` (default ``cfg.retention``); see the module doc for what is never pruned.

    Call it holding ``lock.run_lock(<output_root>/<name>)`` (the CLI's ``gc`` does; the flow calls it inside its
    own lock). Runs of other pipelines or output folders on the same store are never touched.
    """
    keep = retention or cfg.retention
    root = (Path(cfg.output_root) / cfg.name).resolve()
    tracker = tracker or Tracker(settings)
    report = GcReport(dry_run=dry_run)
    protected_runs, protected_dirs = _protected_local(root, cfg, report)

    # registered versions: aliased ones, the one champion.json names and the newest keep_versions stay
    name = registered_name(cfg, settings)
    from recsys_embed.serving.registry import delete_version, list_versions

    versions, aliases = list_versions(tracker.settings, name)
    by_version = {v: a for a, v in aliases.items()}
    pointer = _read_json(root / "champion.json")
    pinned = str(pointer.get("version")) if pointer and pointer.get("registered_model") == name else None
    spare = keep.keep_versions
    for mv in versions:
        v = str(mv.version)
        why = by_version.get(v) or ("champion.json" if v == pinned else None)
        if why is None and spare > 0:
            spare -= 1
            why = "recent"
        if why is not None:
            protected_runs |= {mv.run_id, mv.tags.get("pipeline_run_id")} - {None}
            if why != "recent":
                report.kept.append(f"{name} v{v}: {why}")
            continue
        report.add(delete_version(tracker.settings, name, mv, dry_run))
        report.versions.append(f"v{v}")

    # MLflow runs: the newest keep_runs pipeline runs (with their model runs) keep their artifacts
    scope = {"pipeline": cfg.name, "output_root": str(root)}
    runs = tracker.pipeline_runs(scope)
    parents = [r for r in runs if not r.data.tags.get("mlflow.parentRunId")]
    kept_parents = {r.info.run_id for r in parents[: keep.keep_runs]}
    family = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") or r.info.run_id for r in runs}
    protected_parents = {family.get(rid, rid) for rid in protected_runs}
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for r in runs:
        rid, parent = r.info.run_id, family[r.info.run_id]
        if parent in kept_parents or parent in protected_parents or r.data.tags.get(PRUNED_TAG):
            continue
        if r.info.status == "RUNNING":  # a live run (none under the lock) or one a kill left: not ours to prune
            continue
        report.add(delete_artifacts(r.info.artifact_uri, dry_run))
        if not dry_run:
            tracker.set_tags(rid, {PRUNED_TAG: stamp})
        report.runs.append(rid)

    # local run folders: the newest keep_runs stay, and every protected one
    runs_dir = root / "runs"
    folders = sorted((p for p in runs_dir.iterdir() if p.is_dir()), reverse=True) if runs_dir.is_dir() else []
    for folder in folders[keep.keep_runs :]:
        if folder.resolve() in protected_dirs:
            continue
        report.add(artifact_bytes(str(folder)))
        if not dry_run:
            shutil.rmtree(folder)
        report.folders.append(str(folder))
    log.info("gc %s: %d run(s) pruned, %d folder(s) and %d version(s) deleted, %.1f MB %s", cfg.name,
             len(report.runs), len(report.folders), len(report.versions), report.freed_bytes / 2**20,
             "would be freed" if dry_run else "freed")  # fmt: skip
    return report


def _protected_local(root: Path, cfg: PipelineConfig, report: GcReport) -> tuple[set[str], set[Path]]:
    """(MLflow run ids, local run folders) that must stay: what ``current/`` and ``champion.json`` point at, the
    latest run and the run the incremental state extends."""
    runs_dir = root / "runs"
    pointers: list[tuple[str, Path]] = []
    link = root / "current"
    if link.exists():
        pointers.append(("current/", link.resolve()))
    champion = _read_json(root / "champion.json")
    if champion and champion.get("run_dir"):
        pointers.append(("champion.json", Path(champion["run_dir"])))
    latest = _read_json(root / "latest.json")
    run_ids: set[str] = set()
    if latest:
        pointers.append(("latest.json", Path(latest.get("run_dir", ""))))
        run_ids.add(str(latest.get("run_id")))
    state = _read_json(root / cfg.incremental.state_file)
    if state and state.get("split_dir"):
        pointers.append(("incremental state", Path(state["split_dir"])))
    dirs: dict[Path, list[str]] = {}
    for why, path in pointers:
        run_dir = _run_folder(runs_dir, path)
        if run_dir is None:
            continue
        dirs.setdefault(run_dir, []).append(why)
    for run_dir, whys in dirs.items():
        report.kept.append(f"runs/{run_dir.name}: {', '.join(whys)}")
        summary = _read_json(run_dir / "summary.json") or {}
        ml = summary.get("mlflow") or {}
        run_ids |= {str(ml["run_id"])} if ml.get("run_id") else set()
        run_ids |= {str(v) for v in (ml.get("model_runs") or {}).values()}
    return run_ids, set(dirs)


def _run_folder(runs_dir: Path, path: Path) -> Path | None:
    """The ``runs/<run>`` folder that ``path`` lies in, or None."""
    try:
        rel = path.resolve().relative_to(runs_dir.resolve())
    except ValueError:
        return None
    return (runs_dir / rel.parts[0]).resolve() if rel.parts else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def collect_after_run(cfg: PipelineConfig, tracker: Tracker) -> GcReport | None:
    """``collect`` at the end of a successful run (``retention.after_run``; the run still holds its lock). Pruning
    is housekeeping: a failure is a warning naming the fix, never a failed run."""
    if not cfg.retention.after_run:
        return None
    try:
        return collect(cfg, tracker.settings, tracker=tracker)
    except Exception as e:
        log.warning("gc after the run failed (%s); nothing it had not finished was lost; run `recsys-embed gc` "
                    "to retry, or set retention.after_run=false", str(e).splitlines()[0] if str(e) else e)  # fmt: skip
        return None
