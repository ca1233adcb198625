"""Hyperparameter search on the validation window: one Optuna study per model.

- **Objective.** A trial fits the model on the train (fit-period) matrix with its parameters and scores the
  validation targets with the shared top-k / ``evaluate`` path; the value is ``tuning.metric`` (default:
  ``eval.primary_metric``). The inputs are a ``TuneData``: the train matrix (a CSR built once for every trial)
  and the validation targets. Test targets are never an input, so the search cannot read them.
- **Pruning.** ALS and BPR report their validation metric every ``eval_every`` iterations and the two-tower model
  every epoch through the trainers' ``on_metrics`` callback; Optuna's ``MedianPruner`` stops a trial below the
  median of earlier trials at the same step (``optuna.TrialPruned`` raised from the callback unwinds the fit).
- **Sampler.** TPE, re-seeded for every trial from ``(tuning.seed, the trial's position in the budget)``: a trial's
  parameters depend only on the seed, its position and the finished trials before it. So the same seed and trial
  budget give the same trials and best parameters on CPU, also when a killed search is resumed.
- **Defaults first.** Trial 0 is the model's configured hyperparameters (when inside the ranges), so the search
  also measures the defaults and never returns something worse on validation.
- **Storage and resume.** Studies live in an Optuna RDB storage (a SQLite file); the study name is a content key
  of everything that shapes a trial's result (split, model config, space, metric, seed, pruning). A re-run loads
  the study, skips its finished trials, marks the trial a killed run left RUNNING as FAIL and runs its parameters
  again first. More trials later (a bigger ``n_trials``) continue the same study.
- **Budget.** Trials per model (``tuning.n_trials``, or the model's own) and minutes: the run's
  ``tuning.budget_minutes`` shared out over the models still to search, each also capped by its own ``minutes``.
  Both are checked before a trial starts; a started trial runs to its end.

``apply_tuning`` turns a search record into the ``ModelsConfig`` the normal training stage uses; ``log_tuning``
puts the trials table, Optuna's matplotlib plots and the final hyperparameters on the model's MLflow run.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import optuna
import polars as pl
import scipy.sparse as sp
from optuna.trial import FrozenTrial, TrialState

from recsys_embed.config import EASEConfig, EvalConfig, ModelsConfig, ModelTuning, SearchSpace, TuningConfig
from recsys_embed.evaluation.metrics import evaluate_users, selection_metrics
from recsys_embed.faults import checkpoint
from recsys_embed.models.mf import sample_val_targets
from recsys_embed.types import Embeddings, Interactions

if TYPE_CHECKING:
    from recsys_embed.tracking.tracker import Tracker

log = logging.getLogger(__name__)

Record = dict[str, Any]

TUNABLE = ("ease", "als", "bpr", "two_tower")
"""Model families with a search space (``tuning.<name>``), in the order they are searched."""

STUDY_VERSION = 2  # part of every study name: bump it when a trial's meaning changes


# ----------------------------------------------------------------------------------------------------------
# Inputs and spaces


@dataclass
class TuneData:
    """What every trial reads: the train interactions (CSR built once) and the validation targets.

    Attributes:
        train: the train ``Interactions`` (``events`` only needed by the two-tower model).
        val: CSR (n_users x n_items) validation positives over the train ID maps.
        item_text: ``item_id``, ``text`` for the two-tower item tower (None: no text).
    """

    train: Interactions
    val: sp.csr_matrix
    item_text: pl.DataFrame | None = None
    _ease: dict[tuple[bool, float | None], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def ease_inputs(self, cfg: EASEConfig) -> tuple[np.ndarray, np.ndarray]:
        """(dense float32 X, Gram matrix) for EASE, computed once per input setting (binary, half-life) and
        shared by the study's trials."""
        key = (cfg.binary, cfg.half_life_days)
        if key not in self._ease:
            from recsys_embed.models import ease

            self._ease.clear()  # one setting held at a time: each is a dense users x items and items^2 pair
            x = ease.inputs(self.train, cfg)
            self._ease[key] = (x.astype(np.float32).toarray(), ease.gram(x))
        return self._ease[key]


def model_tuning(cfg: TuningConfig, name: str) -> ModelTuning:
    """The ``tuning.<name>`` slice."""
    slice_: ModelTuning = getattr(cfg, name)
    return slice_


