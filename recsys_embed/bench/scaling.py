"""Scaling: wall time and peak memory of each pipeline stage at several log sizes (``recsys-embed bench scaling``).

For each preset size (``generate.PRESETS``: tiny, 1m, 20m, 100m; generated once into ``data/synthetic/<size>``),
the stages of the end-to-end suite (``e2e_suite``: same ingest slice, temporal cutoff, ALS settings, top-k)
run one after another, chained through files in a temporary work folder, and **each in a fresh spawned
process** (``bench.memory.peak_memory``), so a stage's peak RSS is its own and not what an earlier stage left
behind. Per stage the table gives the stage's wall time (inside the child), the child's peak RSS (interpreter
and imports included) and the stage's growth over the RSS it started with.

Memory guard: before a size runs, its peak is estimated from the largest size measured so far in this run
(the largest per-event growth of any stage, times the new event count, plus the interpreter, with 25% to
spare; without an earlier size, ``FALLBACK_BYTES_PER_EVENT``). A size whose estimate exceeds 80% of the
memory available now is skipped with a message that names both figures; the 100m preset is meant for a
bigger machine than the 2-core, 23 GB box this was built on.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psutil

from recsys_embed.bench.e2e_suite import Setup
from recsys_embed.bench.memory import PeakMemory, peak_memory
from recsys_embed.data.generate import PRESETS
from recsys_embed.pipeline.records import IngestRecord, ModelRecord, SplitRecord

log = logging.getLogger(__name__)

STAGES = ("ingest", "split", "als_fit", "topk_export")
# Assumed peak growth per event when no smaller size was measured first (ingest holds the parsed frame, its
# deduplication and the event table; ALS holds the CSR, its transpose and an alpha-scaled copy).
FALLBACK_BYTES_PER_EVENT = 200
HEADROOM = 1.25  # estimate x this must fit ...
AVAILABLE_SHARE = 0.8  # ... in this share of the memory available when the size starts


# Stage bodies: module-level so the spawned child can unpickle them; they return small records only.


def _ingest(s: Setup, work: Path) -> IngestRecord:
    from recsys_embed.pipeline import stages

    return stages.run_ingest(s.ingest, work / "cache")


def _split(s: Setup, ingest: IngestRecord, work: Path) -> SplitRecord:
    from recsys_embed.pipeline import stages

    return stages.run_split(ingest, s.ingest, s.split, work / "split")


def _fit(s: Setup, split: SplitRecord, work: Path) -> ModelRecord:
    from recsys_embed.pipeline import stages

    record = stages.run_train("als", split, s.models, s.eval, work / "models")
    record.pop("history", None)
    return record


def _export(s: Setup, model: dict[str, Any], split: dict[str, Any], work: Path) -> dict[str, Any]:
    from recsys_embed.serving.export import export_topk
    from recsys_embed.store import load_csr, load_embeddings

    res = export_topk(load_embeddings(model["embeddings"]), load_csr(split["train"]), s.export, work / "exports", "b")
    return {"rows": res.rows, "users": res.users}


def _row(m: PeakMemory) -> dict[str, float]:
    return {
        "seconds": round(m.seconds, 3),
        "peak_rss_mb": round(m.peak_mb, 1),
        "stage_growth_mb": round(m.stage_bytes / 2**20, 1),
        "start_rss_mb": round(m.start_bytes / 2**20, 1),
    }


def estimate_peak_bytes(size: str, measured: list[dict[str, Any]]) -> tuple[int, str]:
    """(estimated peak RSS of the largest stage at ``size``, what it is based on); see the module docstring."""
    events = PRESETS[size].n_events
    if not measured:
        basis = f"{FALLBACK_BYTES_PER_EVENT} B/event assumed: no smaller size measured first in this command"
        return int(events * FALLBACK_BYTES_PER_EVENT * HEADROOM) + 300 * 2**20, basis
    last = max(measured, key=lambda r: r["events"])
    per_event = max(st["stage_growth_mb"] for st in last["stages"].values()) * 2**20 / last["events"]
    start = max(st["start_rss_mb"] for st in last["stages"].values()) * 2**20
    return int(start + per_event * events * HEADROOM), f"{per_event:.0f} B/event measured at {last['size']}"


def run_size(size: str, factors: int, iterations: int, k: int, data_dir: Path) -> dict[str, Any]:
    """All stages of one size, each in its own fresh process; returns the per-stage rows."""
    s = Setup(size, factors, iterations, k, data_dir)
    with tempfile.TemporaryDirectory(prefix=f"bench-scaling-{size}-") as tmp:
        work = Path(tmp)
        ingest = peak_memory(_ingest, s, work)
        split = peak_memory(_split, s, ingest.value, work)
        fit = peak_memory(_fit, s, split.value, work)
        export = peak_memory(_export, s, fit.value, split.value, work)
        events_kept = int(ingest.value["report"]["kept"])
    stages = {name: _row(m) for name, m in zip(STAGES, (ingest, split, fit, export), strict=True)}
    shape = [int(split.value["n_users"]), int(split.value["n_items"])]
    log.info("scaling %s: %s", size, {n: (r["seconds"], r["peak_rss_mb"]) for n, r in stages.items()})
    return {
        "size": size,
        "events": PRESETS[size].n_events,
        "events_kept": events_kept,
        "train_shape": shape,
        "topk_rows": int(export.value["rows"]),
        "stages": stages,
    }


def run(
    sizes: list[str],
    factors: int = 64,
    iterations: int = 15,
    k: int = 20,
    data_dir: Path = Path("data/synthetic"),
) -> dict[str, Any]:
    """Measure every size in ``sizes`` (ascending by events); returns ``{"sizes": [...], "skipped": [...]}``.

    Raises:
        ValueError: an unknown size (naming the known ones).
    """
    unknown = [x for x in sizes if x not in PRESETS]
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}; choose from {sorted(PRESETS, key=lambda n: PRESETS[n].n_events)}")
    measured: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for size in sorted(dict.fromkeys(sizes), key=lambda n: PRESETS[n].n_events):
        need, basis = estimate_peak_bytes(size, measured)
        available = psutil.virtual_memory().available
        free_disk = shutil.disk_usage(Path(data_dir).resolve().anchor).free
        if need > AVAILABLE_SHARE * available:
            why = (
                f"needs about {need / 2**30:.1f} GB at its largest stage ({basis}, +25%), "
                f"{available / 2**30:.1f} GB available; run it on a machine with more memory, or measure a "
                f"smaller size first in the same command (e.g. --sizes 20m,{size}) for a measured estimate"
            )
        elif free_disk < PRESETS[size].n_events * 30:  # generated log + the pipeline's copies, ~30 B per event
            why = f"needs about {PRESETS[size].n_events * 30 / 2**30:.1f} GB of disk, {free_disk / 2**30:.1f} GB free"
        else:
            measured.append(run_size(size, factors, iterations, k, data_dir))
            continue
        log.warning("scaling: skipping %s: %s", size, why)
        skipped.append({"size": size, "reason": why})
    return {
        "settings": {"factors": factors, "iterations": iterations, "k": k},
        "sizes": measured,
        "skipped": skipped,
    }


def format_scaling(result: dict[str, Any]) -> str:
    """The per-size, per-stage table, and how ingest's peak grew against the log."""
    head = f"{'size':<8}{'events':>13}  {'stage':<13}{'seconds':>9}{'peak RSS MB':>13}{'stage growth MB':>17}"
    lines = [head, "-" * len(head)]
    for r in result["sizes"]:
        for i, (name, st) in enumerate(r["stages"].items()):
            size, events = (r["size"], f"{r['events']:,}") if i == 0 else ("", "")
            lines.append(f"{size:<8}{events:>13}  {name:<13}{st['seconds']:>9.2f}{st['peak_rss_mb']:>13.1f}"
                         f"{st['stage_growth_mb']:>17.1f}")  # fmt: skip
    rows = result["sizes"]
    for a, b in itertools.pairwise(rows):
        ga, gb = a["stages"]["ingest"]["peak_rss_mb"], b["stages"]["ingest"]["peak_rss_mb"]
        lines.append(f"ingest peak {a['size']} -> {b['size']}: log x{b['events'] / a['events']:.1f}, "
                     f"peak RSS x{gb / ga:.2f}")  # fmt: skip
    for sk in result["skipped"]:
        lines.append(f"skipped {sk['size']}: {sk['reason']}")
    return "\n".join(lines)
