"""The MLflow Model Registry: the second (and last) module that imports mlflow, beside ``tracking``.

A run's best model is registered as a pyfunc recommender (``Recommender``) that bundles the user and item
vectors (their Parquet files double as the ID maps), the train matrix used as the seen-item filter, and the
export's item allow/deny lists. It answers with the same scorer as the exported top-k table
(``topk.iter_topk``), so for any user the two agree.

Aliases: ``champion`` moves to the new version only when its metric beats the champion's by more than the
configured margin; otherwise the new version becomes ``challenger`` and the decision says why. Each version
carries its metric as tags (``metric``, ``metric_value``), so the comparison needs no run lookup.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
from mlflow.pyfunc.model import PythonModel

from recsys_embed.config import ExportConfig, MlflowSettings, RegistryConfig
from recsys_embed.errors import RecsysEmbedError
from recsys_embed.types import Candidate

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
ARTIFACT_PATH = "recommender"


class RegistryError(RecsysEmbedError):
    """The registry has no such model or alias (names it and the fix)."""


class Recommender(PythonModel):
    """Top-k recommender over bundled embeddings.

    Input: a DataFrame with a ``user_id`` column (strings; cast to the model's ID type).
    Params: ``k`` (default: the registry's ``default_k``).
    Output: one row per input user: ``user_id`` (string), ``item_ids`` (list of strings, best first),
    ``scores`` (list of floats). Unknown (cold) users get empty lists. Train-seen items are never returned.
    """

    def load_context(self, context: Any) -> None:
        from recsys_embed.export import _item_filters
        from recsys_embed.store import load_csr, load_embeddings

        self.emb = load_embeddings(context.artifacts["embeddings"])
        self.seen = load_csr(context.artifacts["seen"])
        meta = json.loads(Path(context.artifacts["meta"]).read_text(encoding="utf-8"))
        self.export_cfg = ExportConfig.model_validate(meta["export"])
        self.default_k = int(meta["default_k"])
        self.allow, self.deny = _item_filters(self.emb, self.export_cfg)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from recsys_embed.topk import iter_topk

        k = int((params or {}).get("k") or self.default_k)
        raw = [str(u) for u in pd.DataFrame(model_input)["user_id"].tolist()]
        idx = self.emb.users.lookup(pl.Series("user_id", raw, dtype=pl.String))
        known = np.unique(idx.drop_nulls().to_numpy().astype(np.int64))
        answers: dict[int, tuple[list[str], list[float]]] = {}
        for chunk in iter_topk(self.emb, k, users=known, seen=self.seen, chunk_users=self.export_cfg.chunk_users,
                               allow_items=self.allow, deny_items=self.deny):  # fmt: skip
            for row, u in enumerate(chunk.users):
                ok = chunk.items[row] >= 0
                items = self.emb.items.decode(chunk.items[row][ok]).cast(pl.String).to_list()
                answers[int(u)] = (items, [float(s) for s in chunk.scores[row][ok]])
        out = [answers.get(int(i), ([], [])) if i is not None else ([], []) for i in idx.to_list()]
        return pd.DataFrame({"user_id": raw, "item_ids": [a for a, _ in out], "scores": [b for _, b in out]})


def _signature(default_k: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id")]),
        outputs=Schema(
            [ColSpec("string", "user_id"), ColSpec(Array("string"), "item_ids"), ColSpec(Array("double"), "scores")]
        ),
        params=ParamSchema([ParamSpec("k", "long", default_k)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "numpy", "pandas", "polars", "scipy", "pydantic")]


def _client(settings: MlflowSettings) -> Any:
    from mlflow import MlflowClient

    from recsys_embed.tracking import resolve_settings

    uri = resolve_settings(settings).tracking_uri
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def decide(new_value: float, champion_value: float | None, margin: float) -> tuple[bool, str]:
    """(promote?, why) for a new metric value against the champion's (None: there is no champion yet)."""
    if champion_value is None:
        return True, "no champion yet"
    if new_value > champion_value + margin:
        return True, f"{new_value:.4f} beats the champion's {champion_value:.4f} by more than {margin:g}"
    return False, f"{new_value:.4f} does not beat the champion's {champion_value:.4f} by more than {margin:g}"


@dataclass(frozen=True)
class ChampionScore:
    """The champion's recipe as this run judged it: fitted on this run's fit window, scored on its validation
    window (``per_user`` over the same users as the candidate's), never on events it was trained on."""

    value: float
    per_user: np.ndarray | None
    basis: str


def decide_paired(
    new: np.ndarray, champion: np.ndarray, margin: float, z: float
) -> tuple[bool, str, dict[str, float]]:
    """(promote?, why, stats) for two per-user metric arrays over the same validation users.

    Promote when the mean gain exceeds ``margin`` and ``z`` paired standard errors (a one-sided paired test).
    """
    from recsys_embed.selection import paired_se

    gain = float(np.mean(new) - np.mean(champion)) if new.size else 0.0
    se = paired_se(new, champion)
    stats = {"gain": gain, "se": se, "users": float(new.size)}
    need = max(margin, z * se if se == se else 0.0)
    if gain > need:
        return True, f"gains {gain:+.4f} over the champion's recipe ({gain / se:.1f} paired SE over {new.size:,} " \
                     f"users; needs > {need:.4f})", stats  # fmt: skip
    return False, f"gains {gain:+.4f} over the champion's recipe, within the noise or margin (needs > {need:.4f}: " \
                  f"margin {margin:g}, {z:g} paired SE = {z * se:.4f} over {new.size:,} users)", stats  # fmt: skip


def _existing_version(client: Any, name: str, run_key: str) -> Any | None:
    """The version already registered for this data fingerprint and config (an identical re-run), or None."""
    if not run_key:
        return None
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("run_key") == run_key:
            return mv
    return None


def register_best(
    settings: MlflowSettings,
    candidate: Candidate,
    export_cfg: ExportConfig,
    cfg: RegistryConfig,
    primary_metric: str,
    judge: Callable[[dict[str, str]], ChampionScore | None] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Register ``candidate`` under ``name`` (one registered model per pipeline) and move ``champion`` or
    ``challenger``: honestly, without leakage, without churn.

    - An identical re-run (same ``run_key``: data fingerprint + config) registers nothing and says which version
      already holds it.
    - The same recipe as the champion's (refit on newer data) replaces it: it was judged equal and has seen more.
    - Another recipe must beat the champion's recipe on this run's validation window, both fitted on this run's
      fit window (``judge``: the champion version's tags -> its ``ChampionScore``), by more than ``cfg.margin``
      and ``cfg.z`` paired standard errors. The champion model itself (fitted on everything up to its own run)
      is never scored: every window this run could score it on, it has seen.
    - Without a usable judge the stored validation metrics of the two runs are compared, and the decision says
      that basis.

    Returns:
        The decision record: ``name``, ``version``, ``alias``, ``promoted``, ``registered``, ``reason``, ``metric``,
        ``value``, ``margin``, ``previous_champion``, ``champion_value``, ``champion_basis``, ``uri``.
    """
    metric = cfg.metric or primary_metric
    val_metric = f"val_{metric}"
    if val_metric not in candidate.metrics:
        raise RegistryError(
            f"registry.metric {metric!r} has no validation value among the model's metrics "
            f"({sorted(candidate.metrics)}); choose a metric eval.ks produces"
        )
    value = float(candidate.metrics[val_metric])
    client = _client(settings)
    name = name or settings.registered_model_name
    champ = _alias_version(client, name, CHAMPION)
    same = _existing_version(client, name, candidate.run_key)
    if same is not None:
        alias = CHAMPION if champ is not None and str(champ.version) == str(same.version) else CHALLENGER
        reason = f"unchanged: v{same.version} already holds this data fingerprint and config; nothing registered"
        log.info("registry: %s %s", name, reason)
        return {"name": name, "version": str(same.version), "alias": alias, "promoted": False, "registered": False,
                "reason": reason, "metric": metric, "value": value, "margin": cfg.margin,
                "previous_champion": str(champ.version) if champ is not None else None, "champion_value": None,
                "champion_basis": None, "uri": f"models:/{name}/{same.version}"}  # fmt: skip

    mv = _log_version(client, name, candidate, export_cfg, cfg, metric, value)
    champ_value: float | None = None
    basis: str | None = None
    stats: dict[str, float] = {}
    if champ is None:
        promote, reason = True, "no champion yet"
    elif candidate.recipe and champ.tags.get("recipe") == candidate.recipe:
        promote = True
        reason = f"same recipe as champion v{champ.version} ({champ.tags.get('model')}), refit on newer data"
        basis = "same recipe"
    else:
        score = judge(dict(champ.tags)) if judge is not None else None
        mine = np.load(candidate.val_per_user) if candidate.val_per_user else None
        if score is not None and score.per_user is not None and mine is not None and mine.shape == score.per_user.shape:
            champ_value, basis = score.value, score.basis
            promote, reason, stats = decide_paired(mine, score.per_user, cfg.margin, cfg.z)
        else:
            stored = champ.tags.get("metric_value") if champ.tags.get("metric") == metric else None
            champ_value = float(stored) if stored is not None else None
            basis = "stored validation metric of its own run (another window: a weaker comparison)"
            promote, reason = decide(value, champ_value, cfg.margin)
        reason = f"{reason} (champion v{champ.version} {champ.tags.get('model')}: {basis})"
    alias = CHAMPION if promote else CHALLENGER
    client.set_registered_model_alias(name, alias, mv.version)
    client.set_model_version_tag(name, mv.version, "decision", reason)
    decision = {
        "name": name,
        "version": str(mv.version),
        "alias": alias,
        "promoted": promote,
        "registered": True,
        "reason": reason,
        "metric": metric,
        "value": value,
        "margin": cfg.margin,
        "previous_champion": str(champ.version) if champ is not None else None,
        "champion_value": champ_value,
        "champion_basis": basis,
        "paired": stats or None,
        "uri": f"models:/{name}/{mv.version}",
    }
    log.info("registry: %s v%s is %s (%s)", name, mv.version, alias, reason)
    return decision


def _log_version(
    client: Any, name: str, candidate: Candidate, export_cfg: ExportConfig, cfg: RegistryConfig, metric: str,
    value: float,
) -> Any:
    """Log ``candidate`` as a pyfunc recommender on its model run and register it as a new version of ``name``."""
    with tempfile.TemporaryDirectory(prefix="recsys-pyfunc-") as tmp:
        meta = Path(tmp) / "meta.json"
        meta.write_text(json.dumps({"export": export_cfg.model_dump(mode="json"), "default_k": cfg.default_k}))
        local = Path(tmp) / ARTIFACT_PATH
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=Recommender(),
            artifacts={"embeddings": candidate.embeddings, "seen": candidate.seen, "meta": str(meta)},
            signature=_signature(cfg.default_k),
            pip_requirements=_requirements(),
        )
        client.log_artifacts(candidate.model_run_id, str(local), ARTIFACT_PATH)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="recsys-embed top-k recommender (pyfunc)")
    run = client.get_run(candidate.model_run_id)
    tags = {
        **candidate.tags,
        "metric": metric,
        "metric_value": repr(value),
        "metric_basis": "validation window of its run (evaluation fit)",
        "model": candidate.model,
        "pipeline_run_id": candidate.pipeline_run_id,
        "recipe": candidate.recipe,
        "recipe_config": candidate.recipe_config[:4900],
        "run_key": candidate.run_key,
    }
    test_value = candidate.metrics.get(f"test_{metric}")
    if test_value is not None:
        tags["test_metric_value"] = repr(float(test_value))
    return client.create_model_version(name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}",
                                       run_id=candidate.model_run_id, tags=tags)  # fmt: skip


def load_recommender(settings: MlflowSettings, alias: str = CHAMPION, name: str | None = None) -> Any:
    """The pyfunc model behind ``models:/<name>@<alias>`` (``name``: the pipeline's registered model)."""
    from mlflow.exceptions import MlflowException

    _client(settings)
    uri = f"models:/{name or settings.registered_model_name}@{alias}"
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as e:
        raise RegistryError(
            f"cannot load {uri}: {str(e).splitlines()[0]}; run `recsys-embed run` for this config first "
            "(registry.enabled=true)"
        ) from None


def recommend(
    settings: MlflowSettings, users: list[str], k: int, alias: str = CHAMPION, name: str | None = None
) -> pd.DataFrame:
    """Top-k for ``users`` from the registered model under ``alias``."""
    model = load_recommender(settings, alias, name)
    return pd.DataFrame(model.predict(pd.DataFrame({"user_id": users}), params={"k": k}))