def space_of(cfg: TuningConfig, name: str) -> SearchSpace:
    """The ``tuning.<name>.space`` slice."""
    return cast(SearchSpace, model_tuning(cfg, name).space)  # type: ignore[attr-defined]


def searched(space: SearchSpace, model_cfg: Any = None) -> dict[str, Any]:
    """The parameters a space searches (non-null ranges ``(low, high)`` or choice lists), by name; with
    ``model_cfg``, not those the model has switched off (configured null, e.g. EASE's ``half_life_days``)."""
    return {
        name: r for name, r in space
        if r is not None and (model_cfg is None or getattr(model_cfg, name, None) is not None)
    }  # fmt: skip


def suggest(trial: optuna.Trial, space: SearchSpace, model_cfg: Any = None) -> dict[str, Any]:
    """Draw one value per searched parameter (log scale and integers as the space declares)."""
    params: dict[str, Any] = {}
    for name, r in searched(space, model_cfg).items():
        if isinstance(r, list):
            params[name] = trial.suggest_categorical(name, r)
            continue
        low, high = r
        log_scale = name in space._log
        if name in space._int:
            params[name] = trial.suggest_int(name, round(low), round(high), log=log_scale)
        else:
            params[name] = trial.suggest_float(name, float(low), float(high), log=log_scale)
    return params


def defaults_in_space(model_cfg: Any, space: SearchSpace) -> dict[str, Any]:
    """The configured values of the searched parameters that lie inside their ranges (trial 0 evaluates them)."""
    out: dict[str, Any] = {}
    for name, r in searched(space, model_cfg).items():
        value = getattr(model_cfg, name)
        if isinstance(r, list):
            if value in r:
                out[name] = value
            continue
        low, high = r
        if value is not None and low <= value <= high:
            out[name] = int(value) if name in space._int else float(value)
    return out


def grid_points(model_cfg: Any, space: SearchSpace) -> list[dict[str, Any]]:
    """The space's fixed startup trials (``SearchSpace._grid``: parameter -> factors of its configured value, e.g.
    EASE's lambda x4, /4, x16, /16), each varying one parameter from the defaults, kept inside the range.

    A one- or two-parameter search spends its startup trials better on a log grid around a good default than on
    random draws over four decades (measured on last.fm: 4 of 8 random EASE trials landed at lambda 6 or 9,000)."""
    base = defaults_in_space(model_cfg, space)
    ranges = searched(space, model_cfg)
    points: list[dict[str, Any]] = []
    for name, factors in space._grid.items():
        r = ranges.get(name)
        if name not in base or not isinstance(r, tuple):
            continue
        for f in factors:
            value = min(max(base[name] * f, r[0]), r[1])
            if value != base[name] and all(p.get(name) != value for p in points):
                points.append({**base, name: value})
    return points


def with_params(model_cfg: Any, params: dict[str, Any]) -> Any:
    """A copy of a model's config slice with ``params`` replaced (validated like a loaded config)."""
    return type(model_cfg).model_validate({**model_cfg.model_dump(), **params})


def tuned_models(models_cfg: ModelsConfig, cfg: TuningConfig, runnable: list[str]) -> list[str]:
    """The models to search: runnable (enabled and fitting), ``tune: true``, with at least one searched range."""
    return [n for n in TUNABLE if n in runnable and model_tuning(cfg, n).tune
            and searched(space_of(cfg, n), getattr(models_cfg, n))]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Objective


def make_objective(
    name: str,
    data: TuneData,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    cfg: TuningConfig,
    workdir: Path,
) -> Callable[[optuna.Trial], float]:
    """The objective of model ``name``: fit with the trial's parameters, return the validation metric.

    Validation scores a seeded sample of ``cfg.val_max_users`` users of ``data.val`` (the same sample in every
    trial). ALS / BPR / two-tower report intermediate values to the trial (and are pruned) through ``on_metrics``.
    """
    metric = cfg.metric or eval_cfg.primary_metric
    ks = sorted({*eval_cfg.ks, int(metric.rsplit("_", 1)[1])})
    if metric not in selection_metrics(ks):
        raise ValueError(f"tuning.metric {metric!r} is not a validation metric; use one of {selection_metrics(ks)}")
    val_sample = sample_val_targets(data.val, cfg.val_max_users, cfg.seed)
    space = space_of(cfg, name)
    base = getattr(models_cfg, name)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space, base)
        sub = with_params(base, params)
        t0 = time.perf_counter()
        emb = _fit(name, trial, sub, data, models_cfg, eval_cfg, metric, cfg.pruning, workdir)
        values, per_user = evaluate_users(emb, data.train.matrix, val_sample, ks, per_user=[metric])
        value = float(values[metric])
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
        # per user, for the paired test of the best trial against the defaults (``_no_gain_in_noise``)
        trial.set_user_attr("per_user", [round(float(x), 6) for x in per_user[metric]])
        checkpoint(f"tune-trial:{name}:{trial.number}")  # fitted and scored, not yet stored as finished
        if not math.isfinite(value):
            raise ValueError(f"validation {metric} is {value} (no validation user with a target?)")
        return value

    return objective


