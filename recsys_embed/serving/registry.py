"""The MLflow Model Registry: the second (and last) module that imports mlflow, beside ``tracking``.

A run's best model is logged with MLflow 3's own API (``mlflow.pyfunc.log_model`` inside the model's run, so a
LoggedModel exists, carries the run's params and metrics, and is registered as a new version) as the standalone
recommender of ``serving.served_model``: models-from-code, numpy/pandas/pyarrow/scipy only, with a bundle of
the served vectors, ID maps, seen filter, fallback flags, item popularity and admissible items. It loads and
answers in a virtualenv built from the model's own ``requirements.txt``, without recsys-embed, and ranks exactly
like the exported top-k table (``topk.iter_topk``).

Aliases: ``champion`` moves to the new version only when its metric beats the champion's by more than the
configured margin; otherwise the new version becomes ``challenger`` and the decision says why. Each version
carries its metric as tags (``metric``, ``metric_value``), so the comparison needs no run lookup.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp
from mlflow.pyfunc.model import PythonModel

from recsys_embed.config import ExportConfig, MlflowSettings, RegistryConfig
from recsys_embed.errors import RecsysEmbedError
from recsys_embed.types import Candidate, Embeddings, IdMap

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
ARTIFACT_PATH = "recommender"
# What the served model imports (recsys_embed/serving/served_model.py): its requirements.txt pins these, nothing else.
SERVED_REQUIREMENTS = ("mlflow", "numpy", "pandas", "pyarrow", "scipy")


class RegistryError(RecsysEmbedError):
    """The registry has no such model or alias (names it and the fix)."""


@dataclass(frozen=True)
class ServedInputs:
    """What the registered recommender serves.

    Attributes:
        embeddings: the served vectors and ID maps (scored by ``scoring_vectors()``: dot, or cosine normalised).
        seen: CSR (users x items of ``embeddings``' maps): stored entries are never recommended; for ALS its values
            are the confidence that a ``history`` fold-in starts from.
        fallback: bool per user index, True where the user's rows come from the popularity fallback
            (``source="fallback"``); None: no user is.
        popularity: float per item index, the answer for users the model does not know; None: distinct users per
            item in ``seen``.
        fold_in: ``{"alpha": ..., "regularization": ...}`` for ALS (enables the ``history`` fold-in); None: off.
    """

    embeddings: Embeddings
    seen: sp.csr_matrix
    fallback: np.ndarray | None = None
    popularity: np.ndarray | None = None
    fold_in: dict[str, float] | None = None


class Recommender(PythonModel):
    """Legacy (before the standalone model): kept so that versions pickled as this class still load (and their
    champion can be re-scored) where recsys-embed is installed. New versions use ``served_model``."""

    def load_context(self, context: Any) -> None:
        from recsys_embed.serving.export import _item_filters
        from recsys_embed.store import load_csr, load_embeddings

        self.emb = load_embeddings(context.artifacts["embeddings"])
        self.seen = load_csr(context.artifacts["seen"])
        meta = json.loads(Path(context.artifacts["meta"]).read_text(encoding="utf-8"))
        self.export_cfg = ExportConfig.model_validate(meta["export"])
        self.default_k = int(meta["default_k"])
        self.allow, self.deny = _item_filters(self.emb, self.export_cfg)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from recsys_embed.evaluation.topk import iter_topk

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


def _signature(default_k: int, item_ids: pl.Series) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema

    item_type = "long" if item_ids.dtype.is_integer() else "string"
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "user_id"), ColSpec(Array(AnyType()), "history", required=False)]),
        outputs=Schema([
            ColSpec(AnyType(), "user_id"),
            ColSpec(Array(item_type), "item_ids"),
            ColSpec(Array("double"), "scores"),
            ColSpec("string", "source"),
        ]),
        params=ParamSchema([ParamSpec("k", "long", default_k)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in SERVED_REQUIREMENTS]


def _input_example(emb: Embeddings, seen: sp.csr_matrix) -> pd.DataFrame:
    """Two known users (the second with a one-item history) in the model's own ID type."""
    users = emb.users.ids.head(2).to_list()
    hist: list[Any] = [None] * len(users)
    if len(users) > 1 and len(emb.items):
        hist[1] = emb.items.ids.head(1).to_list()
    return pd.DataFrame({"user_id": users, "history": hist})


def write_served_bundle(folder: str | Path, inputs: ServedInputs, export_cfg: ExportConfig, default_k: int) -> Path:
    """The ``served_model`` bundle for ``inputs`` (allow/deny items resolved from ``export_cfg``)."""
    from recsys_embed.models.popularity import item_popularity
    from recsys_embed.serving import served_model
    from recsys_embed.serving.export import _item_filters

    emb = inputs.embeddings
    uvec, ivec = emb.scoring_vectors()
    seen = sp.csr_matrix(inputs.seen)
    allow, deny = _item_filters(emb, export_cfg)
    admissible: np.ndarray | None = None
    if allow is not None or deny is not None:
        keep = np.zeros(len(emb.items), dtype=bool)
        keep[allow if allow is not None else slice(None)] = True
        if deny is not None:
            keep[deny] = False
        admissible = np.flatnonzero(keep)
    fallback = inputs.fallback if inputs.fallback is not None else np.zeros(len(emb.users), dtype=bool)
    popularity = inputs.popularity if inputs.popularity is not None else item_popularity(seen).astype(np.float64)
    fold = inputs.fold_in if emb.scoring == "dot" else None
    return served_model.save_bundle(
        folder, user_ids=emb.users.ids.to_arrow(), item_ids=emb.items.ids.to_arrow(), user_factors=uvec,
        item_factors=ivec, seen=seen, fallback=fallback, popularity=popularity, admissible=admissible,
        model=emb.model, default_k=default_k, fold_in=fold,
    )  # fmt: skip


def log_recommender(
    settings: MlflowSettings,
    run_id: str,
    inputs: ServedInputs,
    export_cfg: ExportConfig,
    default_k: int,
    tags: Mapping[str, str] | None = None,
    name: str | None = None,
) -> tuple[str, str]:
    """Log the standalone recommender as the model run's LoggedModel (``mlflow.pyfunc.log_model``) and register it.

    The LoggedModel (the experiment's Models tab) has ``run_id`` as its source run and output, the run's params
    (hyperparameters) and its step-0 metrics (the test metrics), each linked to the run's training dataset (see
    ``reporting.log_model_run``); the new version of ``name`` (default ``settings.registered_model_name``) points
    at it and carries ``tags``. The model is created first and handed to ``log_model`` (``model_id=``) rather than
    logged under an active run: MLflow's in-run path copies the run's metrics without their dataset, and a second,
    linked copy would collide with it. No fluent "active run" is involved, so it is safe in Prefect's worker threads.

    Returns:
        (the LoggedModel's URI ``models:/<model_id>``, the registered version as a string).
    """
    from mlflow.entities import LoggedModelOutput, Metric

    from recsys_embed.serving import served_model

    client = _client(settings)
    name = name or settings.registered_model_name
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="recsys-embed top-k recommender (standalone pyfunc)")
    emb = inputs.embeddings
    run = client.get_run(run_id)
    note = run.data.tags.get("mlflow.note.content")  # the run's description is the model's too
    model = client.create_logged_model(run.info.experiment_id, name=ARTIFACT_PATH, source_run_id=run_id,
                                       params=dict(run.data.params),
                                       tags={**(tags or {}), **({"mlflow.note.content": note} if note else {})},
                                       model_type="recommender")  # fmt: skip
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    training = [d.dataset for d in (run.inputs.dataset_inputs if run.inputs else [])
                if any(t.key == "mlflow.data.context" and t.value == "training" for t in d.tags)]  # fmt: skip
    ds_name, ds_digest = (training[0].name, training[0].digest) if training else (None, None)
    # the run's test metrics become the model's, linked to the dataset; with their own timestamps the run-side
    # rows are the ones it already has (MLflow skips exact duplicates), only the model's rows are new
    linked = [Metric(m.key, m.value, m.timestamp, 0, model_id=model.model_id, dataset_name=ds_name,
                     dataset_digest=ds_digest)
              for key in run.data.metrics for m in client.get_metric_history(run_id, key) if m.step == 0]  # fmt: skip
    for i in range(0, len(linked), 500):
        client.log_batch(run_id, metrics=linked[i : i + 500])
    with tempfile.TemporaryDirectory(prefix="recsys-served-") as tmp:
        bundle = write_served_bundle(Path(tmp) / "bundle", inputs, export_cfg, default_k)
        # MLflow prints its registration messages straight to stderr; they go to this module's log instead
        # (logging handlers keep their own stream, so only direct prints are captured, for these few seconds)
        printed = io.StringIO()
        with contextlib.redirect_stderr(printed):
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_PATH,
                model_id=model.model_id,
                python_model=served_model.__file__,
                artifacts={"bundle": str(bundle)},
                registered_model_name=name,
                signature=_signature(default_k, emb.items.ids),
                input_example=_input_example(emb, inputs.seen),
                pip_requirements=_requirements(),
                tags=dict(tags or {}),
            )
    for line in printed.getvalue().splitlines():
        if line.strip() and "it/s]" not in line:  # tqdm bars (when enabled) are noise in a log
            log.debug("mlflow: %s", line.strip())
    version = str(info.registered_model_version)
    log.info("registry: logged %s (%s) as %s v%s", info.model_uri, emb.model, name, version)
    return info.model_uri, version


