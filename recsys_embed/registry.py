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
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
from mlflow.pyfunc.model import PythonModel

from recsys_embed.config import ExportConfig, MlflowSettings, RegistryConfig
from recsys_embed.errors import RecsysEmbedError
from recsys_embed.types import Candidate, Embeddings

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


def register_best(
    settings: MlflowSettings,
    candidate: Candidate,
    export_cfg: ExportConfig,
    cfg: RegistryConfig,
    primary_metric: str,
    rescore: Callable[[Embeddings], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Log ``candidate`` as a pyfunc recommender on its model run, register a new version, and move ``champion``
    or ``challenger``.

    With ``rescore`` (``compare.rescore`` bound to this run's split), the champion is evaluated on this run's
    test window and compared on that; without it (or if the champion cannot be loaded) its stored metric is used.
    The decision says which (``champion_basis``).

    Returns:
        The decision record: ``name``, ``version``, ``alias`` (champion | challenger), ``promoted``, ``reason``,
        ``metric``, ``value``, ``previous_champion`` (version or None), ``uri`` (``models:/name/version``).
    """
    metric = cfg.metric or primary_metric
    model, model_run_id, metrics = candidate.model, candidate.model_run_id, candidate.metrics
    if metric not in metrics:
        raise RegistryError(f"registry.metric {metric!r} is not among the model's metrics ({sorted(metrics)})")
    value = float(metrics[metric])
    client = _client(settings)
    name = settings.registered_model_name
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
        client.log_artifacts(model_run_id, str(local), ARTIFACT_PATH)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="recsys-embed top-k recommender (pyfunc)")
    run = client.get_run(model_run_id)
    mv = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}",
        run_id=model_run_id,
        tags={
            "metric": metric,
            "metric_value": repr(value),
            "model": model,
            "pipeline_run_id": candidate.pipeline_run_id,
        },
    )
    champ = _alias_version(client, name, CHAMPION)
    champ_value = None
    basis = None
    if champ is not None and rescore is not None:
        try:
            champ_emb = mlflow.pyfunc.load_model(f"models:/{name}/{champ.version}").unwrap_python_model().emb
            champ_value = float(rescore(champ_emb)[metric])
            basis = "re-scored on this run's test window"
        except Exception as e:  # an unloadable old version must not block registering the new one
            log.warning("registry: champion v%s could not be re-scored on this split (%s); comparing with its "
                        "stored %s", champ.version, str(e).splitlines()[0], metric)  # fmt: skip
    if champ is not None and basis is None:
        if champ.tags.get("metric") == metric and "metric_value" in champ.tags:
            champ_value = float(champ.tags["metric_value"])
            basis = "stored metric from its own run's test window"
        else:
            log.warning("registry: champion v%s has no %s tag; the new version is compared as if none",
                        champ.version, metric)  # fmt: skip
    promote, reason = decide(value, champ_value, cfg.margin)
    if basis is not None:
        reason = f"{reason} (champion v{champ.version} {basis})"  # type: ignore[union-attr]
    alias = CHAMPION if promote else CHALLENGER
    client.set_registered_model_alias(name, alias, mv.version)
    client.set_model_version_tag(name, mv.version, "decision", reason)
    decision = {
        "name": name,
        "version": str(mv.version),
        "alias": alias,
        "promoted": promote,
        "reason": reason,
        "metric": metric,
        "value": value,
        "margin": cfg.margin,
        "previous_champion": str(champ.version) if champ is not None else None,
        "champion_value": champ_value,
        "champion_basis": basis,
        "uri": f"models:/{name}/{mv.version}",
    }
    log.info("registry: %s v%s is %s (%s)", name, mv.version, alias, reason)
    return decision


def load_recommender(settings: MlflowSettings, alias: str = CHAMPION) -> Any:
    """The pyfunc model behind ``models:/<registered_model_name>@<alias>``."""
    from mlflow.exceptions import MlflowException

    _client(settings)
    uri = f"models:/{settings.registered_model_name}@{alias}"
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as e:
        raise RegistryError(
            f"cannot load {uri}: {str(e).splitlines()[0]}; run `recsys-embed run` first (registry.enabled=true)"
        ) from None


def recommend(settings: MlflowSettings, users: list[str], k: int, alias: str = CHAMPION) -> pd.DataFrame:
    """Top-k for ``users`` from the registered model under ``alias``."""
    return pd.DataFrame(load_recommender(settings, alias).predict(pd.DataFrame({"user_id": users}), params={"k": k}))