def _fit(
    name: str,
    trial: optuna.Trial,
    sub: Any,
    data: TuneData,
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    metric: str,
    pruning: bool,
    workdir: Path,
) -> Embeddings:
    """One trial's fit; ``optuna.TrialPruned`` propagates out of the trainer when the pruner says stop."""
    if name == "ease":
        from recsys_embed.models import ease

        dense, g = data.ease_inputs(sub)
        b = ease.weights(g, sub.regularization, threads=sub.blas_threads)
        info = {"regularization": sub.regularization, "half_life_days": sub.half_life_days}
        return ease.embeddings(data.train, b, dense, info)

    from recsys_embed.models.factory import train_model

    last = sub.max_epochs if name == "two_tower" else sub.iterations  # pruning there saves nothing

    def report(metrics: dict[str, float], step: int) -> None:
        value = metrics.get(f"val_{metric}")
        if value is None or not math.isfinite(value):
            return
        trial.report(float(value), step)
        if pruning and step < last and trial.should_prune():
            raise optuna.TrialPruned(f"val {metric} {value:.5f} at step {step} is below the median of earlier trials")

    scratch: Path | None = None
    if name == "two_tower":  # each trial's checkpoints and encoder in a scratch folder, removed after it
        scratch = workdir / f"two_tower-trial-{trial.number}"
        sub = sub.model_copy(update={"artifact_dir": str(scratch)})
    cfg = models_cfg.model_copy(update={name: sub, "warm_start": False})
    try:
        return train_model(name, data.train, cfg, eval_cfg, data.val, report, data.item_text)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Study