def served_inputs(candidate: Candidate, settings: MlflowSettings) -> ServedInputs:
    """``ServedInputs`` from a candidate's files; ALS fold-in parameters from its model run's params."""
    from recsys_embed.store import load_csr, load_embeddings

    emb = load_embeddings(candidate.embeddings)
    fold = None
    if candidate.model == "als":
        params = _client(settings).get_run(candidate.model_run_id).data.params
        if "alpha" in params and "regularization" in params:
            fold = {"alpha": float(params["alpha"]), "regularization": float(params["regularization"])}
        else:
            log.warning("registry: the als run %s has no alpha/regularization params; the recommender will not "
                        "fold in histories", candidate.model_run_id)  # fmt: skip
    from recsys_embed.serving.coverage import fallback_mask

    mask = fallback_mask(emb)  # served embeddings: the last dimension is the popularity fallback
    if fold is not None and mask is not None:
        fold["dims"] = float(emb.dim - 1)  # fold in over the model's own dimensions; the fallback one stays 0
    popularity = np.load(candidate.popularity) if candidate.popularity else None
    if popularity is None and mask is not None:
        popularity = emb.item_vectors[:, -1].astype(np.float64)  # the refit popularity the fallback ranks by
    return ServedInputs(
        embeddings=emb,
        seen=load_csr(candidate.seen),
        fallback=np.load(candidate.fallback) if candidate.fallback else mask,
        popularity=popularity,
        fold_in=fold,
    )


