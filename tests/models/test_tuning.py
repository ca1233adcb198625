"""The validation-window search: it reads no test target, the same seed and trial budget give the same trials, a
killed search resumes without repeating finished trials, budgets stop it, pruning hooks report, and the flow applies
the tuned parameters and reports defaults against tuned (MLflow trials table, plots, final hyperparameters)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed.config import PipelineConfig, TuningConfig, load_config
from recsys_embed.data.generate import generate, preset
from recsys_embed.models.tuning import apply_tuning, format_table, run_study
from recsys_embed.pipeline import stages
from recsys_embed.store import save_csr
from tests.conftest import REPO, RETAIL

N_TRIALS = 6


def _cfg(log: Path, out: Path, *extra: str) -> PipelineConfig:
    """Small, fast searches: ALS (4 iterations, validated every one) and EASE on the tiny generated log."""
    return load_config(
        REPO / "configs/synthetic.yaml",
        [f"ingest.source.path={log}", f"output_root={out}", "models.bpr.enabled=false",
         "models.als.iterations=4", "models.als.eval_every=1", "models.als.use_gpu=false",
         "tuning.als.space.factors=[4, 32]", f"tuning.n_trials={N_TRIALS}", "tuning.ease.n_trials=3",
         "tuning.budget_minutes=null", "tuning.sampler_startup_trials=2", "tuning.pruner_startup_trials=1",
         *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The tiny generated log, ingested and split once (with a cache, so the split has a key)."""
    root = tmp_path_factory.mktemp("tuning")
    generate(preset("tiny"), root / "log")
    cfg = _cfg(root / "log", root)
    ingest = stages.run_ingest(cfg.ingest, root / "cache")
    split = stages.run_split(ingest, cfg.ingest, cfg.split, root / "split", root / "cache")
    assert split.get("val_targets") and split.get("test_targets")
    return root / "log", split