def trial_seed(seed: int, position: int) -> int:
    """The sampler seed of the trial at ``position`` (0-based) of a study's budget."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


def _sampler(cfg: TuningConfig, position: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=trial_seed(cfg.seed, position), n_startup_trials=cfg.sampler_startup_trials)


def _pruner(cfg: TuningConfig) -> optuna.pruners.BasePruner:
    if not cfg.pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=0)


def _budget_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that used up budget, in order: finished ones, less those a killed run left and that ran again."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in trials if t.state in done and t.number not in retried]


def _recover(study: optuna.Study) -> int:
    """Fail the trials a killed run left RUNNING and queue their parameters to run first; how many."""
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("retry_of") for t in trials if t.state == TrialState.WAITING}
    n = 0
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        if t.number not in queued:
            study.enqueue_trial(dict(t.params), user_attrs={**t.user_attrs, "retry_of": t.number})
        study.tell(t.number, state=TrialState.FAIL)
        n += 1
    if n:
        log.warning("tuning %s: %d trial(s) left unfinished by a killed run; running them again first",
                    study.study_name, n)  # fmt: skip
    return n


def run_study(
    name: str,
    objective: Callable[[optuna.Trial], float],
    storage: optuna.storages.BaseStorage,
    study_name: str,
    cfg: TuningConfig,
    n_trials: int,
    deadline: float | None,
    defaults: dict[str, Any],
    startup: list[dict[str, Any]] | None = None,
) -> tuple[list[FrozenTrial], Record]:
    """Run (or resume) one study until it holds ``n_trials`` budget trials or ``deadline`` (``time.monotonic``)
    passes. A trial that raises is recorded FAIL with a warning and the search goes on.

    Returns:
        The first ``n_trials`` budget trials, and a record over them: best params and value, the defaults trial's
        value, counts (complete / pruned / failed, reused from earlier runs, run now), seconds, stop reason.
    """
    t0 = time.perf_counter()
    study = optuna.create_study(
        storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
        sampler=_sampler(cfg, 0), pruner=_pruner(cfg),
    )  # fmt: skip
    if not study.get_trials(deepcopy=False) and defaults:
        study.enqueue_trial(defaults, user_attrs={"defaults": True})
        for point in startup or []:  # fixed startup points (the space's grid) before TPE's own draws
            study.enqueue_trial(point, user_attrs={"grid": True})
    _recover(study)
    reused = len(_budget_trials(study.get_trials(deepcopy=False)))
    done, ran, stopped_by = reused, 0, "trials"
    while done < n_trials:
        if deadline is not None and time.monotonic() >= deadline:
            stopped_by = "time"
            break
        study.sampler = _sampler(cfg, done)
        trial = study.ask()
        try:
            value = objective(trial)
        except optuna.TrialPruned as e:
            study.tell(trial, state=TrialState.PRUNED)
            log.info("tuning %s trial %d pruned: %s %s", name, trial.number, trial.params, e)
        except Exception as e:  # a failed fit (numerics, memory) must not end the search
            study.tell(trial, state=TrialState.FAIL)
            log.warning("tuning %s trial %d failed (%s: %s); the search goes on", name, trial.number,
                        type(e).__name__, e)  # fmt: skip
        else:
            study.tell(trial, value)
            log.info("tuning %s trial %d: %s -> %.5f", name, trial.number, trial.params, value)
        done += 1
        ran += 1
        checkpoint(f"tune:{name}:{done}")  # the trial is stored, the next one not started
    budget = _budget_trials(study.get_trials(deepcopy=False))[:n_trials]
    complete = [t for t in budget if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    default_trial = next((t for t in complete if t.user_attrs.get("defaults")), None)
    kept_defaults = _no_gain_in_noise(best, default_trial, cfg.min_gain_se)
    if kept_defaults is not None:
        log.info("tuning %s: %s; the defaults are kept", name, kept_defaults)
        best = default_trial
    record: Record = {
        "study": study_name,
        "params": dict(best.params) if best else {},
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "defaults": defaults,
        "default_value": default_trial.value if default_trial else None,
        "n_trials": len(budget),
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in budget),
        "failed": sum(t.state == TrialState.FAIL for t in budget),
        "reused_trials": reused,
        "new_trials": ran,
        "stopped_by": stopped_by,
        "seconds": round(time.perf_counter() - t0, 3),
        "kept_defaults": kept_defaults,
    }
    if best is None:
        log.warning("tuning %s: no trial completed; the model keeps its configured hyperparameters", name)
    else:
        log.info("tuning %s: best val %.5f (trial %d, %s) against the defaults' %s; %d trials (%d pruned, %d failed), "
                 "%.1f s", name, best.value, best.number, best.params,
                 "n/a" if default_trial is None else f"{default_trial.value:.5f}", len(budget), record["pruned"],
                 record["failed"], record["seconds"])  # fmt: skip
    return budget, record


def _no_gain_in_noise(best: FrozenTrial | None, defaults: FrozenTrial | None, min_gain_se: float) -> str | None:
    """Why the best trial does not replace the defaults (None: it does).

    The best of many trials on one set of users is flattered by the maximum over noisy values; a gain within
    ``min_gain_se`` paired standard errors (over the search's users, both trials scored on the same ones) of the
    defaults trial is no evidence that the new parameters are better, so it buys no change.
    """
    if best is None or defaults is None or best.number == defaults.number or min_gain_se <= 0:
        return None
    a, b = best.user_attrs.get("per_user"), defaults.user_attrs.get("per_user")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(np.std(diff, ddof=1) / math.sqrt(diff.size))
    gain = float(best.value) - float(defaults.value)  # type: ignore[arg-type]
    if se > 0 and gain > min_gain_se * se:
        return None
    return (f"the best trial ({best.number}: {best.value:.5f}) beats the defaults ({defaults.value:.5f}) by "
            f"{gain:.5f}, within {min_gain_se:g} paired SE ({se:.5f} over {diff.size:,} users): noise")


def _view(study_name: str, trials: list[FrozenTrial]) -> optuna.Study:
    """An in-memory study holding only ``trials`` (the budget's), for the plots."""
    view = optuna.create_study(direction="maximize", study_name=study_name)
    view.add_trials(trials)
    return view


def study_key(
    name: str, split_key: str | None, models_cfg: ModelsConfig, eval_cfg: EvalConfig, cfg: TuningConfig
) -> str:
    """What shapes a trial's result, hashed: the study name stays the same when only budgets change."""
    import hashlib
    import json

    blob = {
        "v": STUDY_VERSION,
        "model": name,
        "split": split_key,
        "config": getattr(models_cfg, name).model_dump(mode="json"),
        "space": space_of(cfg, name).model_dump(mode="json"),
        "eval": {"ks": eval_cfg.ks, "primary_metric": eval_cfg.primary_metric},
        "tuning": {k: v for k, v in cfg.model_dump(mode="json").items() if k in
                   ("seed", "metric", "val_max_users", "sampler_startup_trials", "pruning", "pruner_startup_trials")},
        "per_user": True,  # trials carry their per-user values (the paired test against the defaults)
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{name}-{digest}"


def tune_models(
    data: TuneData,
    names: list[str],
    models_cfg: ModelsConfig,
    eval_cfg: EvalConfig,
    cfg: TuningConfig,
    storage_file: Path,
    out_dir: Path,
    split_key: str | None,
) -> Record:
    """Search every model of ``names`` in turn; trials tables and plots are written under ``out_dir``.

    Args:
        data: the train matrix and validation targets (never the test targets).
        names: models to search (``tuned_models``).
        storage_file: the SQLite file of the Optuna storage (created if missing).
        out_dir: where ``<model>/trials.csv`` and ``<model>/*.png`` go.
        split_key: the split's cache key (part of each study's name).

    Returns:
        ``{"metric", "storage", "seconds", "models": {name: study record + trials/plots paths}}``.
    """
    t0 = time.perf_counter()
    storage_file.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead of Optuna's
    storage = optuna.storages.RDBStorage(f"sqlite:///{storage_file.resolve()}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})  # fmt: skip
    deadline = time.monotonic() + cfg.budget_minutes * 60 if cfg.budget_minutes else None
    models: dict[str, Record] = {}
    for i, name in enumerate(names):
        mt = model_tuning(cfg, name)
        now = time.monotonic()
        limits = [now + (deadline - now) / (len(names) - i)] if deadline is not None else []
        if mt.minutes is not None:
            limits.append(now + mt.minutes * 60)
        space = space_of(cfg, name)
        objective = make_objective(name, data, models_cfg, eval_cfg, cfg, out_dir)
        trials, record = run_study(
            name, objective, storage, study_key(name, split_key, models_cfg, eval_cfg, cfg), cfg,
            mt.n_trials or cfg.n_trials, min(limits) if limits else None,
            defaults_in_space(getattr(models_cfg, name), space),
            grid_points(getattr(models_cfg, name), space),
        )  # fmt: skip
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        trials_frame(trials).write_csv(folder / "trials.csv")
        record["trials"] = str(folder / "trials.csv")
        record["plots"] = save_plots(_view(record["study"], trials), folder)
        models[name] = record
    return {
        "metric": cfg.metric or eval_cfg.primary_metric,
        "storage": str(storage_file.resolve()),
        "seconds": round(time.perf_counter() - t0, 3),
        "models": models,
    }


# ----------------------------------------------------------------------------------------------------------
# Results


def apply_tuning(models_cfg: ModelsConfig, record: Mapping[str, Any] | None) -> ModelsConfig:
    """``models_cfg`` with every searched model's best parameters in its config slice (unchanged without a record
    or for a model whose search completed no trial)."""
    if not record:
        return models_cfg
    update = {name: with_params(getattr(models_cfg, name), m["params"])
              for name, m in record.get("models", {}).items() if m.get("params")}  # fmt: skip
    return models_cfg.model_copy(update=update) if update else models_cfg


def trials_frame(trials: list[FrozenTrial]) -> pl.DataFrame:
    """One row per trial: its number in the study, state, value, each parameter, seconds, last reported step (where
    a pruned trial stopped), and whether it was the defaults trial or the re-run of a trial a killed run left."""
    names = sorted({p for t in trials for p in t.params})
    rows = []
    for t in trials:
        steps = sorted(t.intermediate_values)
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                **{f"param_{p}": t.params.get(p) for p in names},
                "seconds": t.user_attrs.get("seconds"),
                "last_step": steps[-1] if steps else None,
                "defaults": bool(t.user_attrs.get("defaults", False)),
                "retry_of": t.user_attrs.get("retry_of"),
            }
        )
    return pl.DataFrame(rows, infer_schema_length=None)


_PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


def save_plots(study: optuna.Study, folder: Path) -> dict[str, str]:
    """Optuna's matplotlib plots of ``study`` as PNGs in ``folder``; a plot that cannot be drawn (too few trials,
    no varying parameter, no intermediate value) is skipped with a log line."""
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    import recsys_embed.tracking.plots  # noqa: F401 - selects the headless Agg backend

    out: dict[str, str] = {}
    stepped = any(t.intermediate_values for t in study.trials)
    for name, fn in _PLOTS.items():
        if name == "intermediate_values" and not stepped:  # EASE: one closed-form fit, no learning curve
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                ax = getattr(ovm, fn)(study)
            fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
            fig.set_size_inches(7, 4.5)
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            out[name] = str(path)
        except Exception as e:  # a plot must never fail the search
            log.info("tuning %s: no %s plot (%s)", study.study_name, name, e)
            plt.close("all")
    return out


def log_tuning(
    tracker: Tracker,
    run_id: str,
    name: str,
    model: Mapping[str, Any],
    final: dict[str, Any],
    test: dict[str, dict[str, float]],
    metric: str,
) -> None:
    """On the model's MLflow run: its final hyperparameters (params ``hp.<name>``), the search (trials table,
    per-trial value series, plots, record) and the defaults' test metrics beside the tuned ones."""
    tracker.log_params(run_id, {f"hp.{k}": v for k, v in final.items() if not isinstance(v, dict | list)})
    tracker.set_tags(run_id, {"tuned": str(bool(model.get("params"))).lower(), "tuning_study": model["study"]})
    summary = {
        f"tuning.best_val_{metric}": model.get("best_value"),
        f"tuning.defaults_val_{metric}": model.get("default_value"),
        "tuning.trials": model["n_trials"],
        "tuning.pruned": model["pruned"],
        "tuning.failed": model["failed"],
        "tuning.seconds": model["seconds"],
        **{f"defaults.test_{k}": v for k, v in test.get("defaults", {}).items()},
    }
    tracker.log_metrics(run_id, {k: v for k, v in summary.items() if v is not None})
    frame = pl.read_csv(model["trials"])
    best = -math.inf
    for row in frame.iter_rows(named=True):  # per-trial series: the MLflow UI charts them against the step
        if row["value"] is None:
            continue
        best = max(best, row["value"]) if row["state"] == "COMPLETE" else best
        series = {"tuning.trial_value": row["value"]}
        if best > -math.inf:
            series["tuning.best_so_far"] = best
        tracker.log_metrics(run_id, series, step=int(row["number"]))
    tracker.log_artifact(run_id, model["trials"], "tuning")
    for path in model.get("plots", {}).values():
        tracker.log_artifact(run_id, path, "tuning")
    tracker.log_dict(run_id, {**model, "test": test}, "tuning/record.json")


def format_table(tuning: Record, metric: str) -> str:
    """Defaults against tuned, per searched model: validation (the search's) and test values of ``metric``."""
    head = f"  {'model':<10} {'val defaults':>12} {'val tuned':>10} {'test defaults':>13} {'test tuned':>10}  params"
    lines = [head]

    def fmt(v: float | None, w: int) -> str:
        return f"{v:>{w}.4f}" if isinstance(v, int | float) else f"{'-':>{w}}"

    for name, m in tuning.get("models", {}).items():
        test = m.get("test", {})
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m["params"].items())
        noise = " (defaults kept: the best trial's gain is within the noise)" if m.get("kept_defaults") else ""
        lines.append(
            f"  {name:<10} {fmt(m.get('default_value'), 12)} {fmt(m.get('best_value'), 10)} "
            f"{fmt(test.get('defaults', {}).get(metric), 13)} {fmt(test.get('tuned', {}).get(metric), 10)}  "
            f"{params or '(defaults kept)'}{noise} [{m['n_trials']} trials, {m['pruned']} pruned, {m['seconds']:.0f} s]"
        )
    return "\n".join(lines)