def served_embeddings(model: Any) -> Embeddings:
    """The ``Embeddings`` inside a loaded registered recommender (standalone or legacy)."""
    py = model.unwrap_python_model()
    if hasattr(py, "emb"):  # legacy Recommender
        return py.emb
    return Embeddings(
        user_vectors=py.user_factors,
        item_vectors=py.item_factors,
        users=IdMap(pl.Series("id", pl.from_arrow(py.user_ids))),
        items=IdMap(pl.Series("id", pl.from_arrow(py.item_ids))),
        model=str(py.meta["model"]),
        scoring="dot",
    )


def _client(settings: MlflowSettings) -> Any:
    from mlflow import MlflowClient

    from recsys_embed.tracking.tracker import resolve_settings

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
    from recsys_embed.evaluation.selection import paired_se

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
                "champion_basis": None, "uri": f"models:/{name}/{same.version}",
                "model_uri": same.source}  # fmt: skip

    mv = _log_version(settings, name, candidate, export_cfg, cfg, metric, value)
    champ_value: float | None = None
    basis: str | None = None
    stats: dict[str, float] = {}
    if champ is None:
        promote, reason = True, "no champion yet"
    elif candidate.recipe and champ.tags.get("recipe") == candidate.recipe:
        promote = True
        newer = candidate.tags.get("data_fingerprint") != champ.tags.get("data_fingerprint")
        reason = (f"same recipe as champion v{champ.version} ({champ.tags.get('model')}), "
                  + ("refit on newer data" if newer else "same data; the run's config changed elsewhere"))  # fmt: skip
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
        "model_uri": mv.source,  # the LoggedModel behind the version (models:/<model_id>)
    }
    log.info("registry: %s v%s is %s (%s)", name, mv.version, alias, reason)
    return decision


def _log_version(
    settings: MlflowSettings, name: str, candidate: Candidate, export_cfg: ExportConfig, cfg: RegistryConfig,
    metric: str, value: float,
) -> Any:
    """Log ``candidate`` as the standalone recommender on its model run (``log_recommender``) and register it as a
    new version of ``name`` with the version tags the decision and downstream readers use."""
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
    _, version = log_recommender(settings, candidate.model_run_id, served_inputs(candidate, settings), export_cfg,
                                 cfg.default_k, tags, name=name)  # fmt: skip
    return _client(settings).get_model_version(name, version)


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
