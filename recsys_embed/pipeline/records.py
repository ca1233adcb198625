"""What each stage hands on: typed records.

Every stage of ``stages`` returns one of these and takes the records of the stages before it. They are
``TypedDict``s: at run time plain JSON-able dicts, so Prefect passes them between tasks and the cache writes them as
``record.json`` without a conversion layer, while mypy checks every key a stage or flow reads or writes. Paths are
strings (JSON), absolute or relative to the working directory as the stage wrote them. ``Required`` keys are always
there; the others are present where the docstring says.

The chain of the main flow::

    IngestRecord -> SplitRecord -> TuneRecord -> ModelRecord -> ValidationRecord -> SelectionRecord
    IngestRecord + SplitRecord -> SplitRecord (the full log, ``run_full``) -> ModelRecord (refit)
        -> ModelRecord (served, ``run_serve``) -> ExportRecord -> DatabaseRecord / RegistryDecision -> PublishRecord
"""

from __future__ import annotations

from typing import Any, Required

from typing_extensions import TypedDict  # pydantic (Prefect validates task arguments) needs them on 3.11


class IngestRecord(TypedDict, total=False):
    """``run_ingest``: the clean events of the whole log (``cache/ingest-<key>/``)."""

    key: Required[str]
    folder: Required[str]
    events: Required[str]  # events.parquet: user_id, item_id, ts, weight (+ event_type, quantity)
    quarantine: Required[str]  # quarantine.parquet: every rejected row with its reason
    item_text: str | None  # item_text.parquet (item_id, text), None when the log has no text
    files: list[str]  # the source files read
    fingerprint: str  # content fingerprint of the source files
    report: dict[str, Any]  # RowReport: every row accounted for
    quarantine_summary: list[dict[str, Any]]  # reason, rows
    seconds: float
    cached: bool
    incremental: dict[str, Any]  # incremental runs: new / skipped files, previous split and models, pending state


class SplitRecord(TypedDict, total=False):
    """``run_split``: the fit matrix and the targets of an evaluation split; also ``run_full``'s all-events fit
    (no targets, plus ``history`` / ``served_user_map`` / ``window`` / ``rows`` / ``n_served_users``).

    A ``SplitRecord`` holding only ``train`` is a seen filter (``run_export`` on the full history)."""

    key: str | None
    folder: str
    train: Required[str]  # train.npz: the fit CSR (users x items, confidence)
    train_events: str  # train_events.parquet: user_idx, item_idx, ts, weight of the fit window
    item_text: str | None
    user_map: str  # user_map.parquet: row -> user_id
    item_map: str  # item_map.parquet: column -> item_id
    report: dict[str, Any]
    split: dict[str, Any]  # method, cutoffs, rows per window, rule, evidence warnings
    n_users: int
    n_items: int
    val_targets: str | None  # val_targets.npz: the search part of the validation window (None: no window)
    val_counts: dict[str, Any]
    val_warm_users: int
    val_cold_users: int
    select_targets: str | None  # select_targets.npz: the selection part (None: split.select_share 0)
    select_users: int
    search_users: int
    full_users: int  # distinct users / items of every kept event: the refit's catalog, bounded above
    full_items: int
    test_targets: str | None
    test_counts: dict[str, Any]
    test_warm_users: int
    test_cold_users: int
    cached: bool
    # run_full only
    history: str  # history.npz: every kept (user, item) pair of the log, the exports' seen filter
    served_user_map: str  # every user with history (the model's users first)
    window: dict[str, str] | None  # first, last event (None: the log has no time)
    rows: int
    n_served_users: int


class ModelRecord(TypedDict, total=False):
    """``run_train`` (evaluation fit or refit, ``cache/train-<model>-<key>/`` / ``refit-``) and ``run_serve``
    (served embeddings: ``similar_embeddings``, ``fallback_users``, ``model_users``)."""

    model: Required[str]
    embeddings: Required[str]  # a saved Embeddings folder
    key: str | None
    folder: str
    train_seconds: float
    info: dict[str, Any]  # the model's own facts (backend, best iteration, timings)
    history: list[dict[str, Any]]  # per-iteration / per-epoch validation curve
    cached: bool
    # run_serve only
    similar_embeddings: str  # the refit model's own item vectors, for similar items
    fallback_users: int
    model_users: int


class TunedModel(TypedDict, total=False):
    """One searched model in ``TuneRecord.models`` (``tuning.tune_models``)."""

    study: Required[str]  # the Optuna study name in the SQLite storage
    params: Required[dict[str, Any]]  # the best trial's parameters: what training and the refit use
    best_value: float
    best_trial: int
    defaults: dict[str, Any]  # the configured values of the searched parameters (trial 0)
    default_value: float | None
    kept_defaults: str | None  # why the best trial did not replace the defaults (a gain within the noise), or None
    n_trials: int
    complete: int
    pruned: int
    failed: int
    reused_trials: int  # finished trials read back from the storage (a resumed search)
    new_trials: int
    stopped_by: str  # "trials" | "time"
    seconds: float
    trials: str  # trials.csv
    plots: dict[str, str]  # Optuna's plots (PNG)
    test: dict[str, dict[str, float]]  # added by the flow: test metrics, defaults beside tuned


