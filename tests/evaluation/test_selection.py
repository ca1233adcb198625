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
    # an explicit temporal split keeps its method and carries the warning instead
    explicit = load_config(REPO / "configs/synthetic.yaml", [
        f"ingest.source.path={tiny_log}", f"output_root={tmp_path}", "split.method=temporal",
        "split.min_eval_users=100000",
    ])  # fmt: skip
    kept = stages.run_split(ingest, explicit.ingest, explicit.split, tmp_path / "split2")
    assert kept["split"]["method"] == "temporal" and len(kept["split"]["evidence_warnings"]) == 2
