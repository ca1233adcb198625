"""The main job: ingest -> split -> train each configured model -> evaluate -> log -> export.

Orchestration only. Each task is a thin call into ``recsys_embed``; tasks hand each other paths and
small records. I/O tasks retry. Resume: ingest, split and each model's training are content-addressed
folders under ``<root>/cache/`` that ``recsys_embed.pipeline.stages`` reuses when their inputs and config are unchanged
(the library's check is the source of truth; Prefect's cache only short-cuts ingest), so re-running a killed
run recomputes only what it had not committed. The run first marks its killed predecessors' MLflow runs KILLED
and removes their uncommitted leftovers (it holds the output folder's lock, so nothing else writes there).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE

from flows.crashed import claim_root, mark_dead_runs_crashed
from flows.distributed import DaskCluster, dask_cluster, run_sharded_export
from recsys_embed.config import (
    DatabaseExportConfig,
    EvalConfig,
    ExportConfig,
    IncrementalConfig,
    IngestConfig,
    MlflowSettings,
    ModelsConfig,
    PipelineConfig,
    SplitConfig,
    TuningConfig,
    load_config,
    load_mlflow_settings,
    registered_name,
)
from recsys_embed.data.incremental import commit_state, nothing_new, run_incremental_ingest
from recsys_embed.io import write_json_atomic
from recsys_embed.models.factory import refit_shape, runnable_models
from recsys_embed.models.tuning import apply_tuning, log_tuning
from recsys_embed.pipeline import retention, shipping, stages
from recsys_embed.pipeline.lock import run_lock
from recsys_embed.pipeline.records import (
    DatabaseRecord,
    ExportRecord,
    IngestRecord,
    ModelRecord,
    PublishRecord,
    RegistryDecision,
    RunManifest,
    SplitRecord,
    TunedModel,
    TuneRecord,
    ValidationRecord,
)
from recsys_embed.tracking import reporting
from recsys_embed.tracking.tracker import Tracker, git_commit, lightning_logger, redact_uri, ui_run_url
from recsys_embed.types import Candidate, RowReport


def _ingest_cache_key(context: Any, params: dict[str, Any]) -> str | None:
    cfg: IngestConfig = params["cfg"]
    key = stages.ingest_cache_key(stages.input_fingerprint(cfg), cfg)
    # Only reuse Prefect's cached record while the cached files still exist, and only for this output folder
    # (the record holds its paths).
    if not (Path(params["cache_root"]) / f"ingest-{key}" / "_SUCCESS").exists():
        return None
    return f"ingest-{key}-{hashlib.sha256(str(Path(params['cache_root']).resolve()).encode()).hexdigest()[:12]}"


@task(name="ingest", retries=2, retry_delay_seconds=[1, 5], cache_key_fn=_ingest_cache_key, persist_result=True)
def ingest_task(cfg: IngestConfig, cache_root: str) -> IngestRecord:
    return stages.run_ingest(cfg, Path(cache_root))


@task(name="ingest-incremental", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def incremental_ingest_task(cfg: IngestConfig, root: str, inc: IncrementalConfig, run_name: str) -> IngestRecord:
    return cast(IngestRecord, run_incremental_ingest(cfg, Path(root), inc, run_name))


@task(name="split", retries=1, retry_delay_seconds=2, cache_policy=NONE)
def split_task(
    ingest: IngestRecord, ingest_cfg: IngestConfig, cfg: SplitConfig, out_dir: str, cache_root: str
) -> SplitRecord:
    return stages.run_split(ingest, ingest_cfg, cfg, Path(out_dir), Path(cache_root))


@task(name="train", cache_policy=NONE, task_run_name="train-{name}")
def train_task(
    name: str,
    split: SplitRecord,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    out_dir: str,
    settings: MlflowSettings,
    run_id: str,
    warm_start_from: str | None = None,
    cache_root: str | None = None,
) -> ModelRecord:
    tracker = Tracker(settings, local_outputs=Path(out_dir).parent)
    return stages.run_train(
        name,
        split,
        models_cfg,
        eval_cfg,
        Path(out_dir),
        on_metrics=lambda m, step: tracker.log_metrics(run_id, m, step),
        # created only if the model is trained, not reused: a cache hit need not import Lightning
        lightning_logger=(lambda: lightning_logger(settings, run_id)) if name == "two_tower" else None,
        warm_start_from=warm_start_from,
        cache_root=Path(cache_root) if cache_root else None,
    )


@task(name="tune", cache_policy=NONE)
def tune_task(
    split: SplitRecord, models_cfg: ModelsConfig, eval_cfg: EvalConfig, cfg: TuningConfig, cache_root: str,
    storage_file: str,
) -> TuneRecord:  # fmt: skip
    return stages.run_tune(split, models_cfg, eval_cfg, cfg, Path(cache_root), Path(storage_file))


@task(name="tuning-report", cache_policy=NONE, task_run_name="tuning-report-{name}")
def tuning_report_task(
    settings: MlflowSettings, run_id: str, name: str, split: SplitRecord, defaults_cfg: ModelsConfig,
    final_cfg: ModelsConfig, eval_cfg: EvalConfig, tuned: TunedModel, metrics: dict[str, float], out_dir: str,
    cache_root: str, tuning_metric: str,
) -> dict[str, dict[str, float]]:  # fmt: skip
    test = stages.score_defaults(
        name, split, defaults_cfg, final_cfg, eval_cfg, metrics, Path(out_dir), Path(cache_root)
    )
    final = getattr(final_cfg, name).model_dump(mode="json")
    log_tuning(Tracker(settings, local_outputs=Path(out_dir).parent), run_id, name, tuned, final, test, tuning_metric)
    return test


@task(name="evaluate", cache_policy=NONE, task_run_name="evaluate-{model[model]}")
def evaluate_task(model: ModelRecord, split: SplitRecord, cfg: EvalConfig) -> dict[str, float]:
    return stages.run_evaluate(model, split, cfg)


@task(name="validate", cache_policy=NONE, task_run_name="validate-{model[model]}")
def validate_task(model: ModelRecord, split: SplitRecord, cfg: EvalConfig, out_dir: str) -> ValidationRecord:
    return stages.run_validate(model, split, cfg, Path(out_dir))


@task(name="refit-data", retries=1, retry_delay_seconds=2, cache_policy=NONE)
def full_task(
    ingest: IngestRecord, ingest_cfg: IngestConfig, split: SplitRecord, cache_root: str, out_dir: str
) -> SplitRecord:
    return stages.run_full(ingest, ingest_cfg, split, Path(cache_root), Path(out_dir))


@task(name="refit", cache_policy=NONE, task_run_name="refit-{name}")
def refit_task(
    name: str,
    model: ModelRecord,
    full: SplitRecord,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    out_dir: str,
    cache_root: str,
) -> ModelRecord:
    refit_cfg = stages.refit_models_config(name, models_cfg, model)
    return stages.run_train(name, full, refit_cfg, eval_cfg, Path(out_dir), cache_root=Path(cache_root),
                            cache_prefix="refit")  # fmt: skip


@task(name="serve", cache_policy=NONE, task_run_name="serve-{name}")
def serve_task(
    name: str, refit: ModelRecord, popularity: ModelRecord | None, full: SplitRecord, out_dir: str
) -> ModelRecord:
    return shipping.run_serve(name, refit, popularity, full, Path(out_dir))


@task(name="export", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE, task_run_name="export-{model[model]}")
def export_task(
    model: ModelRecord, split: SplitRecord, cfg: ExportConfig, out_dir: str, run_id: str
) -> ExportRecord:
    return shipping.run_export(model, split, cfg, Path(out_dir), run_id)


@task(name="log-model", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE, task_run_name="log-{model[model]}")
def log_model_task(
    settings: MlflowSettings,
    run_id: str,
    model: ModelRecord,
    metrics: dict[str, float],
    export: ExportRecord | None,
    split: SplitRecord,
    run_dir: str | None = None,
) -> None:
    reporting.log_model_run(Tracker(settings, local_outputs=Path(run_dir) if run_dir else None), run_id, model,
                            metrics, export, split)  # fmt: skip


@task(name="register", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def register_task(
    settings: MlflowSettings,
    candidate: Candidate,
    cfg: PipelineConfig,
    split: SplitRecord,
    validations: dict[str, ValidationRecord],
    models_cfg: ModelsConfig,
    work_dir: str,
    cache_root: str,
) -> RegistryDecision:
    return shipping.run_register(settings, candidate, cfg.export, cfg.registry, cfg.eval,
                               registered_name(cfg, settings), split, validations, models_cfg, Path(work_dir),
                               Path(cache_root))  # fmt: skip


@task(name="publish", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def publish_task(root: str, export: ExportRecord, decision: RegistryDecision | None) -> PublishRecord:
    return shipping.run_publish(Path(root), export, decision)


@task(name="db-export", retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def db_export_task(
    export: ExportRecord, cfg: DatabaseExportConfig, root: str, run_id: str, model_version: str | None
) -> DatabaseRecord:
    return shipping.run_db_export(export, cfg, Path(root), run_id, model_version)


@flow(name="embedding-pipeline")
def embedding_pipeline(
    config_path: str | None = "configs/retail.yaml",
    overrides: list[str] | None = None,
    mlflow_config: str = "mlflow.yml",
    force: bool = False,
) -> RunManifest:
    """Run the whole pipeline; returns the run manifest (also written as ``summary.json``).

    One run at a time per output folder: a second one fails at once with a message naming the holder. An
    incremental run with no new log file does nothing and returns ``{"nothing_new": reason, ...}``; ``force``
    runs it anyway.
    """
    cfg = load_config(config_path, overrides or [])
    root = Path(cfg.output_root) / cfg.name
    claim_root(root)  # before the slow start: killed before the lock, the next run still marks this one crashed
    tracker = Tracker(load_mlflow_settings(mlflow_config))  # fails fast when the store is unusable
    with run_lock(root), dask_cluster(cfg.distributed) as cluster:  # cluster: None unless distributed.enabled
        return _run_pipeline(cfg, config_path, tracker, root, cluster, force)


def _run_pipeline(
    cfg: PipelineConfig,
    config_path: str | None,
    tracker: Tracker,
    root: Path,
    cluster: DaskCluster | None = None,
    force: bool = False,
) -> RunManifest:
    logger = get_run_logger()
    crashed = mark_dead_runs_crashed(root)  # holding the lock: other RUNNING flow runs of this folder are dead
    if crashed:
        logger.warning("marked %d Prefect flow run(s) left RUNNING by a killed run as CRASHED: %s", len(crashed),
                       ", ".join(crashed))  # fmt: skip
    settings = tracker.settings
    run_name = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = root / "runs" / run_name
    tracker.local_outputs = run_dir  # named in the error if MLflow goes down mid-run
    # Holding the lock, every RUNNING MLflow run of this pipeline and output folder was left by a killed run.
    scope = {"pipeline": cfg.name, "output_root": str(root.resolve())}
    stale = tracker.mark_stale_runs_failed(scope)
    if stale:
        logger.warning("marked %d MLflow run(s) left RUNNING by a killed run as KILLED: %s", len(stale),
                       ", ".join(stale))  # fmt: skip
    stages.sweep_leftovers(root)
    idle = None if force or not cfg.incremental.enabled else nothing_new(cfg.ingest, root, cfg.incremental)
    if idle:  # no new log file: train, export and register nothing
        return _nothing_new(idle, run_name, config_path, root, tracker)
    parent = tracker.start_run(run_name, tags=scope)
    try:
        ingest_cfg = cfg.ingest
        warm_from: str | None = None  # the last run's models (incremental runs; used when models.warm_start)
        if cfg.incremental.enabled:
            ingest = incremental_ingest_task(cfg.ingest, str(root), cfg.incremental, run_name)
            previous_split = ingest["incremental"]["previous_split"]
            if previous_split and not cfg.ingest.id_maps_from:  # extend the last run's ID maps
                ingest_cfg = cfg.ingest.model_copy(update={"id_maps_from": previous_split})
            warm_from = ingest["incremental"]["previous_models"]
            logger.info("incremental: %d new file(s), %d new rows; %d file(s) already ingested",
                        len(ingest["incremental"]["new_files"]), ingest["incremental"]["new_rows_read"],
                        len(ingest["incremental"]["skipped_files"]))  # fmt: skip
        else:
            ingest = ingest_task(cfg.ingest, str(root / "cache"))
        split = split_task(ingest, ingest_cfg, cfg.split, str(run_dir / "split"), str(root / "cache"))
        report = RowReport.from_dict(split["report"])
        logger.debug("row accounting for %s:\n%s", cfg.ingest.source.path, report.format(split["split"]))
        reporting.log_run_inputs(tracker, parent, cfg, ingest, split, git_commit())
        # hyperparameter search on the validation window; the best parameters replace the configured ones
        tuning = None
        if cfg.tuning.enabled:
            tuning = tune_task(split, cfg.models, cfg.eval, cfg.tuning, str(root / "cache"),
                               str(root / cfg.tuning.storage_file))  # fmt: skip
            tracker.log_metrics(parent, {"tuning_seconds": tuning["seconds"]})
        models_cfg = apply_tuning(cfg.models, tuning)

        metrics: dict[str, dict[str, float]] = {}  # test window: reported once per model, never read to choose
        validations: dict[str, ValidationRecord] = {}  # validation window: what selection reads
        models: dict[str, ModelRecord] = {}
        model_runs: dict[str, str] = {}
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        reused: dict[str, bool] = {}  # model -> trained by an earlier (possibly killed) run, read back here
        try:
            for name in runnable_models(models_cfg, split["n_users"], split["n_items"], refit_shape=refit_shape(split)):
                child = tracker.start_run(name, parent_run_id=parent, tags={**scope, "model": name})
                model_runs[name] = child
                model = train_task(name, split, models_cfg, cfg.eval, str(run_dir / "models"), settings, child,
                                   warm_from, str(root / "cache"))  # fmt: skip
                models[name] = model
                reused[name] = bool(model.get("cached"))
                validations[name] = validate_task(model, split, cfg.eval, str(run_dir / "selection"))
                metrics[name] = evaluate_task(model, split, cfg.eval)
                if tuning and name in tuning["models"]:  # the defaults scored on test beside the tuned model
                    tuning["models"][name]["test"] = tuning_report_task(
                        settings, child, name, split, cfg.models, models_cfg, cfg.eval, tuning["models"][name],
                        metrics[name], str(run_dir / "defaults"), str(root / "cache"), tuning["metric"])  # fmt: skip
            timing["evaluation_s"] = round(time.perf_counter() - t0, 1)  # fit-window training, validation, test
            t0 = time.perf_counter()
            selection = stages.select_best(validations, cfg.eval)
            best = selection["best"]
            shipped = shipping.shipped_models(cfg.export.models, best, list(models))
            logger.info("selection (validation window): %s; shipping %s", selection["reason"], ", ".join(shipped))

            exports: dict[str, ExportRecord] = {}
            full: SplitRecord | None = None
            if cfg.export.refit and shipped:
                full = full_task(ingest, ingest_cfg, split, str(root / "cache"), str(run_dir / "full"))
                refits = {
                    m: refit_task(m, models[m], full, models_cfg, cfg.eval, str(run_dir / "refit"), str(root / "cache"))
                    for m in ["popularity", *shipped]
                    if m in models
                }
                for m in shipped:
                    served = serve_task(m, refits[m], refits.get("popularity"), full,
                                        str(run_dir / "served"))  # fmt: skip
                    seen: SplitRecord = {"train": full["history"], "item_text": full.get("item_text")}
                    exports[m] = _export(cluster, served, seen, cfg.export, str(run_dir / "exports"), parent)
                    exports[m].update({
                        "embeddings": served["embeddings"], "model_embeddings": refits[m]["embeddings"],
                        "fit_matrix": full["train"], "history": full["history"], "info": refits[m]["info"],
                        "fallback_users": served["fallback_users"], "model_users": served["model_users"],
                        "trained_on": {"window": full["window"], "rows": full["rows"], "fit": "all kept events"},
                        "evaluated_as": _evaluated_as(validations[m], metrics[m], split),
                    })  # fmt: skip
            else:  # ship the evaluation fits (export.refit=false)
                for m in shipped:
                    exports[m] = _export(cluster, models[m], split, cfg.export, str(run_dir / "exports"), parent)
                    exports[m].update({
                        "embeddings": models[m]["embeddings"], "model_embeddings": models[m]["embeddings"],
                        "fit_matrix": split["train"], "history": split["train"], "info": models[m]["info"],
                        "trained_on": {"window": None, "fit": "fit window"},
                        "evaluated_as": _evaluated_as(validations[m], metrics[m], split),
                    })  # fmt: skip
            timing["refit_export_s"] = round(time.perf_counter() - t0, 1)  # refit on every event, serve, export
            for name, child in model_runs.items():
                held_out = reporting.model_metrics(metrics[name], validations[name]["metrics"])  # test.*, val.*
                logged: ModelRecord = models[name]
                logged_split = split
                if name in exports and full is not None:  # a shipped model's run carries what is shipped
                    logged = {**models[name], "embeddings": exports[name]["model_embeddings"]}
                    logged_split = full
                log_model_task(settings, child, logged, held_out, exports.get(name), logged_split,
                               str(run_dir))  # fmt: skip
        except BaseException:
            for child in model_runs.values():
                tracker.end_run(child, "FAILED")
            raise
        for child in model_runs.values():
            tracker.end_run(child, "FINISHED")

        table = reporting.metrics_frame(metrics)
        decision: RegistryDecision | None = None
        database: DatabaseRecord | None = None
        current: PublishRecord | None = None
        if best and best in exports:
            tracker.set_tags(model_runs[best], {"best_model": "true"})
            tracker.set_tags(parent, {"best_model": best})
            if cfg.registry.enabled:
                # the data identity: the files, the window read from them and the kept events the refit used
                trained_on = exports[best]["trained_on"]
                identity = shipping.data_identity(str(ingest.get("fingerprint") or ingest["key"]), cfg.ingest,
                                                  trained_on)  # fmt: skip
                key = shipping.run_key(identity, shipping.model_settings(cfg, best, models_cfg))
                recipe_hash, recipe_config = shipping.recipe(best, models_cfg)  # the tuned recipe
                candidate = Candidate(
                    best, model_runs[best], parent, exports[best]["embeddings"], exports[best]["history"],
                    {**{f"val_{k}": v for k, v in validations[best]["metrics"].items()},
                     **{f"test_{k}": v for k, v in metrics[best].items()}},
                    validations[best]["per_user"], recipe_hash, recipe_config, key,
                    {"pipeline": cfg.name, **identity,
                     **shipping.evaluation_windows(split["split"], trained_on.get("window"))},
                )  # fmt: skip
                decision = register_task(settings, candidate, cfg, split, validations, models_cfg, str(run_dir),
                                         str(root / "cache"))  # fmt: skip
                tracker.set_tags(parent, {"champion_decision": f"v{decision['version']} {decision['alias']}: "
                                                               f"{decision['reason']}"})  # fmt: skip
                logger.info("registry: %s v%s -> %s (%s)", decision["name"], decision["version"],
                            decision["alias"], decision["reason"])  # fmt: skip
            current = publish_task(str(root), {**exports[best], "run_dir": str(run_dir.resolve())}, decision)
            if cfg.export.database.enabled:
                database = db_export_task(cast(ExportRecord, current["export"]), cfg.export.database, str(root), parent,
                                          current.get("version"))  # fmt: skip
        manifest: RunManifest = {
            "run_name": run_name,
            "run_dir": str(run_dir.resolve()),
            "config": config_path,
            "mlflow": {
                "run_id": parent,
                "model_runs": model_runs,
                "tracking_uri": redact_uri(settings.tracking_uri),
                "experiment_id": tracker.experiment_id,
                "ui_path": tracker.run_url(parent),
                "ui_url": ui_run_url(settings, tracker.experiment_id, parent),
            },
            "primary_metric": cfg.eval.primary_metric,
            "best_model": best,
            "selection": selection,
            "shipped": shipped,
            "metrics": metrics,
            "val_metrics": {m: v["metrics"] for m, v in validations.items()},
            # the evaluation fits (fit window): what was measured; the shipped refits are under "exports"
            "models": {m: {"embeddings": r["embeddings"], "train_seconds": r.get("train_seconds"), "info": r["info"]}
                       for m, r in models.items()},
            "accounting": split["report"],
            "split": split["split"],
            "test_cold_users": split.get("test_cold_users"),
            "ingest_cached": ingest.get("cached", False),
            "reused": {"ingest": bool(ingest.get("cached")), "split": bool(split.get("cached")), "models": reused},
            "quarantine": ingest["quarantine"],
            "item_text": ingest.get("item_text"),
            "exports": exports,
            "incremental": (
                {k: v for k, v in ingest["incremental"].items() if k != "pending_state"}
                if cfg.incremental.enabled
                else None
            ),
            "registry": decision,
            "current": current,
            "timing": timing,
            "database": database,
            "tuning": tuning,
        }
        reporting.write_manifest(run_dir / "summary.json", manifest)
        tracker.log_artifact(parent, run_dir / "summary.json")
        reporting.log_comparison(tracker, parent, table, cfg.eval.ks, cfg.eval.primary_metric,
                                 reporting.metrics_frame(manifest["val_metrics"]))  # no model metric on the parent
        markdown = reporting.summary_markdown(manifest, table, cfg.eval.ks)
        reporting.log_summary(tracker, parent, markdown)  # summary.md + the run's description
        create_markdown_artifact(markdown=markdown, key="recsys-embed-summary", description="metrics and accounting")
        if manifest["mlflow"]["ui_url"]:
            create_link_artifact(manifest["mlflow"]["ui_url"], link_text=f"MLflow run {run_name}",
                                 key="recsys-embed-mlflow-run", description="this run in the MLflow UI")  # fmt: skip
        write_json_atomic({"run_dir": str(run_dir.resolve()), "run_id": parent}, root / "latest.json")
        if cfg.incremental.enabled:  # only now: a failed run leaves the state as it was
            commit_state(root, cfg.incremental, ingest, str((run_dir / "split").resolve()))
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    tracker.end_run(parent, "FINISHED")
    retention.collect_after_run(cfg, tracker)  # retention.after_run: prune beyond keep_runs / keep_versions
    return manifest


def _export(
    cluster: DaskCluster | None, model: ModelRecord, seen: SplitRecord, cfg: ExportConfig, out_dir: str,
    run_id: str,
) -> ExportRecord:
    """One model's top-k and similar-items tables: in this process, or in shards on Dask."""
    if cluster is None:
        return export_task(model, seen, cfg, out_dir, run_id)
    return run_sharded_export(cluster, model, seen, cfg, out_dir, run_id)


