"""Selection reads the validation window only: the tie rule worked out by hand, and a poisoned test window that
changes nothing about the pick or the best iteration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from recsys_embed.config import load_config
from recsys_embed.data.generate import generate, preset
from recsys_embed.data.split import evidence
from recsys_embed.errors import ConfigError
from recsys_embed.evaluation.selection import paired_se, select
from recsys_embed.pipeline import stages
from recsys_embed.store import load_csr, save_csr
from tests.conftest import REPO


def test_paired_se_by_hand() -> None:
    # differences a - b = [0.1, 0.3, 0.2, 0.2]: mean 0.2, sample std sqrt(0.02 / 3) = 0.08165, SE = 0.08165 / 2
    a = np.array([0.5, 0.6, 0.2, 0.4])
    b = np.array([0.4, 0.3, 0.0, 0.2])
    assert paired_se(a, b) == pytest.approx(math.sqrt(0.02 / 3) / 2)
    assert math.isnan(paired_se(a[:1], b[:1]))


def test_a_gain_inside_the_noise_goes_to_the_simpler_model() -> None:
    # ALS leads popularity by 0.01 on the mean, but the per-user gap swings +-0.2: paired SE = 0.2 / sqrt(4) * ...
    pop = np.array([0.30, 0.30, 0.30, 0.30])
    als = np.array([0.51, 0.11, 0.49, 0.09])  # mean 0.30 + 0.00... shifted below
    als = als + 0.01  # mean 0.31: diff to pop [0.22, -0.18, 0.20, -0.20], mean 0.01, std 0.2309, SE 0.1155
    val = {"popularity": {"ndcg_at_20": float(pop.mean())}, "als": {"ndcg_at_20": float(als.mean())}}
    picked = select(val, {"popularity": pop, "als": als}, "ndcg_at_20", tie_se=1.0)
    assert picked.leader == "als" and picked.best == "popularity"  # 0.01 / 0.1155 = 0.087 SE <= 1: tied
    assert picked.gap_se["popularity"] == pytest.approx(0.01 / paired_se(als, pop))
    # the same mean gain on every user is no noise at all: the leader keeps it
    steady = pop + 0.01
    picked = select({**val, "als": {"ndcg_at_20": float(steady.mean())}}, {"popularity": pop, "als": steady},
                    "ndcg_at_20", tie_se=1.0)  # fmt: skip
    assert picked.best == "als" and picked.tied == ["als"]
    # with no tie band the higher mean always wins
    assert select(val, {"popularity": pop, "als": als}, "ndcg_at_20", tie_se=0.0).best == "als"


def test_no_validation_value_selects_nothing() -> None:
    picked = select({"als": {"ndcg_at_20": float("nan")}}, {}, "ndcg_at_20", 1.0)
    assert picked.best is None and "nothing to select on" in picked.reason


def test_evidence_names_the_count_and_the_standard_error() -> None:
    assert evidence("val", 300, 300) is None
    why = evidence("test", 26, 300)
    assert why is not None and "26 warm users" in why and "min_eval_users=300" in why and "0.059" in why


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate(preset("tiny"), out)
    return out


def _pick(split: dict, cfg, out: Path) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    models, validations = {}, {}
    for name in ("popularity", "als", "bpr"):
        models[name] = stages.run_train(name, split, cfg.models, cfg.eval, out / "models")
        validations[name] = stages.run_validate(models[name], split, cfg.eval, out / "selection")
    picked = stages.select_best(validations, cfg.eval)
    iterations = {m: models[m]["info"].get("returned_iteration") for m in ("als", "bpr")}
    return picked, iterations


def test_poisoned_test_targets_change_neither_the_pick_nor_the_best_iteration(tiny_log: Path, tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/synthetic.yaml", [
        f"ingest.source.path={tiny_log}", f"output_root={tmp_path}", "split.min_eval_users=1",
        "models.als.iterations=6", "models.als.eval_every=2", "models.bpr.iterations=30", "models.bpr.eval_every=10",
    ])  # fmt: skip
    ingest = stages.run_ingest(cfg.ingest, tmp_path / "cache")
    split = stages.run_split(ingest, cfg.ingest, cfg.split, tmp_path / "split")
    honest, honest_iters = _pick(split, cfg, tmp_path / "a")

    # Poison: the test targets become exactly popularity's top items for every user, which would make popularity
    # the best model on test by far if anything read them.
    truth = load_csr(split["test_targets"])
    seen = load_csr(split["train"])
    top = np.argsort(-np.asarray((seen > 0).sum(axis=0)).ravel())[:20]
    rows = np.repeat(np.arange(truth.shape[0]), len(top))
    poison = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.tile(top, truth.shape[0]))), shape=truth.shape)
    poisoned = tmp_path / "poisoned_test_targets.npz"
    save_csr(poison, poisoned)
    bad_split = {**split, "test_targets": str(poisoned), "key": None}  # key None: no cache, train again
    assert stages.run_evaluate(stages.run_train("popularity", bad_split, cfg.models, cfg.eval, tmp_path / "p"),
                               bad_split, cfg.eval)["recall_at_20"] > 0.5  # fmt: skip
    poisoned_pick, poisoned_iters = _pick(bad_split, cfg, tmp_path / "b")
    assert poisoned_pick == honest and poisoned_iters == honest_iters
    assert honest["basis"] == "validation window" and honest["best"] is not None


def test_auto_split_falls_back_to_per_user_when_windows_are_thin(tiny_log: Path, tmp_path: Path) -> None:
    # the tiny log's temporal windows hold a few hundred warm users; demanding more forces the per-user rule
    cfg = load_config(REPO / "configs/synthetic.yaml", [
        f"ingest.source.path={tiny_log}", f"output_root={tmp_path}", "split.method=auto", "split.min_eval_users=100000",
    ])  # fmt: skip
    ingest = stages.run_ingest(cfg.ingest, tmp_path / "cache")
    split = stages.run_split(ingest, cfg.ingest, cfg.split, tmp_path / "split")
    assert split["split"]["method"] == "last_n" and split["split"]["rule"].startswith("auto: last_n")
    assert "fewer than split.min_eval_users=100,000" in split["split"]["rule"]
    assert split["report"]["balanced"] is True
    # an explicit temporal split on a window too thin to choose on stops before anything is trained, naming the fix
    explicit = load_config(REPO / "configs/synthetic.yaml", [
        f"ingest.source.path={tiny_log}", f"output_root={tmp_path}", "split.method=temporal",
        "split.min_eval_users=100000",
    ])  # fmt: skip
    with pytest.raises(ConfigError, match=r"split.method='temporal': the val window holds [\d,]+ warm users to "
                       r"choose on, fewer than split.min_eval_users=100,000.*Use split.method: auto"):  # fmt: skip
        stages.run_split(ingest, explicit.ingest, explicit.split, tmp_path / "split2")
    assert not (tmp_path / "split2").exists()
    # a user who lowers min_eval_users knowingly keeps the explicit window (the test window's warning stays)
    knowing = explicit.split.model_copy(update={"min_eval_users": 10})
    kept = stages.run_split(ingest, explicit.ingest, knowing, tmp_path / "split3")
    assert kept["split"]["method"] == "temporal" and kept["split"]["evidence_warnings"] == []


def test_model_choice_reads_no_user_the_search_scored(tiny_log: Path, tmp_path: Path) -> None:
    """Issue 19.4: the search (trials, best iteration) and the final choice read disjoint validation users, so no
    trial score the search maximised reaches selection or the registry's paired test."""
    cfg = load_config(REPO / "configs/synthetic.yaml", [
        f"ingest.source.path={tiny_log}", f"output_root={tmp_path}", "split.min_eval_users=1",
        "models.bpr.enabled=false", "models.als.iterations=4", "models.als.eval_every=2", "tuning.n_trials=3",
        "tuning.ease.n_trials=2",
    ])  # fmt: skip
    ingest = stages.run_ingest(cfg.ingest, tmp_path / "cache")
    split = stages.run_split(ingest, cfg.ingest, cfg.split, tmp_path / "split", tmp_path / "cache")
    search, choose = load_csr(split["val_targets"]), load_csr(split["select_targets"])
    search_users = set(np.flatnonzero(np.diff(search.indptr)))
    choose_users = set(np.flatnonzero(np.diff(choose.indptr)))
    assert search_users and choose_users and not search_users & choose_users
    assert len(search_users) + len(choose_users) == split["val_warm_users"]
    assert "chosen on" in split["split"]["selection_rule"]

    # 1. the search never reads the selection part: with that file gone, the search's trials are the same
    tune = stages.run_tune(split, cfg.models, cfg.eval, cfg.tuning, tmp_path / "cache", tmp_path / "a.db")
    blind = {**split, "select_targets": str(tmp_path / "gone" / "select_targets.npz")}
    again = stages.run_tune(blind, cfg.models, cfg.eval, cfg.tuning, tmp_path / "cache2", tmp_path / "b.db")
    assert again["models"]["als"]["best_value"] == tune["models"]["als"]["best_value"]
    assert again["models"]["ease"]["params"] == tune["models"]["ease"]["params"]

    # 2. the choice never reads the search part: poisoning it (popularity's top items as every user's targets)
    # changes no validation value selection or the registry reads
    from recsys_embed.models.tuning import apply_tuning

    models_cfg = apply_tuning(cfg.models, tune)
    seen = load_csr(split["train"])
    top = np.argsort(-np.asarray((seen > 0).sum(axis=0)).ravel())[:20]
    rows = np.repeat(np.arange(search.shape[0]), len(top))
    poison = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.tile(top, search.shape[0]))),
                           shape=search.shape)  # fmt: skip
    save_csr(poison, tmp_path / "poisoned_search.npz")
    poisoned = {**split, "val_targets": str(tmp_path / "poisoned_search.npz")}
    honest, bad = {}, {}
    for name in ("popularity", "ease", "als"):
        model = stages.run_train(name, split, models_cfg, cfg.eval, tmp_path / "m", cache_root=tmp_path / "cache")
        honest[name] = stages.run_validate(model, split, cfg.eval, tmp_path / "v1")
        bad[name] = stages.run_validate(model, poisoned, cfg.eval, tmp_path / "v2")
        assert honest[name]["metrics"] == bad[name]["metrics"], name
        per_user = np.load(honest[name]["per_user"])
        assert per_user.size == len(choose_users)  # scored on the selection users only
    assert stages.select_best(honest, cfg.eval) == stages.select_best(bad, cfg.eval)
    # and the values selection reads are not the search's: the tuned ALS's best trial was scored on other users
    assert honest["als"]["metrics"]["ndcg_at_20"] != tune["models"]["als"]["best_value"]