class TuneRecord(TypedDict, total=False):
    """``run_tune``: per searched model its study, best and default parameters and values (``cache/tune-<key>/``)."""

    metric: Required[str]
    storage: str | None  # the Optuna SQLite file
    seconds: float
    models: Required[dict[str, TunedModel]]
    key: str
    folder: str
    skipped: dict[str, str]  # model -> why it was not searched
    cached: bool


class ValidationRecord(TypedDict):
    """``run_validate``: what selection reads for one model."""

    model: str
    metrics: dict[str, float]  # empty without a validation window
    per_user: str | None  # .npy of the primary metric per validation user


class SelectionRecord(TypedDict, total=False):
    """``select_best`` (``selection.Selection.to_dict``): the pick on the validation window."""

    basis: Required[str]
    best: Required[str | None]
    metric: str
    values: dict[str, float]
    leader: str | None
    tied: list[str]
    gap_se: dict[str, float]
    users: int
    reason: str


class ExportRecord(TypedDict, total=False):
    """``run_export`` / ``run_export_commit``: the committed tables of one model; the flow adds where they came
    from (``run_dir``, ``trained_on``, ``evaluated_as``, the served counts and paths)."""

    model: Required[str]
    topk: Required[str]  # the top-k table folder (Parquet parts + _SUCCESS)
    topk_rows: int
    topk_users: int
    topk_shards: int  # sharded exports only
    search: str  # approximate search only: its kind and measured recall
    ann_recall_at_k: float
    similar_items: str
    similar_rows: int
    # added by the flow
    run_dir: str
    embeddings: str
    model_embeddings: str
    fit_matrix: str
    history: str
    info: dict[str, Any]
    fallback_users: int
    model_users: int
    trained_on: dict[str, Any]
    evaluated_as: dict[str, Any]


class SearchQuality(TypedDict, total=False):
    """``search_quality``: an approximate search's kind and its measured recall@k against exact (empty: exact)."""

    search: str
    ann_recall_at_k: float


class SimilarRecord(TypedDict, total=False):
    """``run_export_similar``: empty for popularity (no item-item similarity)."""

    similar_items: str
    similar_rows: int


class ShardPlanRecord(TypedDict):
    """``run_export_plan`` (``shards.ShardPlan.to_dict``; ``ShardPlan.from_dict`` reads it back)."""

    target: str
    staging: str
    token: str
    n_users: int
    chunk_users: int
    shards: list[dict[str, Any]]  # index, start, stop
    created: float


class ShardRecord(TypedDict):
    """``run_export_shard`` (``shards.ShardResult``)."""

    index: int
    rows: int
    users: int
    parts: list[str]
    seconds: float


class DatabaseRecord(TypedDict, total=False):
    """``run_db_export``: the URI (redacted) and rows per table."""

    uri: Required[str]
    model: Required[str]
    model_version: str | None
    tables: Required[dict[str, int]]
    run_id: str


class RegistryDecision(TypedDict, total=False):
    """``run_register`` (``registry.register_best``): the version, whether it became champion, and why."""

    name: Required[str]
    version: Required[str]
    alias: str | None
    promoted: bool
    registered: bool  # False: a run with the same data identity and config found its version (nothing new
    # registered): unchanged, or its interrupted decision completed, or judged again when the champion moved
    reason: str
    metric: str
    value: float | None
    margin: float
    previous_champion: str | None
    champion_value: float | None
    champion_basis: str | None
    paired: dict[str, Any] | None
    uri: str  # models:/<name>/<version>
    model_uri: str  # the LoggedModel behind the version


class PublishRecord(TypedDict, total=False):
    """``run_publish``: what ``<root>/current`` and ``champion.json`` point at."""

    model: Required[str]
    version: str | None
    registered_model: str | None
    run_dir: str | None
    export: dict[str, Any]
    topk_path: str
    similar_items_path: str
    trained_on: dict[str, Any] | None
    published_at: str
    moved: bool
    champion_file: str
    current: str


class RunManifest(TypedDict, total=False):
    """What a pipeline run returns and writes as ``runs/<run>/summary.json`` (``flows/embedding_pipeline.py``); an
    incremental run with nothing new returns only ``run_name``, ``config``, ``nothing_new`` and ``latest``."""

    run_name: Required[str]
    config: Required[str | None]
    run_dir: str
    mlflow: dict[str, Any]  # run_id, model_runs, tracking_uri, experiment_id, ui_path, ui_url
    primary_metric: str
    best_model: str | None
    selection: SelectionRecord
    shipped: list[str]
    metrics: dict[str, dict[str, float]]  # test window, per model (reported, never used to choose)
    val_metrics: dict[str, dict[str, float]]
    models: dict[str, dict[str, Any]]  # the evaluation fits: embeddings, train_seconds, info
    accounting: dict[str, Any]
    split: dict[str, Any]
    test_cold_users: int | None
    ingest_cached: bool
    reused: dict[str, Any]
    quarantine: str
    item_text: str | None
    exports: dict[str, ExportRecord]
    incremental: dict[str, Any] | None
    registry: RegistryDecision | None
    current: PublishRecord | None
    timing: dict[str, float]
    database: DatabaseRecord | None
    tuning: TuneRecord | None
    nothing_new: str
    latest: dict[str, Any] | None