def _evaluated_as(validation: ValidationRecord, test: dict[str, float], split: SplitRecord) -> dict[str, Any]:
    """The held-out metrics of a shipped table's recipe: they come from the evaluation fit, not from the table."""
    return {
        "basis": "evaluation fit of the same recipe (fit window only), scored on the validation and test windows",
        "split": split["split"],
        "val": validation["metrics"],
        "test": test,
    }


def _nothing_new(reason: str, run_name: str, config_path: str | None, root: Path, tracker: Tracker) -> RunManifest:
    """The result of an incremental run with nothing to do: a log line, a Prefect artifact, no MLflow run."""
    latest_file = root / "latest.json"
    latest = json.loads(latest_file.read_text(encoding="utf-8")) if latest_file.exists() else {}
    get_run_logger().info("%s: nothing trained, exported or registered (force=True re-runs anyway)", reason)
    lines = [f"# recsys-embed run `{run_name}`: nothing new", "", f"{reason[0].upper()}{reason[1:]}: nothing was "
             "trained, exported or registered. `--force` (flow parameter `force: true`) re-runs anyway."]  # fmt: skip
    if latest:
        url = ui_run_url(tracker.settings, tracker.experiment_id, latest["run_id"])
        run = f"[{latest['run_id']}]({url})" if url else f"`{latest['run_id']}`"
        lines += ["", f"Latest outputs: `{latest['run_dir']}` (MLflow run {run})."]
    create_markdown_artifact(markdown="\n".join(lines), key="recsys-embed-nothing-new", description=reason)
    return {"run_name": run_name, "config": config_path, "nothing_new": reason, "latest": latest or None}
