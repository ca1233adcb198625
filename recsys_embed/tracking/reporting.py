"""What a pipeline run records: MLflow logging of each model and of the run, the manifest, and summaries.

Pure formatting lives here next to the logging calls so the flow stays a wiring diagram.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_embed.config import PipelineConfig, flatten
from recsys_embed.faults import checkpoint
from recsys_embed.io import read_table, write_json_atomic, write_parquet_atomic
from recsys_embed.store import load_csr, load_embeddings
from recsys_embed.tracking import plots
from recsys_embed.tracking.tracker import Tracker, redact_text, redact_uri

log = logging.getLogger(__name__)

PREVIEW_ROWS = 1000  # rows of each recommendation table shown in the MLflow UI
FULL_TABLE_ARTIFACT_MAX_BYTES = 200 * 2**20  # larger tables are referenced by location only


def config_params(cfg: PipelineConfig, sep: str = ".") -> dict[str, Any]:
    """The flattened config as MLflow params (secrets in URIs redacted)."""
    flat = flatten(cfg.model_dump(mode="json"), sep)
    return {k: (redact_uri(v) if isinstance(v, str) and "://" in v else v) for k, v in flat.items()}


def log_run_inputs(
    tracker: Tracker,
    run_id: str,
    cfg: PipelineConfig,
    ingest: Mapping[str, Any],
    split: Mapping[str, Any],
    commit: str | None,
) -> None:
    """Params, dataset, row accounting and quarantine summary on the parent run."""
    tracker.log_params(run_id, config_params(cfg, tracker.settings.flatten_sep))
    tracker.set_tags(
        run_id, {"data_fingerprint": ingest["fingerprint"], "mlflow.source.git.commit": commit or "unknown"}
    )
    tracker.log_dataset(
        run_id, ingest["events"], source=cfg.ingest.source.path, fingerprint=ingest["fingerprint"], name=cfg.name
    )
    report = split["report"]
    from recsys_embed.types import RowReport

    tracker.log_metrics(run_id, RowReport.from_dict(report).metrics("rows"))
    tracker.log_dict(run_id, report, "ingest/report.json")
    tracker.log_dict(
        run_id,
        {
            "split": split["split"],
            "val": split.get("val_counts"),
            "test": split.get("test_counts"),
            "test_cold_users": split.get("test_cold_users"),
        },
        "ingest/split.json",
    )
    tracker.log_dict(
        run_id,
        {"rows_by_reason": ingest.get("quarantine_summary", []), "file": ingest["quarantine"]},
        "ingest/quarantine_summary.json",
    )


TEST_PREFIX, VAL_PREFIX = "test.", "val."  # metric names say their window: test.ndcg_at_20, val.ndcg_at_20


def model_metrics(test: Mapping[str, float], val: Mapping[str, float] | None = None) -> dict[str, float]:
    """A model run's held-out metrics under the names they are logged with: ``test.<metric>`` (the test window,
    reported only) and ``val.<metric>`` (the validation window, what selection reads)."""
    out = {f"{TEST_PREFIX}{k}": float(v) for k, v in test.items()}
    out.update({f"{VAL_PREFIX}{k}": float(v) for k, v in (val or {}).items()})
    return out


def log_model_run(
    tracker: Tracker,
    run_id: str,
    model: Mapping[str, Any],
    metrics: dict[str, float],
    export: Mapping[str, Any] | None,
    split: Mapping[str, Any],
) -> None:
    """Hyperparameters, metrics, dataset, embeddings, ID maps, exports (preview + full when small) and plots on the
    model's run.

    ``metrics``: the held-out metrics as named by ``model_metrics`` (``test.*``, ``val.*``); they are logged on
    this run only, never copied to the parent (the parent carries the comparison table and plot instead).

    Params: the model's own config slice (``models.<name>.*`` of the parent run, without the prefix, e.g.
    ``factors``, ``alpha``) beside the training facts (``info.*``). The parent's dataset becomes this run's training
    input, and the test metrics are linked to it, so the model logged on this run (``registry.log_recommender``)
    shows which data its metrics come from.
    """
    name = model["model"]
    export = export or {}  # None: the model's tables were not shipped
    tracker.log_params(run_id, {f"info.{k}": v for k, v in model["info"].items() if not isinstance(v, dict | list)})
    hyper, datasets = _parent_context(tracker, run_id, name)
    tracker.log_params(run_id, hyper)
    tracker.log_dataset_inputs(run_id, datasets)
    link = (datasets[0].name, datasets[0].digest) if datasets else None
    tracker.log_metrics(run_id, metrics, dataset=link)
    extra = {"ann_recall_at_k": export["ann_recall_at_k"]} if "ann_recall_at_k" in export else {}
    tracker.log_metrics(run_id, {"train_seconds": model["train_seconds"], **extra})
    tracker.set_description(run_id, model_description(name, model, metrics, hyper))
    tracker.log_artifact(run_id, model["embeddings"], f"embeddings/{name}")
    tracker.log_artifact(run_id, split["user_map"], "id_maps")
    tracker.log_artifact(run_id, split["item_map"], "id_maps")
    checkpoint(f"log:{name}")  # the model's run is half logged (metrics and embeddings, no tables or plots yet)
    for table in ("topk", "similar_items"):
        path = export.get(table)
        if not path:
            continue
        size = sum(p.stat().st_size for p in Path(path).glob("*.parquet"))
        preview = read_table(path).head(PREVIEW_ROWS)
        tmp = Path(path).parent / f".{table}_preview.parquet"
        write_parquet_atomic(preview, tmp)
        tracker.log_artifact(run_id, tmp, f"exports/{name}/preview")
        tmp.unlink(missing_ok=True)
        tracker.log_dict(
            run_id, {"full_table": str(Path(path).resolve()), "bytes": size}, f"exports/{name}/{table}_location.json"
        )
        if size <= FULL_TABLE_ARTIFACT_MAX_BYTES:
            tracker.log_artifact(run_id, path, f"exports/{name}/{table}")
    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    popularity = np.asarray((seen > 0).sum(axis=0)).ravel().astype(np.float64)
    if model.get("history"):
        _log_fig(tracker, run_id, plots.training_curves(model["history"], name), "plots/training_curves.png")
    if export.get("topk"):
        items = read_table(export["topk"]).select("item_id")
        idx = emb.items.lookup(items["item_id"]).drop_nulls().to_numpy()
        counts = np.bincount(idx, minlength=len(emb.items)).astype(np.float64)
        _log_fig(tracker, run_id, plots.popularity_bias(counts, popularity, name), "plots/popularity_bias.png")
    if emb.dim >= 2:
        _log_fig(
            tracker, run_id, plots.item_projection(emb.item_vectors, popularity, name), "plots/item_embeddings_2d.png"
        )


def _parent_context(tracker: Tracker, run_id: str, name: str) -> tuple[dict[str, Any], list[Any]]:
    """(the model's hyperparameters, the parent run's datasets) for nested run ``run_id`` of model ``name``.

    Params the run already has (Lightning's logger writes the two-tower's own, with resolved values) are left out:
    MLflow refuses to change a param."""
    run = tracker.get_run(run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if not parent_id:
        return {}, []
    parent = tracker.get_run(parent_id)
    prefix = f"models{tracker.settings.flatten_sep}{name}{tracker.settings.flatten_sep}"
    hyper = {k[len(prefix) :]: v for k, v in parent.data.params.items()
             if k.startswith(prefix) and k[len(prefix) :] not in run.data.params}  # fmt: skip
    hyper.pop("enabled", None)
    datasets = [d.dataset for d in (parent.inputs.dataset_inputs if parent.inputs else [])]
    return hyper, datasets


def model_description(name: str, model: Mapping[str, Any], metrics: dict[str, float], hyper: dict[str, Any]) -> str:
    """A nested run's description (Markdown): what was trained, with what, and how it scored."""
    info = model.get("info", {})
    lines = [f"**{name}** ({info.get('backend', 'numpy')}), trained in {model['train_seconds']:.1f} s"
             + (" (reused from the cache)" if model.get("cached") else "") + "."]  # fmt: skip
    if hyper:
        lines.append("Hyperparameters: " + ", ".join(f"`{k}={v}`" for k, v in sorted(hyper.items())) + ".")
    if info.get("best_iteration") is not None:
        lines.append(f"Best validation {info.get('val_metric')} {info.get('best_val_metric', float('nan')):.4f} at "
                     f"iteration/epoch {info['best_iteration']}.")  # fmt: skip
    for label, prefix in (("Validation", VAL_PREFIX), ("Test", TEST_PREFIX)):
        shown = sorted(k for k in metrics if k.startswith(tuple(f"{prefix}{m}_at" for m in ("recall", "ndcg",
                                                                                              "hit_rate"))))
        if shown:
            lines.append(f"{label} (warm users): " + ", ".join(f"{k} {metrics[k]:.4f}" for k in shown) + ".")
    return "\n\n".join(lines)


