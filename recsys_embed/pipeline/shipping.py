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
from pathlib import Path
from typing import Any, cast

import numpy as np

from recsys_embed.config import (
    DatabaseExportConfig,
    EvalConfig,
    ExportConfig,
    MlflowSettings,
    ModelsConfig,
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
    record's ``similar_embeddings`` (the refit model behind served vectors) feeds the similar items.
    """
    from recsys_embed.serving.export import export_topk

    emb = load_embeddings(model["embeddings"])
    seen = load_csr(split["train"])
    folder = Path(out_dir) / model["model"]
    topk = export_topk(emb, seen, cfg, folder, run_id)
    record: ExportRecord = {"model": model["model"], "topk": topk.path, "topk_rows": topk.rows,
                            "topk_users": topk.users}  # fmt: skip
    record.update(search_quality(emb, seen, cfg))
    checkpoint(f"export:{model['model']}")  # mid-export: top-k committed, similar items not written yet
    record.update(run_export_similar(model, cfg, out_dir, run_id))
    return record


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
    return cast(ShardRecord, asdict(export_topk_shard(emb, seen, cfg, ShardPlan.from_dict(dict(plan)), index, run_id)))


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


def run_export_similar(model: ModelRecord, cfg: ExportConfig, out_dir: Path, run_id: str) -> SimilarRecord:
    """The similar-items table of ``run_export`` alone (empty record for popularity, which has none)."""
    from recsys_embed.serving.export import export_similar_items

    emb = load_embeddings(model.get("similar_embeddings") or model["embeddings"])
    if emb.dim <= 1:  # popularity has no meaningful item-item similarity
        return {}
    sim = export_similar_items(emb, cfg, Path(out_dir) / model["model"], run_id)
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


def recipe(name: str, models_cfg: ModelsConfig) -> tuple[str, str]:
    """(hash, JSON) of model ``name``'s recipe: its family and config slice (hyperparameters, seed, budget)."""
    config = json.dumps(getattr(models_cfg, name).model_dump(mode="json"), sort_keys=True)
    return content_hash({"model": name, "config": config}), config


def run_key(fingerprint: str, config: dict[str, Any]) -> str:
    """Hash of the data fingerprint and the whole config: an identical re-run has the same key."""
    return content_hash({"data": fingerprint, "config": config})


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

    Not cached: a re-run after a kill registers again unless its data and config are identical (no churn).
    """
    from recsys_embed.serving.registry import ChampionScore, register_best

    def judge(tags: dict[str, str]) -> ChampionScore | None:
        if split is None or models_cfg is None or not tags.get("recipe"):
            return None
        for m, v in (validations or {}).items():
            if (p := v["per_user"]) and recipe(m, models_cfg)[0] == tags["recipe"]:
                return ChampionScore(float(v["metrics"][eval_cfg.primary_metric]), np.load(p),
                                     f"its recipe is this run's {m}: fitted on this run's fit window, scored on its "
                                     "validation window")  # fmt: skip
        champ_model = tags.get("model", "")
        try:
            slice_cfg = type(getattr(models_cfg, champ_model)).model_validate_json(tags["recipe_config"])
            champ_cfg = models_cfg.model_copy(update={champ_model: slice_cfg, "warm_start": False})
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

    decision = register_best(settings, candidate, export_cfg, cfg, eval_cfg.primary_metric, judge, name)
    checkpoint("register")  # the version is registered, the run has not finished
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
    both are replaced atomically. They move when this run's model is promoted, or on every run when the registry is
    off (``decision`` None); a challenger leaves them on the champion. Returns ``{"moved", "export", "version",
    "model", "run_dir", "champion_file", "current"}`` for the champion (``export``: its export record, which the
    database export serves).
    """
    root = Path(root)
    pointer = root / CHAMPION_FILE
    link = root / CURRENT
    moves = decision is None or bool(decision.get("promoted"))
    if not moves and not pointer.exists():
        moves = decision is not None and decision.get("alias") == "champion"  # unchanged champion, pointer lost
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
        target = Path(record["export"]["topk"]).parent
        tmp = link.with_name(f".{CURRENT}.tmp-{os.urandom(4).hex()}")
        os.symlink(os.path.relpath(target, root), tmp)
        os.replace(tmp, link)
        log.info("publish: %s -> %s (%s%s)", link, target, record["model"],
                 f" v{record['version']}" if record["version"] else "")  # fmt: skip
    else:
        record = json.loads(pointer.read_text(encoding="utf-8"))
        log.info("publish: the champion stays v%s (%s); %s still points at its tables", record.get("version"),
                 record.get("model"), link)  # fmt: skip
    return {**record, "moved": moves, "champion_file": str(pointer.resolve()), "current": str(link)}
