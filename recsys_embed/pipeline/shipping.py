"""The stages that ship what users consume, after selection: the served embeddings (every user with history
covered), the top-k and similar-items exports (in one process or sharded), the database export, the registry
decision and the stable ``current`` / ``champion.json`` pointers.

Like ``stages`` (which trains and evaluates), each is a file-in/file-out function over typed records
(``records``); ``flows/`` wraps each one in a Prefect task.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from recsys_embed.config import (
    DatabaseExportConfig,
    EvalConfig,
    ExportConfig,
    IngestConfig,
    MlflowSettings,
    ModelsConfig,
    PipelineConfig,
    RegistryConfig,
)
from recsys_embed.faults import checkpoint
from recsys_embed.io import (
    staged_table,
    write_json_atomic,
)
from recsys_embed.pipeline.records import (
    DatabaseRecord,
    ExportRecord,
    ModelRecord,
    PublishRecord,
    RegistryDecision,
    SearchQuality,
    ShardPlanRecord,
    ShardRecord,
    SimilarRecord,
    SplitRecord,
    ValidationRecord,
)
from recsys_embed.pipeline.stages import content_hash, run_train, run_validate
from recsys_embed.store import load_csr, load_embeddings, save_embeddings
from recsys_embed.types import Candidate, Embeddings, IdMap

log = logging.getLogger(__name__)


def run_serve(
    name: str, refit: ModelRecord, popularity: ModelRecord | None, full: SplitRecord, out_dir: Path
) -> ModelRecord:
    """The shipped model's served embeddings (``coverage.served_embeddings``: the refit model for the users it
    serves, the refit popularity ranking for every other user with history), committed at ``out_dir/<name>``.

    Returns a model record for ``run_export`` (``embeddings``: the served vectors; ``similar_embeddings``: the
    refit model's own item vectors, which similar items use) with ``fallback_users`` / ``model_users``.
    """
    from recsys_embed.models.popularity import item_popularity
    from recsys_embed.serving.coverage import served_embeddings

    model = load_embeddings(refit["embeddings"])
    matrix = load_csr(full["train"])
    pop = item_popularity(matrix).astype(np.float32)
    if popularity is not None:  # the refit popularity model's own counts (the same numbers, one source)
        pop = load_embeddings(popularity["embeddings"]).item_vectors[:, 0]
    users = IdMap.load(full["served_user_map"])
    served = served_embeddings(model, pop, users, matrix)
    target = Path(out_dir) / name
    with staged_table(target) as stage:
        save_embeddings(served, stage)
    return {
        "model": name,
        "embeddings": str(target),
        "similar_embeddings": refit["embeddings"],
        "fallback_users": int(served.info["fallback_users"]),
        "model_users": int(served.info["model_users"]),
    }


def run_export(model: ModelRecord, split: SplitRecord, cfg: ExportConfig, out_dir: Path, run_id: str) -> ExportRecord:
    """Top-k for every user of the model's embeddings and similar items, as committed Parquet tables.

    ``split["train"]`` is the seen filter (the production path passes ``{"train": full["history"]}``); a model
    record's ``similar_embeddings`` (the refit model behind served vectors) feeds the similar items. With
    ``split["item_text"]`` (the log maps an item text) both tables carry it (``item_text``, ``similar_item_text``).
    """
    from recsys_embed.serving.export import export_topk

    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    folder = Path(out_dir) / model["model"]
    text = _item_text(split)
    topk = export_topk(emb, seen, cfg, folder, run_id, item_text=text)
    record: ExportRecord = {"model": model["model"], "topk": topk.path, "topk_rows": topk.rows,
                            "topk_users": topk.users}  # fmt: skip
    record.update(search_quality(emb, seen, cfg))
    checkpoint(f"export:{model['model']}")  # mid-export: top-k committed, similar items not written yet
    record.update(run_export_similar(model, cfg, out_dir, run_id, split))
    return record


def _item_text(split: SplitRecord | None) -> Any:
    """The ingest's ``item_text.parquet`` (``item_id``, ``text``) named by ``split``, as a frame; None when the log
    maps no item text."""
    import polars as pl

    path = split.get("item_text") if split is not None else None
    return pl.read_parquet(path) if path and Path(path).exists() else None


# The same export, sharded (``recsys_embed.serving.shards``): plan once, one call per shard (anywhere that sees these
# paths), commit once, similar items beside them. Together they return what ``run_export`` returns.


def run_export_plan(model: ModelRecord, cfg: ExportConfig, out_dir: Path, n_shards: int) -> ShardPlanRecord:
    """Plan the sharded top-k table ``out_dir/<model>/topk`` in at most ``n_shards`` shards; the plan record."""
    from recsys_embed.serving.shards import plan_topk_shards

    n_users = len(load_embeddings(model["embeddings"]).users)
    plan = plan_topk_shards(n_users, cfg.chunk_users, n_shards, Path(out_dir) / model["model"] / "topk")
    return cast(ShardPlanRecord, plan.to_dict())


def run_export_shard(
    model: ModelRecord, split: SplitRecord, cfg: ExportConfig, plan: ShardPlanRecord, index: int, run_id: str
) -> ShardRecord:
    """Write shard ``index`` of ``plan`` (``shards.export_topk_shard``); its result (rows, users, parts)."""
    from dataclasses import asdict

    from recsys_embed.serving.shards import ShardPlan, export_topk_shard

    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    shard = export_topk_shard(emb, seen, cfg, ShardPlan.from_dict(dict(plan)), index, run_id, _item_text(split))
    return cast(ShardRecord, asdict(shard))


def run_export_commit(model: ModelRecord, split: SplitRecord, cfg: ExportConfig, plan: ShardPlanRecord) -> ExportRecord:
    """Check every shard of ``plan`` and commit the top-k table; the ``topk`` part of ``run_export``'s record."""
    from recsys_embed.serving.shards import ShardPlan, commit_topk_shards

    res = commit_topk_shards(ShardPlan.from_dict(dict(plan)), cfg)
    record: ExportRecord = {"model": model["model"], "topk": res.path, "topk_rows": res.rows, "topk_users": res.users,
                      "topk_shards": len(plan["shards"])}  # fmt: skip
    if cfg.search.kind != "exact":
        record.update(search_quality(load_embeddings(model["embeddings"]), load_csr(split["train"]), cfg))
    return record


def search_quality(emb: Embeddings, seen: Any, cfg: ExportConfig) -> SearchQuality:
    """For an approximate search (``export.search.kind`` hnsw / ivf): its recall@k against exact search on a
    seeded user sample, as ``{"search": kind, "ann_recall_at_k": r}``; empty for exact search."""
    if cfg.search.kind == "exact":
        return {}
    from recsys_embed.serving.ann import recall_against_exact

    recall = recall_against_exact(emb, cfg.k, cfg.search, seen, cfg.search.recall_sample_users)
    log.info("export: %s search recall@%d against exact = %.4f (%s)", cfg.search.kind, cfg.k, recall, emb.model)
    return {"search": cfg.search.kind, "ann_recall_at_k": round(recall, 6)}


def run_export_similar(
    model: ModelRecord, cfg: ExportConfig, out_dir: Path, run_id: str, split: SplitRecord | None = None
) -> SimilarRecord:
    """The similar-items table of ``run_export`` alone (empty record for popularity, which has none); with
    ``split["item_text"]`` it carries ``item_text`` and ``similar_item_text``."""
    from recsys_embed.serving.export import export_similar_items

    emb = load_embeddings(model.get("similar_embeddings") or model["embeddings"])
    if emb.dim <= 1:  # popularity has no meaningful item-item similarity
        return {}
    sim = export_similar_items(emb, cfg, Path(out_dir) / model["model"], run_id, item_text=_item_text(split))
    return {"similar_items": sim.path, "similar_rows": sim.rows}


def run_db_export(
    export: ExportRecord, cfg: DatabaseExportConfig, root: Path, run_id: str, model_version: str | None
) -> DatabaseRecord:
    """Copy one model's committed top-k (and similar-items) tables into the configured database.

    The URI comes from ``$<cfg.uri_env>``, else ``cfg.uri``, else SQLite ``<root>/recommendations.db``. The
    returned record holds the URI redacted, never the secret.
    """
    from recsys_embed.errors import ConfigError
    from recsys_embed.serving.dbexport import export_table, redact, resolve_uri

    uri = cfg.uri
    if cfg.uri_env:
        uri = os.environ.get(cfg.uri_env) or None
        if uri is None:
            raise ConfigError(
                f"export.database.uri_env names ${cfg.uri_env}, which is unset or empty; export it "
                "(e.g. postgresql://user:password@host:5432/db) or set export.database.uri"
            )
    uri = resolve_uri(uri or f"sqlite:///{(Path(root) / 'recommendations.db').resolve().as_posix()}")
    record: DatabaseRecord = {"uri": redact(uri), "model": export["model"], "model_version": model_version,
                              "tables": {}}  # fmt: skip
    res = export_table(export["topk"], uri, cfg.topk_table, model_version, cfg.batch_rows, ("user_id", "rank"))
    record["tables"][cfg.topk_table] = res.rows
    checkpoint("db-export")  # the top-k table is swapped in, the similar-items table not yet
    if export.get("similar_items"):
        res = export_table(export["similar_items"], uri, cfg.similar_table, model_version, cfg.batch_rows,
                           ("item_id", "rank"))  # fmt: skip
        record["tables"][cfg.similar_table] = res.rows
    record["run_id"] = run_id
    return record


# Config fields of a model slice that say where and how fast it runs, or what it logs, not what model it fits:
# threads, devices, distributed layout, numeric precision, data loader workers, checkpoint folders, progress bars,
# loss logging and the memory/size guards. They stay out of the recipe (the same recipe on a GPU box or a laptop
# is the same recipe) and a champion recipe's re-fit takes this run's values of them.
MACHINE_SETTINGS = frozenset({
    "use_gpu", "num_threads", "blas_threads", "accelerator", "devices", "strategy", "num_nodes", "precision",
    "num_workers", "artifact_dir", "progress_bar", "training_loss", "max_items", "max_memory_gb",
})  # fmt: skip


def recipe(name: str, models_cfg: ModelsConfig) -> tuple[str, str]:
    """(hash, JSON) of model ``name``'s recipe: its family and config slice (hyperparameters, seed, iteration and
    time budget), without ``MACHINE_SETTINGS``."""
    slice_cfg = getattr(models_cfg, name)
    config = json.dumps(slice_cfg.model_dump(mode="json", exclude=set(MACHINE_SETTINGS)), sort_keys=True)
    return content_hash({"model": name, "config": config}), config


def recipe_config(name: str, recipe_json: str, models_cfg: ModelsConfig) -> ModelsConfig:
    """``models_cfg`` with model ``name``'s slice rebuilt from a recipe's JSON (``recipe``) and this run's
    ``MACHINE_SETTINGS`` (a recipe recorded with them, before they were left out, runs on this machine's)."""
    here = getattr(models_cfg, name)
    fields = {**json.loads(recipe_json), **here.model_dump(mode="json", include=set(MACHINE_SETTINGS))}
    return models_cfg.model_copy(update={name: type(here).model_validate(fields)})


def data_identity(fingerprint: str, ingest_cfg: IngestConfig, trained_on: Mapping[str, Any]) -> dict[str, str]:
    """The events a shipped model was trained on, as version tags (strings; "None" where unknown).

    Not just the input files' fingerprint (``data_fingerprint``): the same files read with another window are
    other data. So also the window the ingest reads (``data_until`` = ``ingest.until``, ``data_window_start`` /
    ``data_window_end``) and the kept-event range of the training data (``training_window_first`` /
    ``training_window_last``, ``training_rows``, ``training_fit``: which events: ``trained_on["fit"]``);
    ``data_identity`` hashes all of them. "Newer data" is a later ``training_window_last``.

    Args:
        fingerprint: ``IngestRecord.fingerprint`` (content of the source files).
        trained_on: an export's ``trained_on`` (``window``: first/last event or None, ``rows``, ``fit``).
    """

    def iso(t: Any) -> str:
        return t.isoformat() if t is not None else "None"

    window = trained_on.get("window") or {}
    tags = {
        "data_fingerprint": fingerprint,
        "data_until": iso(ingest_cfg.until),
        "data_window_start": iso(ingest_cfg.window_start),
        "data_window_end": iso(ingest_cfg.window_end),
        "training_window_first": str(window.get("first")),
        "training_window_last": str(window.get("last")),
        "training_rows": str(trained_on.get("rows")),
        "training_fit": str(trained_on.get("fit") or "all kept events"),
    }
    return {**tags, "data_identity": content_hash(tags)}


def evaluation_windows(split_info: Mapping[str, Any], window: Mapping[str, Any] | None) -> dict[str, str]:
    """Where a recipe's held-out metrics were measured, as version tags ``fit_window``, ``validation_window`` and
    ``test_window``: date ranges for a temporal split (``split_info``: ``SplitRecord.split``, its ``cutoff`` /
    ``val_cutoff``; ``window``: the log's first and last kept event, or None), the per-user rule otherwise."""
    first = (window or {}).get("first") or "the first event"
    last = (window or {}).get("last") or "the last event"
    rows = {k: split_info.get(f"rows_{k}") for k in ("fit", "val", "test")}

    def n(key: str) -> str:
        return f" ({rows[key]:,} rows)" if isinstance(rows[key], int) else ""

    cut, val_cut = split_info.get("cutoff"), split_info.get("val_cutoff")
    if cut is None:
        rule = f"per user ({split_info.get('method')} split: each user's latest events)"
        return {"fit_window": f"every user's earlier events{n('fit')}", "validation_window": f"{rule}{n('val')}",
                "test_window": f"{rule}{n('test')}"}  # fmt: skip
    return {
        "fit_window": f"[{first}, {val_cut or cut}){n('fit')}",
        "validation_window": f"[{val_cut}, {cut}){n('val')}" if val_cut else "none",
        "test_window": f"[{cut}, {last}]{n('test')}",
    }


def run_key(data: Mapping[str, str] | str, config: dict[str, Any]) -> str:
    """Hash of the data identity (``data_identity``'s tags, or a bare fingerprint) and the config that shapes the
    registered model (``model_settings``; any JSON-able config works): an identical run has the same key."""
    return content_hash({"data": data if isinstance(data, str) else dict(data), "config": config})


def model_settings(cfg: PipelineConfig, best: str, models_cfg: ModelsConfig) -> dict[str, Any]:
    """The settings the registered model of ``best`` is a function of, for ``run_key``: its recipe (the tuned
    hyperparameters, ``recipe``), how events are read and weighted (``ingest``, without the source path: the data
    identity holds the files' content), the windows and metric that choose it and its iteration count
    (``split``, ``eval``), ``seed``, and what the model serves (``export.allow_items`` / ``deny_items`` /
    ``refit``, ``registry.default_k``).

    Everything else changes nothing registered, so a run that differs only there (a schedule, incremental
    ingest, output folder, Dask, a database export, the search budget ``tuning.*`` when it finds the same recipe,
    the champion rule's ``margin`` / ``z``, machine settings) is an identical run and registers nothing."""
    ingest = cfg.ingest.model_dump(mode="json")
    ingest["source"] = {k: v for k, v in ingest["source"].items() if k != "path"}
    return {
        "model": best,
        "recipe": recipe(best, models_cfg)[0],
        "ingest": ingest,
        "split": cfg.split.model_dump(mode="json"),
        "eval": cfg.eval.model_dump(mode="json"),
        "seed": cfg.seed,
        "export": cfg.export.model_dump(mode="json", include={"allow_items", "deny_items", "refit"}),
        "default_k": cfg.registry.default_k,
    }


def run_register(
    settings: MlflowSettings,
    candidate: Candidate,
    export_cfg: ExportConfig,
    cfg: RegistryConfig,
    eval_cfg: EvalConfig,
    name: str,
    split: SplitRecord | None = None,
    validations: dict[str, ValidationRecord] | None = None,
    models_cfg: ModelsConfig | None = None,
    work_dir: Path | None = None,
    cache_root: Path | None = None,
) -> RegistryDecision:
    """Register the shipped best model under ``name`` (``registry.register_best``); the decision record.

    The champion's recipe is judged on this run's validation window, fitted on this run's fit window: taken from
    this run's own evaluation when one of its models has the same recipe (``validations``), otherwise re-fitted
    from the champion version's ``recipe_config`` tag (cached like any training). The champion model itself is
    never scored on this run's windows, which it may have been trained on.

    Not cached, and one step across a kill (``register_best``): a re-run with the same data identity and config
    registers nothing and completes the decision the killed run recorded on its version (or judges that version
    again when the champion moved since).
    """
    from recsys_embed.serving.registry import ChampionScore, register_best, same_recipe

    def judge(tags: dict[str, str]) -> ChampionScore | None:
        if split is None or models_cfg is None or not tags.get("recipe"):
            return None
        for m, v in (validations or {}).items():
            if (p := v["per_user"]) and same_recipe(m, *recipe(m, models_cfg), tags):
                return ChampionScore(float(v["metrics"][eval_cfg.primary_metric]), np.load(p),
                                     f"its recipe is this run's {m}: fitted on this run's fit window, scored on its "
                                     "validation window")  # fmt: skip
        champ_model = tags.get("model", "")
        try:
            champ_cfg = recipe_config(champ_model, tags["recipe_config"], models_cfg)
            champ_cfg = champ_cfg.model_copy(update={"warm_start": False})
            folder = Path(work_dir or ".") / "champion_recipe"
            trained = run_train(champ_model, split, champ_cfg, eval_cfg, folder, cache_root=cache_root)
            v = run_validate(trained, split, eval_cfg, folder)
        except Exception as e:  # an unreproducible recipe must not block registering the new version
            log.warning("registry: the champion's recipe (%s) could not be re-fitted on this run's fit window (%s); "
                        "comparing stored validation metrics", champ_model, str(e).splitlines()[0])  # fmt: skip
            return None
        if not (p := v["per_user"]):
            return None
        return ChampionScore(float(v["metrics"][eval_cfg.primary_metric]), np.load(p),
                             "its recipe re-fitted on this run's fit window, scored on its validation window")

    if candidate.item_text is None and split is not None and split.get("item_text"):
        from dataclasses import replace

        candidate = replace(candidate, item_text=split["item_text"])  # the served model answers with item texts
    decision = register_best(settings, candidate, export_cfg, cfg, eval_cfg.primary_metric, judge, name)
    return cast(RegistryDecision, decision)


def shipped_models(wanted: list[str], best: str | None, trained: list[str]) -> list[str]:
    """The models whose tables are shipped (``export.models``: "best", "all" or model names), in order, each once."""
    out: list[str] = []
    for w in wanted:
        names = trained if w == "all" else [best] if w == "best" else [w]
        for n in names:
            if n is None:
                log.warning("export.models names 'best', but nothing was selected (no validation window); "
                            "enable split.val_quantile or name the model to ship")  # fmt: skip
            elif n not in trained:
                log.warning("export.models names %r, which this run did not train (enabled: %s); skipped", n, trained)
            elif n not in out:
                out.append(n)
    return out


CURRENT = "current"  # <root>/current -> runs/<run>/exports/<champion model>: the tables downstream readers load
CHAMPION_FILE = "champion.json"


def run_publish(root: Path, export: ExportRecord, decision: RegistryDecision | None) -> PublishRecord:
    """Point the pipeline's stable paths at the champion's tables; the record of what they point at.

    ``<root>/champion.json`` names the champion's run, model, registered version and table paths, and the
    symbolic link ``<root>/current`` points at its exports folder (``current/topk/``, ``current/similar_items/``);
    each is replaced atomically, the pointer first. They follow the registry's ``champion`` alias: when this run's
    version holds it (``decision["alias"]``) the pointer names it, re-written with this run's tables unless it
    already names that version with committed tables (an unchanged champion stays on the tables it was published
    with); on every run when the registry is off (``decision`` None); a challenger leaves them on the champion.
    Either way ``current`` is then made to agree with the pointer, so a re-run completes a publish that a kill
    interrupted between the two (``checkpoint("publish:champion")``).

    Returns ``{"moved", "export", "version", "model", "run_dir", "champion_file", "current"}`` for the champion
    (``export``: its export record, which the database export serves; ``moved``: the pointer was re-written).

    Raises:
        RecsysEmbedError: this run's version is the challenger and ``champion.json`` is missing, so the champion's
            tables are not known here (its alias was moved from another output folder, or the file was deleted).
    """
    from recsys_embed.errors import RecsysEmbedError
    from recsys_embed.io import is_complete_table

    root = Path(root)
    pointer = root / CHAMPION_FILE
    link = root / CURRENT
    published: PublishRecord | None = json.loads(pointer.read_text(encoding="utf-8")) if pointer.exists() else None
    champion = decision is None or decision.get("alias") == "champion"
    moves = champion and not (
        decision is not None and published is not None
        and str(published.get("version")) == str(decision["version"])
        and published.get("registered_model") == decision["name"]
        and bool(published.get("topk_path")) and is_complete_table(published["topk_path"])
    )  # fmt: skip
    if moves:
        record: PublishRecord = {
            "model": export["model"],
            "version": decision["version"] if decision else None,
            "registered_model": decision["name"] if decision else None,
            "run_dir": export.get("run_dir"),
            "export": {k: export.get(k) for k in ("model", "topk", "topk_rows", "topk_users", "similar_items",
                                                  "similar_rows", "fallback_users", "model_users")},
            # absolute: downstream readers open them from anywhere
            "topk_path": str(Path(export["topk"]).resolve()),
            "trained_on": export.get("trained_on"),
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }  # fmt: skip
        if similar := export.get("similar_items"):
            record["similar_items_path"] = str(Path(similar).resolve())
        write_json_atomic(record, pointer)
        checkpoint("publish:champion")  # champion.json names the new champion, current/ not moved yet
    elif published is not None:
        record = published
        log.info("publish: the champion stays v%s (%s)", record.get("version"), record.get("model"))
    else:
        assert decision is not None  # champion is True without a decision
        raise RecsysEmbedError(
            f"{pointer} is missing and this run's v{decision['version']} is the challenger, so the champion's "
            f"(v{decision.get('previous_champion')}) tables are unknown in {root}: its alias was moved by a run of "
            "another output folder, or the file was deleted. Re-run that folder's pipeline, or move the champion "
            "alias to a version this folder published"
        )
    target = Path(record["topk_path"]).parent
    if not (link.is_symlink() and link.resolve() == target.resolve()):
        tmp = link.with_name(f".{CURRENT}.tmp-{os.urandom(4).hex()}")
        os.symlink(os.path.relpath(target, root), tmp)
        os.replace(tmp, link)
        log.info("publish: %s -> %s (%s%s)", link, target, record["model"],
                 f" v{record['version']}" if record.get("version") else "")  # fmt: skip
    return {**record, "moved": moves, "champion_file": str(pointer.resolve()), "current": str(link)}