def log_summary(tracker: Tracker, run_id: str, markdown: str) -> None:
    """``summary.md`` as an artifact of the parent run and as its description (the UI's run page shows it)."""
    tracker.log_text(run_id, markdown, "summary.md")
    tracker.set_description(run_id, markdown)


COMPARISON_TABLE = "model_comparison.csv"
HEADLINE = ("recall", "ndcg", "map", "hit_rate")  # the metrics the comparison plot and view show, per k


def comparison_table(test: pl.DataFrame, val: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per model: ``model``, then ``val.<metric>`` (when ``val`` is given) and ``test.<metric>`` columns
    (``metrics_frame`` tables, one row per model)."""

    def prefixed(table: pl.DataFrame, prefix: str) -> pl.DataFrame:
        return table.rename({c: f"{prefix}{c}" for c in table.columns if c != "model"})

    out = prefixed(test, TEST_PREFIX)
    if val is not None and val.height:
        out = prefixed(val, VAL_PREFIX).join(out, on="model", how="full", coalesce=True, maintain_order="left")
    return out


def log_comparison(
    tracker: Tracker,
    run_id: str,
    table: pl.DataFrame,
    ks: list[int],
    primary_metric: str | None = None,
    val: pl.DataFrame | None = None,
) -> str | None:
    """The model comparison on the parent run: one table (``model_comparison.csv``: ``val.*`` and ``test.*`` per
    model) and one plot (``plots/model_comparison.png``, test window); and the experiment's saved view
    "Model comparison" of the runs table (``Tracker.save_comparison_view``), best validation ``primary_metric``
    first. No model metric is copied onto the parent: the comparison across runs is the view's.

    Args:
        table: test metrics, one row per model (``metrics_frame``).
        val: validation metrics in the same shape (None: the table holds the test window only).

    Returns:
        The view's UI path (``#/experiments/<id>/runs?viewStateShareKey=model-comparison``; also the parent's tag
        ``comparison_view``), or None without ``primary_metric``.
    """
    metrics = [f"{m}_at_{k}" for k in ks for m in HEADLINE]
    _log_fig(tracker, run_id, plots.metric_comparison(table, metrics), "plots/model_comparison.png")
    tracker.log_text(run_id, comparison_table(table, val).write_csv(), COMPARISON_TABLE)
    if primary_metric is None:
        return None
    order_by = f"{VAL_PREFIX if val is not None else TEST_PREFIX}{primary_metric}"
    columns = [f"{TEST_PREFIX}{m}" for m in metrics if m in table.columns]
    path = tracker.save_comparison_view(columns, order_by, charts=primary_metric)
    tracker.set_tags(run_id, {"comparison_view": path})
    return path


def _log_fig(tracker: Tracker, run_id: str, fig: Any, name: str) -> None:
    try:
        tracker.log_figure(run_id, fig, name)
    finally:
        plots.close(fig)


def metrics_frame(metrics: dict[str, dict[str, float]]) -> pl.DataFrame:
    from recsys_embed.evaluation.metrics import metrics_table

    return metrics_table(metrics)


def format_metrics(table: pl.DataFrame, ks: list[int]) -> str:
    """A compact text table of the headline metrics (one row per model)."""
    cols = ["model"] + [f"{m}_at_{k}" for k in ks for m in ("recall", "ndcg", "map", "hit_rate", "coverage")]
    cols = [c for c in cols if c in table.columns]
    widths = {c: max(len(c), 8) for c in cols}
    head = "  ".join(f"{c:>{widths[c]}}" if c != "model" else f"{c:<12}" for c in cols)
    lines = [head]
    for row in table.select(cols).iter_rows(named=True):
        cells = [f"{row['model']:<12}"] + [f"{row[c]:>{widths[c]}.4f}" for c in cols if c != "model"]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def summary_markdown(manifest: Mapping[str, Any], table: pl.DataFrame, ks: list[int]) -> str:
    """The Prefect markdown artifact: metrics, accounting, exports, MLflow link."""
    manifest = redact_tree(manifest)
    lines = [f"# recsys-embed run `{manifest['run_name']}`", ""]
    ml = manifest["mlflow"]
    where = f"[open it in the MLflow UI]({ml['ui_url']})" if ml.get("ui_url") else (
        f"UI path `{ml['ui_path']}`; open with `recsys-embed ui`, or set `ui_url` in mlflow.yml for a link")
    lines.append(f"MLflow run: `{ml['run_id']}` at `{ml['tracking_uri']}` ({where})")
    lines += ["", "## Metrics (test split, warm users)", ""]
    cols = [c for c in table.columns if c == "model" or any(c.endswith(f"_at_{k}") for k in ks)]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for row in table.select(cols).iter_rows():
        cells = [str(row[0])] + [f"{v:.4f}" for v in row[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    sel = manifest.get("selection") or {}
    lines += [
        "",
        f"Best model by validation `{manifest['primary_metric']}`: **{manifest['best_model']}** "
        f"({sel.get('reason', 'no selection')}). Test metrics are reported, never used to choose.",
    ]
    lines += accounting_markdown(manifest["accounting"], manifest.get("split"))
    lines += ["", "## Shipped tables", ""]
    for m, e in manifest["exports"].items():
        on = e.get("trained_on") or {}
        window = on.get("window") or {}
        lines.append(
            f"- {m}: `{e.get('topk')}` ({e.get('topk_rows', 0):,} rows for {e.get('topk_users', 0):,} users, "
            f"{e.get('fallback_users', 0):,} from the popularity fallback); fitted on {on.get('fit')}"
            + (f" ({on.get('rows', 0):,} events, {window.get('first')} .. {window.get('last')})" if window else "")
        )
    cur = manifest.get("current")
    if cur:
        lines.append(f"- champion tables for downstream readers: `{cur['current']}` ({cur['model']}"
                     f"{' v' + str(cur['version']) if cur.get('version') else ''}; `{cur['champion_file']}`)")
    db = manifest.get("database")
    if db:
        tables = ", ".join(f"`{t}` ({n:,} rows)" for t, n in db["tables"].items())
        lines.append(f"- database `{db['uri']}`: {tables}, model version {db.get('model_version')}")
    reg = manifest.get("registry")
    if reg:
        head = (f"`{reg['name']}` version **{reg['version']}** ({manifest['best_model']}) is **{reg['alias']}**: "
                f"{reg['metric']} {reg['reason']} (margin {reg['margin']:g}")  # fmt: skip
        prev = f"v{reg['previous_champion']}" if reg["previous_champion"] else "none"
        if reg["alias"] == "champion":
            text = (f"{head}; previous champion: {prev}). "
                    f"Load it with `mlflow.pyfunc.load_model(\"models:/{reg['name']}@champion\")`.")  # fmt: skip
        else:  # the champion did not move: @champion still answers with the previous version
            text = (f"{head}). The champion stays {prev}: `models:/{reg['name']}@champion` still loads it; load "
                    f"this version with `mlflow.pyfunc.load_model(\"models:/{reg['name']}@challenger\")`.")  # fmt: skip
        lines += ["", "## Champion decision", "", text]
    inc = manifest.get("incremental")
    if inc:
        lines += [
            "",
            "## Incremental ingest",
            "",
            f"- new files: {len(inc['new_files'])}, new rows read: {inc['new_rows_read']:,}, "
            f"skipped (already ingested): {len(inc['skipped_files'])} files",
        ]
    return "\n".join(lines)


def accounting_markdown(accounting: Mapping[str, Any], split_info: Mapping[str, Any] | None = None) -> list[str]:
    """The row accounting as Markdown lines: ingest's balance (read = kept + duplicates + quarantined + filtered),
    then, with the split's ``info``, what became of the kept rows per window (``RowReport.windows``); the same
    "kept" as the CLI's and the ingest log's."""
    from recsys_embed.types import RowReport

    report = RowReport.from_dict(dict(accounting))
    lines = ["", "## Row accounting", "", "| bucket | rows |", "|---|---:|", f"| read | {report.rows_read:,} |",
             f"| duplicates | {report.duplicates:,} |"]  # fmt: skip
    lines += [f"| quarantined: {k} | {v:,} |" for k, v in sorted(report.quarantined.items())]
    lines += [f"| filtered: {k} | {v:,} |" for k, v in sorted(report.ingest_filtered.items())]
    lines.append(f"| **kept** | **{report.ingest_kept:,}** |")
    windows = report.windows(split_info)
    if windows:
        buckets = list(dict.fromkeys(b for p in windows.values() for b in p if b not in ("rows", "train", "target")))
        lines += ["", "Of the kept rows, by split window (train: rows in the train matrix; target: evaluation "
                  "targets; the other columns are held-out rows that are not targets, or rows the matrix dropped):",
                  "", "| window | rows | train / target | " + " | ".join(buckets) + " |",
                  "|---|" + "---:|" * (2 + len(buckets))]  # fmt: skip
        for name, part in windows.items():
            used = part["train"] if name == "fit" else part["target"]
            cells = [f"{part.get(b, 0):,}" for b in buckets]
            lines.append(f"| {name} | {part['rows']:,} | {used:,} | " + " | ".join(cells) + " |")
    else:
        lines += [f"| of the kept, dropped by the matrix: {k} | {v:,} |"
                  for k, v in sorted(report.matrix_dropped.items())]  # fmt: skip
        lines += [f"| of the kept, held out ({w}): {k} | {v:,} |" for w in ("val", "test")
                  for k, v in sorted(report.held_out(w).items())]  # fmt: skip
    return lines


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> Path:
    """Write the run manifest (``summary.json``) atomically; any credentials in a URI are masked first.

    Every path in it is absolute (``absolute_paths``), so the file means the same read from any folder.
    """
    return write_json_atomic(redact_tree(absolute_paths(manifest)), path)


def absolute_paths(obj: Any, root: Path | None = None) -> Any:
    """A copy of a JSON-like tree where every relative path (a string with a ``/`` that names an existing file or
    folder under ``root``, default the working directory) is made absolute. URIs (``scheme://``), absolute paths
    and other strings are kept as they are."""
    base = (root or Path.cwd()).resolve()
    if isinstance(obj, dict):
        return {k: absolute_paths(v, base) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [absolute_paths(v, base) for v in obj]
    if isinstance(obj, str) and "/" in obj and "://" not in obj and not obj.startswith(("/", "#")) and "\n" not in obj:
        try:
            p = base / obj
            if p.exists():
                return str(p.resolve())
        except OSError:  # not a path after all (too long, odd characters)
            return obj
    return obj


def redact_tree(obj: Any) -> Any:
    """A copy of a JSON-like tree with every string redacted (``tracking.redact_text``: ``//user:***@``,
    ``password=***``): manifests and summaries never carry a secret, whatever a record put in them."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_tree(v) for v in obj]
    return redact_text(obj) if isinstance(obj, str) else obj