def _tune(split: dict[str, Any], cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    return stages.run_tune(split, cfg.models, cfg.eval, cfg.tuning, root / "cache", root / "optuna.db")


def _trials(record: dict[str, Any], name: str) -> pl.DataFrame:
    """The search as a sequence: state, value and parameters of each budget trial (study numbers left out)."""
    frame = pl.read_csv(record["models"][name]["trials"])
    return frame.select("state", "value", *sorted(c for c in frame.columns if c.startswith("param_")))


@pytest.fixture(scope="module")
def reference(prepared: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    log, split = prepared
    root = tmp_path_factory.mktemp("reference")
    return _tune(split, _cfg(log, root), root)


def test_search_reads_no_test_target(
    prepared: tuple[Path, dict[str, Any]], reference: dict[str, Any], tmp_path: Path
) -> None:
    log, split = prepared
    # 1. the test targets file removed: any read would raise FileNotFoundError
    removed = {**split, "test_targets": str(tmp_path / "removed" / "test_targets.npz")}
    a = _tune(removed, _cfg(log, tmp_path / "a"), tmp_path / "a")
    # 2. a copy of the split whose test targets are poisoned (random pairs): nothing may change
    folder = tmp_path / "poisoned"
    shutil.copytree(split["folder"], folder)
    poisoned = stages._relocate(split, [(split["folder"], str(folder))])
    n_users, n_items = split["n_users"], split["n_items"]
    rng = np.random.default_rng(0)
    junk = sp.random(n_users, n_items, density=0.05, format="csr", dtype=np.float32, random_state=rng)
    save_csr(junk, poisoned["test_targets"])
    b = _tune(poisoned, _cfg(log, tmp_path / "b"), tmp_path / "b")
    for name in ("ease", "als"):
        assert _trials(a, name).equals(_trials(reference, name)), name
        assert _trials(b, name).equals(_trials(reference, name)), name
        assert a["models"][name]["params"] == b["models"][name]["params"] == reference["models"][name]["params"]


def test_same_seed_and_trial_budget_give_the_same_best_params(
    prepared: tuple[Path, dict[str, Any]], reference: dict[str, Any], tmp_path: Path
) -> None:
    log, split = prepared
    again = _tune(split, _cfg(log, tmp_path / "again"), tmp_path / "again")
    other = _tune(split, _cfg(log, tmp_path / "other", "tuning.seed=7"), tmp_path / "other")
    for name in ("ease", "als"):
        assert again["models"][name]["params"] == reference["models"][name]["params"]
        assert again["models"][name]["best_value"] == reference["models"][name]["best_value"]
        assert _trials(again, name).equals(_trials(reference, name))
    # not vacuous: another seed draws other trials (trial 0 is the configured defaults in both); EASE's 3 trials
    # are its defaults and two grid points (lambda x4, /4), which no seed moves
    assert not _trials(other, "als")[1:].equals(_trials(reference, "als")[1:])
    assert _trials(other, "ease")["param_regularization"].to_list() == [200.0, 800.0, 50.0]
    assert reference["models"]["als"]["n_trials"] == N_TRIALS and reference["models"]["ease"]["n_trials"] == 3


def test_defaults_are_trial_zero_and_never_beaten_by_the_result(reference: dict[str, Any]) -> None:
    for name, m in reference["models"].items():
        first = pl.read_csv(m["trials"]).row(0, named=True)
        assert first["defaults"] is True, name
        assert m["best_value"] >= m["default_value"], name
    # the configured factors (64) lie outside the searched [4, 32], so trial 0 draws them; the rest are the defaults
    assert reference["models"]["als"]["defaults"] == {"regularization": 0.05, "alpha": 10.0, "confidence": "none"}
    assert reference["models"]["ease"]["defaults"] == {"regularization": 200.0}


@pytest.mark.parametrize("point", ["tune-trial:als:3", "tune:als:3"])
def test_killed_search_resumes_without_repeating_finished_trials(
    point: str, prepared: tuple[Path, dict[str, Any]], reference: dict[str, Any], tmp_path: Path
) -> None:
    log, split = prepared
    (tmp_path / "split.json").write_text(json.dumps(split), encoding="utf-8")
    code = (
        "import json, sys; from pathlib import Path\n"
        "from recsys_embed.pipeline import stages\nfrom tests.models.test_tuning import _cfg\n"
        "log, root = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "split = json.loads((root / 'split.json').read_text())\n"
        "cfg = _cfg(log, root)\n"
        "stages.run_tune(split, cfg.models, cfg.eval, cfg.tuning, root / 'cache', root / 'optuna.db')\n"
    )
    env = {**os.environ, "RECSYS_EMBED_KILL_AT": point, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", code, str(log), str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not list((tmp_path / "cache").glob("tune-*/_SUCCESS"))  # nothing committed

    resumed = _tune(split, _cfg(log, tmp_path), tmp_path)
    als = resumed["models"]["als"]
    # three ALS trials were stored before the kill: reused, not run again; only the rest ran
    assert als["reused_trials"] == 3 and als["new_trials"] == N_TRIALS - 3
    assert resumed["models"]["ease"]["reused_trials"] == 3 and resumed["models"]["ease"]["new_trials"] == 0
    # ...and the search is the one an uninterrupted run makes
    assert _trials(resumed, "als").equals(_trials(reference, "als"))
    assert als["params"] == reference["models"]["als"]["params"]
    study = optuna.load_study(study_name=als["study"], storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]
    if point.startswith("tune-trial"):  # killed inside trial 3: it is failed and its parameters run again first
        assert len(states) == N_TRIALS + 1 and states[3] == optuna.trial.TrialState.FAIL
        assert study.trials[4].user_attrs["retry_of"] == 3 and study.trials[4].params == study.trials[3].params
    else:  # killed between trials: nothing to redo
        assert len(states) == N_TRIALS and optuna.trial.TrialState.FAIL not in states


def test_cached_result_and_a_deeper_search_continue_the_study(
    prepared: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    log, split = prepared
    first = _tune(split, _cfg(log, tmp_path), tmp_path)
    again = _tune(split, _cfg(log, tmp_path), tmp_path)
    assert first["cached"] is False and again["cached"] is True
    assert again["models"]["als"]["params"] == first["models"]["als"]["params"]
    deeper = _tune(split, _cfg(log, tmp_path, f"tuning.n_trials={N_TRIALS + 2}"), tmp_path)
    assert deeper["cached"] is False
    assert deeper["models"]["als"]["reused_trials"] == N_TRIALS and deeper["models"]["als"]["new_trials"] == 2
    assert _trials(deeper, "als")[:N_TRIALS].equals(_trials(first, "als"))


def test_time_budget_stops_the_search_and_defaults_are_kept(
    prepared: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    log, split = prepared
    cfg = _cfg(log, tmp_path, "tuning.budget_minutes=0.000001")
    record = _tune(split, cfg, tmp_path)
    for m in record["models"].values():
        assert m["stopped_by"] == "time" and m["n_trials"] == 0 and m["params"] == {}
    assert apply_tuning(cfg.models, record) == cfg.models
    # a clock-stopped search depends on machine load: it is used by its run but never cached as complete
    assert record["folder"].endswith("-clock-stopped") and Path(record["folder"], "record.json").exists()
    again = _tune(split, cfg, tmp_path)
    assert again["cached"] is False and again["folder"].endswith("-clock-stopped")


def test_pruning_hooks_report_every_validation_step(reference: dict[str, Any]) -> None:
    frame = pl.read_csv(reference["models"]["als"]["trials"])
    # ALS validates every iteration (eval_every=1), so each trial reported; a pruned one stopped before the end
    assert frame.filter(pl.col("state") == "COMPLETE")["last_step"].to_list() == [4] * frame.filter(
        pl.col("state") == "COMPLETE").height  # fmt: skip
    pruned = frame.filter(pl.col("state") == "PRUNED")
    assert pruned.height >= 1 and (pruned["last_step"] < 4).all()  # measured on this seed: 2 of 6, at steps 1 and 2
    assert reference["models"]["als"]["pruned"] == pruned.height
    assert set(reference["models"]["als"]["plots"]) == {"optimization_history", "param_importances",
                                                       "parallel_coordinate", "intermediate_values"}  # fmt: skip
    assert "intermediate_values" not in reference["models"]["ease"]["plots"]  # closed form: no curve


def test_two_tower_reports_every_epoch(prepared: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    log, split = prepared
    cfg = _cfg(log, tmp_path, "models.als.enabled=false", "models.ease.enabled=false",
               "models.two_tower.enabled=true", "models.two_tower.max_epochs=2", "models.two_tower.patience=0",
               "models.two_tower.embedding_dim=8", "models.two_tower.hidden_dim=16",
               "models.two_tower.text_buckets=64", "models.two_tower.accelerator=cpu",
               "tuning.two_tower.tune=true", "tuning.n_trials=2",
               "tuning.two_tower.space.embedding_dim=[8, 16]", "tuning.pruner_startup_trials=2")  # fmt: skip
    record = _tune(split, cfg, tmp_path)
    frame = pl.read_csv(record["models"]["two_tower"]["trials"])
    assert frame["state"].to_list() == ["COMPLETE", "COMPLETE"] and frame["last_step"].to_list() == [2, 2]
    assert not list(tmp_path.glob("cache/tune-*/two_tower-trial-*"))  # each trial's scratch folder removed


def test_run_study_records_pruned_and_failed_trials_and_goes_on(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    cfg = TuningConfig(seed=3, sampler_startup_trials=2, pruner_startup_trials=1)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if 0.4 < x < 0.5:
            raise ValueError("a fit that blows up")
        for step in range(1, 4):
            trial.report(x * step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x

    trials, record = run_study("toy", objective, storage, "toy", cfg, 12, None, {"x": 0.45})
    assert len(trials) == record["n_trials"] == 12
    assert record["failed"] >= 1 and trials[0].state == optuna.trial.TrialState.FAIL  # the defaults blew up
    assert record["pruned"] >= 1 and record["complete"] + record["pruned"] + record["failed"] == 12
    assert record["best_value"] == max(t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert record["default_value"] is None


def test_apply_tuning_validates_and_leaves_the_rest() -> None:
    cfg = load_config(REPO / "configs/retail.yaml")
    record = {"models": {"als": {"params": {"factors": 128, "alpha": 2.5}}, "ease": {"params": {}}}}
    tuned = apply_tuning(cfg.models, record)
    assert tuned.als.factors == 128 and tuned.als.alpha == 2.5
    assert tuned.als.regularization == cfg.models.als.regularization
    assert tuned.ease == cfg.models.ease and tuned.bpr == cfg.models.bpr
    assert apply_tuning(cfg.models, None) is cfg.models


@pytest.mark.slow
def test_flow_tunes_reports_defaults_vs_tuned_and_skips_ease_above_budget(
    prefect_harness: None, tmp_path: Path, mlflow_yml: Path, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow import MlflowClient

    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.config import load_mlflow_settings
    from recsys_embed.tracking.tracker import resolve_settings

    src = tmp_path / "events.parquet"
    pl.read_parquet(RETAIL, n_rows=30_000).write_parquet(src)
    overrides = [f"ingest.source.path={src}", f"output_root={tmp_path / 'out'}", "models.bpr.enabled=false",
                 "models.two_tower.enabled=false", "models.als.iterations=4", "models.als.eval_every=2",
                 "models.ease.max_items=10", "tuning.n_trials=3", "tuning.budget_minutes=null",
                 "registry.enabled=false"]  # fmt: skip
    manifest = embedding_pipeline(str(REPO / "configs/retail.yaml"), overrides, str(mlflow_yml))
    # EASE is above its budget: skipped with the numbers and the fix named (Prefect's log handler prints it), the
    # run finished without it
    assert set(manifest["metrics"]) == {"popularity", "als"}
    # the library's log record (caplog), or Prefect's handler's print (capfd): an earlier test in the same process
    # may have bound the root handler to another stream
    err = capfd.readouterr().err + caplog.text
    assert "items is over models.ease.max_items = 10" in err and "models.ease.enabled=false; skipping it" in err

    tuning = manifest["tuning"]
    als = tuning["models"]["als"]
    assert set(tuning["models"]) == {"als"} and als["n_trials"] == 3 and tuning["seconds"] > 0
    assert set(als["test"]) == {"defaults", "tuned"}
    assert als["test"]["tuned"] == manifest["metrics"]["als"]  # the shipped ALS is the tuned one
    assert "als" in format_table(tuning, "ndcg_at_20")

    client = MlflowClient(resolve_settings(load_mlflow_settings(mlflow_yml)).tracking_uri)
    run = client.get_run(manifest["mlflow"]["model_runs"]["als"])
    final = {**{"factors": 64, "regularization": 0.05, "alpha": 10.0}, **als["params"]}
    assert int(run.data.params["hp.factors"]) == final["factors"]
    assert float(run.data.params["hp.alpha"]) == pytest.approx(final["alpha"])
    assert run.data.metrics["tuning.trials"] == 3 and "tuning.best_val_ndcg_at_20" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "tuning.trial_value")) == 3
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "tuning")}
    assert {"tuning/trials.csv", "tuning/optimization_history.png", "tuning/record.json"} <= arts
    assert client.get_run(manifest["mlflow"]["run_id"]).data.metrics["tuning_seconds"] > 0

    again = embedding_pipeline(str(REPO / "configs/retail.yaml"), overrides, str(mlflow_yml))
    assert again["tuning"]["cached"] is True and again["tuning"]["models"]["als"]["params"] == als["params"]


def test_ease_half_life_is_searched_only_where_the_model_uses_it() -> None:
    from recsys_embed.config import EASEConfig
    from recsys_embed.models.tuning import defaults_in_space, searched, space_of

    space = space_of(TuningConfig(), "ease")
    plain = EASEConfig(enabled=True, regularization=200.0)  # the paper's binary matrix: no half-life to tune
    decayed = plain.model_copy(update={"half_life_days": 60.0})
    assert set(searched(space, plain)) == {"regularization"}
    assert set(searched(space, decayed)) == {"regularization", "half_life_days"}
    assert defaults_in_space(plain, space) == {"regularization": 200.0}  # trial 0: exactly the configured model
    assert defaults_in_space(decayed, space) == {"regularization": 200.0, "half_life_days": 60.0}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    from recsys_embed.models.tuning import suggest

    drawn = [suggest(study.ask(), space, plain) for _ in range(5)]
    assert all(set(d) == {"regularization"} for d in drawn)


def test_a_best_trial_inside_the_noise_keeps_the_defaults() -> None:
    """Issue 19: the best of many trials on one set of users flatters itself. Worked out: defaults per user
    [0.2, 0.4, 0.0, 0.2] (mean 0.2); a trial [0.5, 0.1, 0.3, 0.0] (mean 0.225) differs by [0.3, -0.3, 0.3, -0.2],
    mean 0.025, sample std 0.3202, paired SE 0.1601: a gain of 0.16 SE is noise, the defaults stay. A trial that
    gains 0.05 on every user (SE 0) is no noise: it wins."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from recsys_embed.models.tuning import _no_gain_in_noise

    def trial(number: int, per_user: list[float]) -> Any:
        t = create_trial(value=float(np.mean(per_user)), params={"x": float(number)},
                         distributions={"x": FloatDistribution(0, 10)}, user_attrs={"per_user": per_user})  # fmt: skip
        t.number = number
        return t

    defaults = trial(0, [0.2, 0.4, 0.0, 0.2])
    noisy = trial(3, [0.5, 0.1, 0.3, 0.0])
    why = _no_gain_in_noise(noisy, defaults, 1.0)
    assert why is not None and "within 1 paired SE (0.16008 over 4 users)" in why
    assert _no_gain_in_noise(noisy, defaults, 0.1) is None  # a looser bar: 0.16 SE passes it
    steady = trial(4, [0.25, 0.45, 0.05, 0.25])
    assert _no_gain_in_noise(steady, defaults, 1.0) is None
    assert _no_gain_in_noise(defaults, defaults, 1.0) is None and _no_gain_in_noise(noisy, None, 1.0) is None


def test_ease_starts_from_a_log_grid_around_its_default() -> None:
    from recsys_embed.config import EASEConfig, EASESpace
    from recsys_embed.models.tuning import grid_points

    points = grid_points(EASEConfig(regularization=200.0), EASESpace())
    assert points == [{"regularization": 800.0}, {"regularization": 50.0}, {"regularization": 3200.0},
                      {"regularization": 12.5}]  # fmt: skip
    # clipped to the range, never repeated; the half-life (when searched) stays at its default in each point
    near_top = grid_points(EASEConfig(regularization=5000.0, half_life_days=60.0), EASESpace())
    assert [p["regularization"] for p in near_top] == [10_000.0, 1250.0, 312.5]
    assert all(p["half_life_days"] == 60.0 for p in near_top)
