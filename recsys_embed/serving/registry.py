"""The MLflow Model Registry: the second (and last) module that imports mlflow, beside ``tracking``.

A run's best model is logged with MLflow 3's own API (``mlflow.pyfunc.log_model`` inside the model's run, so a
LoggedModel exists, carries the run's params and metrics, and is registered as a new version) as the standalone
recommender of ``serving.served_model``: models-from-code, numpy/pandas/pyarrow/scipy only, with a bundle of
the served vectors, ID maps, seen filter, fallback flags, item popularity and admissible items. It loads and
answers in a virtualenv built from the model's own ``requirements.txt``, without recsys-embed, and ranks exactly
like the exported top-k table (``topk.iter_topk``).

Aliases: ``champion`` moves to the new version only when it wins the champion decision (``register_best``: the
same recipe trained up to a later or the same last event, or another recipe that beats the champion's recipe on
this run's windows; never a model trained on older data unless ``registry.allow_older``); otherwise the new version
becomes ``challenger`` and the decision says why. Each version carries its metric (``metric``, ``metric_value``),
its data identity and training window, and its decision (``decision_record``, written before the alias moves, so a
re-run after a kill completes it) as tags, so the comparison needs no run lookup.
"""

from __future__ import annotations

import contextlib
import datetime as dt
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
        fold_in: how the served model folds in a ``history`` (see ``served_model``): ``{"kind": "als", "alpha",
            "regularization"}`` (a dict without ``kind`` is ALS's too), ``{"kind": "ease", "binary"}`` (the user's
            X row with the listed items set to 1.0, or 1 added per listing when not ``binary``), optionally
            ``"dims"`` (the model's dimensions, before the fallback one); None: off.
        item_text: ``item_text.parquet`` (``item_id``, ``text``): the answers carry each item's text
            (``item_texts``); None: IDs only.
    """

    embeddings: Embeddings
    seen: sp.csr_matrix
    fallback: np.ndarray | None = None
    popularity: np.ndarray | None = None
    fold_in: dict[str, Any] | None = None
    item_text: str | None = None


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


def _signature(default_k: int, item_ids: pl.Series, texts: bool = False) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema

    item_type = "long" if item_ids.dtype.is_integer() else "string"
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "user_id"), ColSpec(Array(AnyType()), "history", required=False)]),
        outputs=Schema([
            ColSpec(AnyType(), "user_id"),
            ColSpec(Array(item_type), "item_ids"),
            *([ColSpec(Array("string"), "item_texts")] if texts else []),
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
    from recsys_embed.serving.export import _item_filters, item_texts

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
    text_file = Path(inputs.item_text) if inputs.item_text else None
    texts = item_texts(emb.items, pl.read_parquet(text_file)) if text_file and text_file.exists() else None
    return served_model.save_bundle(
        folder, user_ids=emb.users.ids.to_arrow(), item_ids=emb.items.ids.to_arrow(), user_factors=uvec,
        item_factors=ivec, seen=seen, fallback=fallback, popularity=popularity, admissible=admissible,
        model=emb.model, default_k=default_k, fold_in=fold, item_texts=texts.to_arrow() if texts is not None else None,
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
                signature=_signature(default_k, emb.items.ids, texts=inputs.item_text is not None),
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
    """``ServedInputs`` from a candidate's files, with the ``history`` fold-in its model supports: ALS's parameters
    from its model run's params; EASE's from the embeddings' ``info`` (``binary``, ``half_life_days``)."""
    from recsys_embed.store import load_csr, load_embeddings

    emb = load_embeddings(candidate.embeddings)
    fold: dict[str, Any] | None = None
    if candidate.model == "ease":
        # a history has no timestamps: with recency weighting its items count as bought now (weight 1.0), like a
        # binary X's 1s; a confidence X (binary false, no half-life) adds 1 per listing
        recency = emb.info.get("half_life_days") is not None
        fold = {"kind": "ease", "binary": bool(emb.info.get("binary", True)) or recency}
    elif candidate.model == "als":
        params = _client(settings).get_run(candidate.model_run_id).data.params
        if "alpha" in params and "regularization" in params:
            fold = {"kind": "als", "alpha": float(params["alpha"]), "regularization": float(params["regularization"])}
            confidence = emb.info.get("confidence", "none")  # the transform the model was fitted on
            if confidence != "none":
                fold.update(confidence=confidence, bm25_k1=float(emb.info.get("bm25_k1", 100.0)),
                            bm25_b=float(emb.info.get("bm25_b", 0.8)))  # fmt: skip
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
        item_text=candidate.item_text,
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
    """(promote?, why, stats) for two per-user metric arrays over the same validation users (same order).

    A one-sided paired z-test: promote when the mean gain ``mean(new - champion)`` exceeds both ``margin`` and
    ``z`` paired standard errors (``selection.paired_se``: ``std(new - champion, ddof=1) / sqrt(users)``). Below 2
    users the standard error is undefined (NaN) and only the margin applies.

    Returns:
        ``stats``: ``gain``, ``se`` (NaN below 2 users), ``need`` (the gain it had to exceed), ``users``.
    """
    from recsys_embed.evaluation.selection import paired_se

    n = int(new.size)
    gain = float(np.mean(new) - np.mean(champion)) if n else 0.0
    se = paired_se(new, champion)
    noise = z * se if se == se else 0.0
    need = max(margin, noise)
    stats = {"gain": gain, "se": se, "need": need, "users": float(n)}
    if gain > need:
        spread = (f"{gain / se:.1f} paired SE" if se > 0 else "every user gains the same" if se == 0
                  else "no paired SE below 2 users")  # fmt: skip
        return True, f"gains {gain:+.4f} over the champion's recipe ({spread} over {n:,} users; needs > " \
                     f"{need:.4f})", stats  # fmt: skip
    return False, f"gains {gain:+.4f} over the champion's recipe, within the noise or margin (needs > {need:.4f}: " \
                  f"margin {margin:g}, {z:g} paired SE = {noise:.4f} over {n:,} users)", stats  # fmt: skip


# Version tag: the champion decision as JSON (``promoted``, ``reason``, ``previous_champion``, ``champion_value``,
# ``champion_basis``, ``paired``, ``applied``), written before the alias moves (``applied`` false), rewritten with
# ``applied`` true after it moved: a re-run that finds the version completes what a kill interrupted.
DECISION_RECORD = "decision_record"


def _last_event(tags: Mapping[str, str]) -> dt.datetime | None:
    """The last event a version's model was trained on (tag ``training_window_last``; naive: UTC), None if unknown."""
    raw = tags.get("training_window_last")
    if not raw or raw == "None":
        return None
    try:
        t = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _judge(
    champ: Any | None,
    candidate: Candidate,
    cfg: RegistryConfig,
    metric: str,
    value: float,
    judge: Callable[[dict[str, str]], ChampionScore | None] | None,
) -> dict[str, Any]:
    """The champion decision for ``candidate`` against the version ``champ`` holding the alias (None: none yet).

    Returns the decision record (see ``DECISION_RECORD``, ``applied`` false)."""
    record: dict[str, Any] = {"promoted": True, "reason": "no champion yet", "previous_champion": None,
                              "champion_value": None, "champion_basis": None, "paired": None,
                              "applied": False}  # fmt: skip
    if champ is None:
        return record
    record["previous_champion"] = str(champ.version)
    where = f"champion v{champ.version} ({champ.tags.get('model')})"
    mine, theirs = _last_event(candidate.tags), _last_event(champ.tags)
    span = f"events up to {mine}; the champion's up to {theirs}"
    if candidate.recipe and same_recipe(candidate.model, candidate.recipe, candidate.recipe_config, champ.tags):
        # judged equal: the version trained on the later data serves (a later last event, never another fingerprint)
        record["champion_basis"] = "same recipe"
        if mine is None or theirs is None:
            reason = f"same recipe as {where}; a training window is unknown ({span}), so the new version replaces it"
        elif mine > theirs:
            reason = f"same recipe as {where}, refit on newer data ({span})"
        elif mine < theirs:
            reason = f"same recipe as {where}"  # the older-data rule below decides
        elif candidate.tags.get("data_identity") == champ.tags.get("data_identity"):
            reason = f"same recipe as {where}, same data (events up to {mine}); the run's config changed elsewhere"
        else:
            reason = (f"same recipe as {where}, trained up to the same last event ({mine}) on data that differs "
                      "otherwise (input files, ingest window or rows)")  # fmt: skip
        promote = True
    else:
        score = judge(dict(champ.tags)) if judge is not None else None
        per_user = np.load(candidate.val_per_user) if candidate.val_per_user else None
        if score is not None and score.per_user is not None and per_user is not None \
                and per_user.shape == score.per_user.shape:  # fmt: skip
            record["champion_value"], record["champion_basis"] = score.value, score.basis
            promote, reason, record["paired"] = decide_paired(per_user, score.per_user, cfg.margin, cfg.z)
        else:
            stored = champ.tags.get("metric_value") if champ.tags.get("metric") == metric else None
            record["champion_value"] = float(stored) if stored is not None else None
            record["champion_basis"] = "stored validation metric of its own run (another window: a weaker comparison)"
            promote, reason = decide(value, record["champion_value"], cfg.margin)
        reason = f"{reason} ({where}: {record['champion_basis']})"
    if promote and mine is not None and theirs is not None and mine < theirs:  # a backfill or a cut log
        if cfg.allow_older:
            reason += f", trained on older data ({span}); registry.allow_older=true lets it replace the champion"
        else:
            promote = False
            reason += (f", but trained on older data ({span}): a backfill or cut run never replaces a champion "
                       "trained on later data (registry.allow_older=true would)")  # fmt: skip
    record.update(promoted=promote, reason=reason)
    return record


def same_recipe(model: str, recipe: str, recipe_config: str, tags: Mapping[str, str]) -> bool:
    """Whether the version with ``tags`` has this recipe (``model`` family, ``recipe`` hash, ``recipe_config`` JSON):
    the same hash, or the same family and the same value of every field of ``recipe_config``. The second form
    keeps a version recorded while machine settings (``shipping.MACHINE_SETTINGS``) were still part of the recipe
    the same recipe as its re-run now: its extra fields are ignored, a field it lacks makes it another recipe."""
    if tags.get("recipe") == recipe:
        return True
    if tags.get("model") != model:
        return False
    try:
        mine, theirs = json.loads(recipe_config), json.loads(tags.get("recipe_config") or "")
    except ValueError:  # none, or cut at the tag's length limit
        return False
    if not isinstance(mine, dict) or not isinstance(theirs, dict) or not mine:
        return False
    return all(k in theirs and theirs[k] == v for k, v in mine.items())


def _recorded(mv: Any) -> dict[str, Any] | None:
    """A version's ``DECISION_RECORD`` (None: none, e.g. registered before records existed)."""
    raw = mv.tags.get(DECISION_RECORD)
    try:
        return dict(json.loads(raw)) if raw else None
    except (ValueError, TypeError):
        return None


def _apply(client: Any, name: str, version: str, record: dict[str, Any]) -> str:
    """Move the decision's alias to ``version``, then mark its record applied; the alias."""
    from recsys_embed.faults import checkpoint

    alias = CHAMPION if record["promoted"] else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    if alias == CHAMPION:
        old = _alias_version(client, name, CHALLENGER)
        if old is not None and str(old.version) == version:  # a challenger taken back as champion
            client.delete_registered_model_alias(name, CHALLENGER)
    checkpoint("register:alias")  # the alias moved; the record is not marked applied, champion.json not written
    client.set_model_version_tag(name, version, "decision", record["reason"][:4900])
    client.set_model_version_tag(name, version, DECISION_RECORD, _record_json({**record, "applied": True}))
    return alias


def _record_json(record: dict[str, Any]) -> str:
    return json.dumps({**record, "reason": str(record["reason"])[:3000]}, sort_keys=True)


def _existing_version(client: Any, name: str, run_key: str) -> Any | None:
    """The newest version already registered for this data identity and config (an identical run), or None."""
    if not run_key:
        return None
    found = [mv for mv in client.search_model_versions(f"name = '{name}'") if mv.tags.get("run_key") == run_key]
    return max(found, key=lambda mv: int(mv.version)) if found else None


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
    ``challenger``: honestly, without leakage, without churn, and as one step a re-run completes.

    The decision (on ``primary_metric``, the metric the per-user validation arrays and ``judge`` score):

    - The same recipe as the champion's replaces it when trained up to the same or a later last event
      (``training_window_last``): it was judged equal and has seen as much or more.
    - Another recipe must beat the champion's recipe on this run's validation window, both fitted on this run's
      fit window (``judge``: the champion version's tags -> its ``ChampionScore``), by more than ``cfg.margin``
      and ``cfg.z`` paired standard errors. The champion model itself (fitted on everything up to its own run)
      is never scored: every window this run could score it on, it has seen. Without a usable judge the stored
      validation metrics of the two runs are compared, and the decision says that basis.
    - Either way, a version trained on older data than the champion's (a backfill, an ``ingest.until`` cut) never
      replaces it unless ``cfg.allow_older``.

    One step across a kill: the decision (the champion recipe's refit included) is made before anything is
    registered; the new version is created with it (``DECISION_RECORD``, not applied; ``checkpoint("register")``),
    then the alias moves (``"register:alias"``), then the record is marked applied. A later run with the same
    ``run_key`` (data identity + config) registers nothing and settles the version it finds:

    - it holds ``champion``: unchanged;
    - its recorded decision was made against today's champion and not superseded: applied (again: moving an
      alias is idempotent), which completes a run killed before or after the alias moved;
    - otherwise (the champion moved since, or no record): judged against today's champion like a new candidate,
      and the alias moves back to it when it wins. An identical earlier version is re-promoted in place, never
      registered twice: it is the same data and config.

    ``shipping.run_publish`` then makes ``champion.json`` and ``current/`` agree with the alias.

    Returns:
        The decision record: ``name``, ``version``, ``alias``, ``promoted``, ``registered``, ``reason``, ``metric``,
        ``value``, ``margin``, ``previous_champion``, ``champion_value``, ``champion_basis``, ``paired``, ``uri``,
        ``model_uri``.
    """
    from recsys_embed.faults import checkpoint

    metric = primary_metric
    val_metric = f"val_{metric}"
    if val_metric not in candidate.metrics:
        raise RegistryError(
            f"eval.primary_metric {metric!r} has no validation value among the model's metrics "
            f"({sorted(candidate.metrics)}); choose a metric eval.ks produces"
        )
    value = float(candidate.metrics[val_metric])
    client = _client(settings)
    name = name or settings.registered_model_name
    champ = _alias_version(client, name, CHAMPION)
    prev = str(champ.version) if champ is not None else None
    same = _existing_version(client, name, candidate.run_key)
    if same is None:
        record = _judge(champ, candidate, cfg, metric, value, judge)
        mv = _log_version(settings, name, candidate, export_cfg, cfg, metric, value, record)
        version, source, registered = str(mv.version), mv.source, True
        checkpoint("register")  # the version is registered with its decision; the alias has not moved
        alias = _apply(client, name, version, record)
        reason = record["reason"]
    else:
        version, source, registered = str(same.version), same.source, False
        holds = f"v{version} already holds this data and config; nothing registered"
        found = _recorded(same)
        if prev == version:
            record = found or {"promoted": False, "previous_champion": None, "champion_value": None,
                               "champion_basis": None, "paired": None}  # fmt: skip
            if found is not None and not found.get("applied"):  # killed after the alias moved
                client.set_model_version_tag(name, version, DECISION_RECORD, _record_json({**found, "applied": True}))
            alias, reason = CHAMPION, f"unchanged: {holds} (champion)"
            record = {**record, "promoted": False}
        elif found is not None and found.get("previous_champion") == prev and not (
            found.get("applied") and found.get("promoted")
        ):  # decided against today's champion: a kill interrupted it (not applied), or it is the challenger
            alias = _apply(client, name, version, found)
            reason = (f"unchanged: {holds} ({alias}: {found['reason']})" if found.get("applied")
                      else f"{found['reason']} (v{version} was registered by an interrupted run; this run moved "
                           "its alias)")  # fmt: skip
            record = {**found, "promoted": bool(found["promoted"]) and not found.get("applied")}
        else:  # the champion moved since this version was judged (or it has no record): judge it again
            record = _judge(champ, candidate, cfg, metric, value, judge)
            client.set_model_version_tag(name, version, DECISION_RECORD, _record_json(record))
            alias = _apply(client, name, version, record)
            reason = f"{holds}; judged again against today's champion: {record['reason']}"
    decision = {
        "name": name,
        "version": version,
        "alias": alias,
        "promoted": bool(record["promoted"]),
        "registered": registered,
        "reason": reason,
        "metric": metric,
        "value": value,
        "margin": cfg.margin,
        "previous_champion": prev,
        "champion_value": record.get("champion_value"),
        "champion_basis": record.get("champion_basis"),
        "paired": record.get("paired") or None,
        "uri": f"models:/{name}/{version}",
        "model_uri": source,  # the LoggedModel behind the version (models:/<model_id>)
    }
    log.info("registry: %s v%s is %s (%s)", name, version, alias, reason)
    return decision


def _log_version(
    settings: MlflowSettings, name: str, candidate: Candidate, export_cfg: ExportConfig, cfg: RegistryConfig,
    metric: str, value: float, record: dict[str, Any],
) -> Any:
    """Log ``candidate`` as the standalone recommender on its model run (``log_recommender``) and register it as a
    new version of ``name`` with the version tags the decision and downstream readers use, the decision
    ``record`` among them (created with the version, before any alias moves).

    The LoggedModel and the version say apart what the metrics measured (``metrics_measured``: the evaluation fit
    on the fit window, scored on the validation and test windows) and what the model was trained on
    (``trained_on``: the shipped refit's events); the version's description says both."""
    t = candidate.tags
    measured = (f"metrics: evaluation fit on the fit window {t.get('fit_window', '(unknown)')}, scored on the test "
                f"window {t.get('test_window', '(unknown)')} (`test.*` metrics) and the validation window "
                f"{t.get('validation_window', '(unknown)')} (`val.*`: its selection part, what the champion decision "
                "reads)")  # fmt: skip
    rows = t.get("training_rows")
    trained = (f"trained on: {t.get('training_fit', 'all kept events')} {t.get('training_window_first')} .. "
               f"{t.get('training_window_last')}" + (f", {rows} rows" if rows and rows != "None" else ""))  # fmt: skip
    tags = {
        **t,
        "metric": metric,
        "metric_value": repr(value),
        "metric_basis": "validation window of its run (evaluation fit)",
        "metrics_measured": measured[:4900],
        "trained_on": trained[:4900],
        "model": candidate.model,
        "pipeline_run_id": candidate.pipeline_run_id,
        "recipe": candidate.recipe,
        "recipe_config": candidate.recipe_config[:4900],
        "run_key": candidate.run_key,
        "decision": str(record["reason"])[:4900],
        DECISION_RECORD: _record_json(record),
    }
    test_value = candidate.metrics.get(f"test_{metric}")
    if test_value is not None:
        tags["test_metric_value"] = repr(float(test_value))
    _, version = log_recommender(settings, candidate.model_run_id, served_inputs(candidate, settings), export_cfg,
                                 cfg.default_k, tags, name=name)  # fmt: skip
    client = _client(settings)
    client.update_model_version(name, version, description=f"{trained}\n\n{measured}")
    return client.get_model_version(name, version)


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


# ----------------------------------------------------------------------------------------------------------
# Retention (``pipeline.retention``, ``recsys-embed gc``): listing and deleting versions


def list_versions(settings: MlflowSettings, name: str) -> tuple[list[Any], dict[str, str]]:
    """(every version of registered model ``name``, newest first; its aliases: alias -> version); both empty when
    the model does not exist."""
    from mlflow.exceptions import MlflowException

    client = _client(settings)
    try:
        aliases = {str(a): str(v) for a, v in dict(client.get_registered_model(name).aliases or {}).items()}
    except MlflowException:
        return [], {}
    found = list(client.search_model_versions(f"name = '{name}'"))
    return sorted(found, key=lambda mv: -int(mv.version)), aliases


def delete_version(settings: MlflowSettings, name: str, mv: Any, dry_run: bool = False) -> int | None:
    """Delete version ``mv`` of ``name``, its LoggedModel and that model's artifacts (the served bundle: the
    largest part of a version); the bytes freed when countable (a local store), else None. ``dry_run`` only
    counts. The version's source run keeps its params, metrics and (unless pruned too) artifacts."""
    from mlflow.exceptions import MlflowException

    from recsys_embed.tracking.tracker import delete_artifacts

    client = _client(settings)
    model_id = getattr(mv, "model_id", None) or (str(mv.source).removeprefix("models:/")
                                                 if str(mv.source).startswith("models:/m-") else None)  # fmt: skip
    location = None
    if model_id:
        try:
            location = client.get_logged_model(model_id).artifact_location
        except MlflowException:
            model_id = None  # deleted already
    size = delete_artifacts(location, dry_run) if location else 0
    if not dry_run:
        client.delete_model_version(name, str(mv.version))
        if model_id:
            client.delete_logged_model(model_id)
    log.info("registry: %s v%s of %s (%s)", "would delete" if dry_run else "deleted", mv.version, name,
             f"{size / 2**20:.1f} MB" if size is not None else "size unknown")  # fmt: skip
    return size
