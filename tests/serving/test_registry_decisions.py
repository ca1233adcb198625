"""The champion decision and its one-step commit, on a real MLflow store (SQLite in tmp_path), without the flow.

Each candidate is a tiny served model (5 users x 4 items, 3 factors) logged on a run of its own, so a
registration takes well under a second. What is checked:

- ``decide_paired`` and the registry's paired z-test on a tiny per-user example worked out by hand;
- a kill at any point between registering a version and re-pointing ``current/`` (``register``,
  ``register:alias``, ``publish:champion``, or the alias call itself) is completed by the re-run: the same
  champion alias, ``champion.json`` and ``current`` link as an uninterrupted run, one version only;
- the data identity is the events used: a cut (``ingest.until``) or backfill run never replaces a champion trained
  on later data unless ``registry.allow_older``, and the full run takes the alias back to its identical version;
- the recipe hash leaves machine settings out; the version and its LoggedModel say what their metrics measured
  apart from what the model was trained on; ``registry.metric`` is gone (it did not decide anything).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed import faults
from recsys_embed.config import (
    ExportConfig,
    IngestConfig,
    ModelsConfig,
    RegistryConfig,
    load_config,
    load_mlflow_settings,
)
from recsys_embed.errors import ConfigError, RecsysEmbedError
from recsys_embed.io import SUCCESS_MARKER
from recsys_embed.pipeline import shipping
from recsys_embed.pipeline.records import ExportRecord, RegistryDecision
from recsys_embed.serving import registry
from recsys_embed.serving.registry import ChampionScore, decide_paired, register_best
from recsys_embed.store import save_csr, save_embeddings
from recsys_embed.tracking.tracker import Tracker, resolve_settings
from recsys_embed.types import Candidate, Embeddings, IdMap
from tests.conftest import REPO

FULL_LAST = "2011-12-09 12:50:00+00:00"  # the whole retail log
CUT_LAST = "2011-05-31 17:35:00+00:00"  # ingest.until=2011-06-01

# Per-user validation values of a tiny paired comparison, worked out by hand:
#   new - champion = [0.25, 0.0, 0.5, 0.25]: mean gain 0.25
#   deviations [0, -0.25, 0.25, 0]: sum of squares 0.125, / (4 - 1) = 0.041667, std 0.204124
#   paired SE = 0.204124 / sqrt(4) = 0.102062
#   z = 1.64: needs > 1.64 x 0.102062 = 0.167382 -> promote;  z = 2.5: needs > 0.255155 -> keep the champion
NEW = np.array([0.5, 0.25, 1.0, 0.25])
CHAMP = np.array([0.25, 0.25, 0.5, 0.0])
SE = 0.204124145 / 2


# ----------------------------------------------------------------------------------------------------------
# decide_paired and the registry's z-test


def test_decide_paired_worked_example() -> None:
    promoted, why, stats = decide_paired(NEW, CHAMP, margin=0.0, z=1.64)
    assert promoted is True and "2.4 paired SE over 4 users" in why  # 0.25 / 0.102062 = 2.45
    assert stats["gain"] == pytest.approx(0.25)
    assert stats["se"] == pytest.approx(SE, abs=1e-9)
    assert stats["need"] == pytest.approx(1.64 * SE) and stats["users"] == 4

    promoted, why, stats = decide_paired(NEW, CHAMP, margin=0.0, z=2.5)
    assert promoted is False and "needs > 0.2552" in why  # 2.5 x 0.102062 = 0.255155 > 0.25
    # the margin binds when it is larger than the noise: 0.3 > 1.64 x 0.102062
    promoted, why, stats = decide_paired(NEW, CHAMP, margin=0.3, z=1.64)
    assert promoted is False and stats["need"] == pytest.approx(0.3) and "margin 0.3" in why
    # a gain equal to what is needed does not promote (strictly greater)
    assert decide_paired(NEW, CHAMP, margin=0.25, z=0.0)[0] is False


def test_decide_paired_degenerate_spreads() -> None:
    # every user gains exactly 1.0: the paired SE is 0, so any z passes and only the margin binds
    promoted, why, stats = decide_paired(np.array([1.0, 1.0]), np.array([0.0, 0.0]), margin=0.5, z=1.64)
    assert promoted is True and stats["se"] == 0.0 and "every user gains the same" in why
    # one user: the SE is undefined (NaN), only the margin applies
    promoted, why, stats = decide_paired(np.array([0.5]), np.array([0.25]), margin=0.1, z=1.64)
    assert promoted is True and math.isnan(stats["se"]) and stats["need"] == pytest.approx(0.1)
    assert decide_paired(np.array([0.5]), np.array([0.25]), margin=0.3, z=1.64)[0] is False


# ----------------------------------------------------------------------------------------------------------
# A tiny registry


class Store:
    """An MLflow SQLite store and a factory of tiny candidates, each logged on a run of its own."""

    def __init__(self, tmp: Path, mlflow_yml: Path) -> None:
        self.tmp = tmp
        self.settings = load_mlflow_settings(mlflow_yml)
        self.tracker = Tracker(self.settings)
        rng = np.random.default_rng(0)
        emb = Embeddings(rng.random((5, 3)), rng.random((4, 3)), IdMap(pl.Series("id", [1, 2, 3, 4, 5])),
                         IdMap(pl.Series("id", ["a", "b", "c", "d"])), "bpr")  # fmt: skip
        self.embeddings = save_embeddings(emb, tmp / "emb")
        self.seen = save_csr(sp.csr_matrix(np.eye(5, 4)), tmp / "seen.npz")
        self.n = 0

    def candidate(self, key: str, last: str = FULL_LAST, recipe: str = "bpr-recipe",
                  per_user: np.ndarray | None = None, value: float = 0.3,
                  extra: dict[str, str] | None = None) -> Candidate:  # fmt: skip
        self.n += 1
        parent = self.tracker.start_run(f"run-{self.n}")
        child = self.tracker.start_run("bpr", parent_run_id=parent)
        pu = None
        if per_user is not None:
            pu = str(self.tmp / f"per_user-{self.n}.npy")
            np.save(pu, per_user)
        tags = {"pipeline": "tiny", "training_window_first": "2010-12-01 08:26:00+00:00",
                "training_window_last": last, "training_rows": "1000", **(extra or {})}  # fmt: skip
        return Candidate("bpr", child, parent, str(self.embeddings), str(self.seen),
                         {"val_ndcg_at_20": value, "test_ndcg_at_20": value - 0.05}, pu, recipe, "{}", key,
                         tags)  # fmt: skip

    def register(self, c: Candidate, cfg: RegistryConfig | None = None,
                 judge: Callable[[dict[str, str]], ChampionScore | None] | None = None,
                 ) -> RegistryDecision:  # fmt: skip
        return cast(RegistryDecision, register_best(self.settings, c, ExportConfig(), cfg or RegistryConfig(),
                                                    "ndcg_at_20", judge, name="tiny"))  # fmt: skip

    @property
    def client(self) -> Any:
        from mlflow import MlflowClient

        uri = resolve_settings(self.settings).tracking_uri
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def champion(self) -> str | None:
        mv = registry._alias_version(self.client, "tiny", "champion")
        return str(mv.version) if mv is not None else None

    def versions(self) -> list[str]:
        return sorted(str(v.version) for v in self.client.search_model_versions("name = 'tiny'"))

    def export(self, run: str) -> ExportRecord:
        """A committed top-k table in ``runs/<run>/exports/bpr`` as ``run_publish`` reads it."""
        topk = self.tmp / "root" / "runs" / run / "exports" / "bpr" / "topk"
        topk.mkdir(parents=True, exist_ok=True)
        (topk / SUCCESS_MARKER).touch()
        return {"model": "bpr", "topk": str(topk), "topk_rows": 100, "run_dir": str(topk.parents[2])}


@pytest.fixture
def store(tmp_path: Path, mlflow_yml: Path) -> Store:
    return Store(tmp_path, mlflow_yml)


def test_registry_paired_z_test(store: Store) -> None:
    assert store.register(store.candidate("k1", recipe="A"))["reason"] == "no champion yet"

    def judge(tags: dict[str, str]) -> ChampionScore:
        assert tags["recipe"] in ("A", "B")  # the champion version's tags
        return ChampionScore(float(CHAMP.mean()), CHAMP, "its recipe on this run's windows")

    # another recipe, 0.25 better over 4 users with paired SE 0.102: beats 1.64 SE (0.167)
    won = store.register(store.candidate("k2", recipe="B", per_user=NEW), RegistryConfig(z=1.64), judge)
    assert won["alias"] == "champion" and won["promoted"] is True and won["previous_champion"] == "1"
    paired = won["paired"] or {}
    assert paired["gain"] == pytest.approx(0.25) and paired["se"] == pytest.approx(SE, abs=1e-9)
    assert won["champion_value"] == pytest.approx(0.25) and won["champion_basis"] == "its recipe on this run's windows"
    # the same evidence does not beat 2.5 SE (0.255): the challenger alias, the champion stays v2
    lost = store.register(store.candidate("k3", recipe="C", per_user=NEW), RegistryConfig(z=2.5), judge)
    assert lost["alias"] == "challenger" and lost["promoted"] is False and "needs > 0.2552" in lost["reason"]
    assert store.champion() == "2"


# ----------------------------------------------------------------------------------------------------------
# Register + alias + champion.json + current/ as one step


def _published(store: Store) -> tuple[dict[str, Any], Path]:
    root = store.tmp / "root"
    pointer = json.loads((root / "champion.json").read_text())
    return pointer, (root / "current").resolve()


class Killed(BaseException):
    """Stands for the SIGKILL of the fault suite: nothing catches it on the way out."""


@pytest.mark.parametrize("point", ["register", "register:alias", "publish:champion"])
def test_a_kill_between_register_and_current_is_completed_by_the_rerun(
    store: Store, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    def checkpoint(name: str) -> None:
        if armed and name == point and not fired:
            fired.append(name)
            raise Killed(name)

    armed: list[bool] = []
    fired: list[str] = []
    monkeypatch.setattr(faults, "checkpoint", checkpoint)
    monkeypatch.setattr(shipping, "checkpoint", checkpoint)
    root = store.tmp / "root"
    old = store.candidate("k-old", last=CUT_LAST, recipe="A")
    shipping.run_publish(root, store.export("old"), store.register(old))  # v1, published
    c = store.candidate("k-new", recipe="A")  # the same recipe on newer data: replaces v1
    armed.append(True)
    with pytest.raises(Killed):
        shipping.run_publish(root, store.export("killed"), store.register(c))
    assert fired == [point]

    again = store.register(c)  # the same command again
    published = shipping.run_publish(root, store.export("rerun"), again)
    assert store.versions() == ["1", "2"] and store.champion() == "2"  # registered once, champion as uninterrupted
    assert again["alias"] == "champion" and again["registered"] is False
    pointer, current = _published(store)
    assert pointer["version"] == "2" and published["version"] == "2"
    assert current == Path(pointer["topk_path"]).parent  # current/ agrees with champion.json
    record = json.loads(store.client.get_model_version("tiny", "2").tags[registry.DECISION_RECORD])
    assert record["applied"] is True and record["previous_champion"] == "1"
    # and once more: nothing moves
    third = store.register(c)
    assert third["reason"].startswith("unchanged") and shipping.run_publish(root, store.export("third"), third)[
        "moved"] is False  # fmt: skip
    assert _published(store) == (pointer, current)


def test_issue_20_1_a_version_left_without_alias_is_completed(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported state: v1 registered, the kill before its alias moved, no champion.json. The old re-run said
    "unchanged", marked v1 challenger and failed in publish; ``recommend --from-registry`` found no champion."""
    from mlflow import MlflowClient

    real = MlflowClient.set_registered_model_alias
    calls: list[str] = []

    def dies_once(self: Any, name: str, alias: str, version: str) -> None:
        if not calls:
            calls.append(alias)
            raise Killed("between registering v1 and moving its alias")
        real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", dies_once)
    c = store.candidate("k1")
    with pytest.raises(Killed):
        store.register(c)
    assert store.versions() == ["1"] and store.champion() is None

    rerun = store.register(c)
    assert rerun["alias"] == "champion" and rerun["version"] == "1" and rerun["registered"] is False
    assert "interrupted run" in rerun["reason"], rerun["reason"]
    assert store.champion() == "1"
    published = shipping.run_publish(store.tmp / "root", store.export("rerun"), rerun)
    assert published["moved"] is True and published["version"] == "1"


def test_a_publish_killed_before_current_moved_is_repaired(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    root = store.tmp / "root"
    first = store.register(store.candidate("k1"))
    real = os.symlink

    def dies_once(src: str, dst: str) -> None:
        monkeypatch.setattr(os, "symlink", real)
        raise Killed("after champion.json, before current/")

    monkeypatch.setattr(os, "symlink", dies_once)
    with pytest.raises(Killed):
        shipping.run_publish(root, store.export("killed"), first)
    assert (root / "champion.json").exists() and not (root / "current").exists()
    rerun = store.register(store.candidate("k1"))  # an identical run: unchanged champion
    assert rerun["reason"].startswith("unchanged")
    published = shipping.run_publish(root, store.export("rerun"), rerun)
    pointer, current = _published(store)
    assert published["moved"] is False and current == Path(pointer["topk_path"]).parent  # kept, link repaired


def test_a_challenger_without_champion_file_says_why(store: Store) -> None:
    store.register(store.candidate("k1", recipe="A", value=0.5))
    lost = store.register(store.candidate("k2", recipe="B", value=0.1))
    assert lost["alias"] == "challenger"
    with pytest.raises(RecsysEmbedError, match=r"champion\.json is missing and this run's v2 is the challenger"):
        shipping.run_publish(store.tmp / "root", store.export("x"), lost)


# ----------------------------------------------------------------------------------------------------------
# The data identity: what the champion was trained on


def test_a_cut_run_never_replaces_a_champion_trained_on_later_data(store: Store) -> None:
    full = store.register(store.candidate("k-full", last=FULL_LAST))
    assert full["alias"] == "champion"
    # `run --set ingest.until=2011-06-01`: the same recipe on the same files, events to 2011-05-31
    cut = store.register(store.candidate("k-cut", last=CUT_LAST))
    assert cut["alias"] == "challenger" and cut["promoted"] is False, cut
    assert "older data" in cut["reason"] and "registry.allow_older" in cut["reason"]
    assert store.champion() == "1"
    # a plain `run` again: v1 holds it, and it is the champion
    assert store.register(store.candidate("k-full"))["reason"].startswith("unchanged")

    # the flag lets a deliberate cut run take the alias ...
    rolled = store.register(store.candidate("k-cut-allowed", last=CUT_LAST), RegistryConfig(allow_older=True))
    assert rolled["alias"] == "champion" and "allow_older" in rolled["reason"] and store.champion() == "3"
    # ... and the next full run takes it back: its identical version v1 is re-promoted, nothing registered
    back = store.register(store.candidate("k-full"))
    assert back["alias"] == "champion" and back["version"] == "1" and back["registered"] is False
    assert back["promoted"] is True and "refit on newer data" in back["reason"] and back["previous_champion"] == "3"
    assert store.champion() == "1" and store.versions() == ["1", "2", "3"]


def test_newer_means_a_later_last_event_not_another_fingerprint(store: Store) -> None:
    store.register(store.candidate("k1", last=FULL_LAST, extra={"data_fingerprint": "aaa"}))
    # other files (a new fingerprint) whose kept events end earlier: older, whatever the fingerprint says
    older = store.register(store.candidate("k2", last=CUT_LAST, extra={"data_fingerprint": "bbb"}))
    assert older["alias"] == "challenger" and "older data" in older["reason"]
    # a later last event: newer
    newer = store.register(store.candidate("k3", last="2011-12-10 09:00:00+00:00", extra={"data_fingerprint": "bbb"}))
    assert newer["alias"] == "champion" and "refit on newer data" in newer["reason"]


def test_data_identity_is_the_events_used() -> None:
    trained_on: dict[str, Any] = {"window": {"first": "2010-12-01 08:26:00+00:00", "last": FULL_LAST},
                                  "rows": 1000, "fit": "all kept events"}  # fmt: skip
    whole = shipping.data_identity("fp", IngestConfig(), trained_on)
    cut_cfg = IngestConfig(until=datetime(2011, 6, 1, tzinfo=UTC))
    cut = shipping.data_identity("fp", cut_cfg, {**trained_on, "window": {**trained_on["window"], "last": CUT_LAST}})
    assert whole["data_fingerprint"] == cut["data_fingerprint"] == "fp"  # the same files ...
    assert cut["data_until"] == "2011-06-01T00:00:00+00:00" and whole["data_until"] == "None"
    assert cut["training_window_last"] == CUT_LAST and whole["training_rows"] == "1000"
    assert whole["data_identity"] != cut["data_identity"]  # ... are other data
    config = {"x": 1}
    assert shipping.run_key(whole, config) != shipping.run_key(cut, config)
    assert shipping.run_key(whole, config) == shipping.run_key(dict(whole), config)


# ----------------------------------------------------------------------------------------------------------
# The recipe, the metric, what the metrics measured


def test_recipe_leaves_machine_settings_out() -> None:
    base = ModelsConfig()
    machine = ModelsConfig.model_validate({
        "two_tower": {"accelerator": "cpu", "devices": 1, "strategy": "ddp_spawn", "num_nodes": 2,
                      "precision": "32-true", "num_workers": 2, "artifact_dir": "/tmp/tt", "progress_bar": True},
        "als": {"use_gpu": False, "training_loss": False},
        "bpr": {"num_threads": 4, "use_gpu": True},
        "ease": {"blas_threads": 1, "max_memory_gb": 2.0, "max_items": 10},
    })  # fmt: skip
    for name in ("two_tower", "als", "bpr", "ease"):
        assert shipping.recipe(name, machine) == shipping.recipe(name, base), name
    # a hyperparameter is the recipe
    wider = ModelsConfig.model_validate({"two_tower": {"embedding_dim": 32}, "als": {"factors": 16}})
    assert shipping.recipe("two_tower", wider)[0] != shipping.recipe("two_tower", base)[0]
    assert shipping.recipe("als", wider)[0] != shipping.recipe("als", base)[0]
    # a champion's recipe re-fits with this run's machine settings, also from a recipe recorded with its own
    recorded = json.dumps(base.two_tower.model_dump(mode="json") | {"accelerator": "gpu", "embedding_dim": 32})
    refit = shipping.recipe_config("two_tower", recorded, machine)
    assert refit.two_tower.accelerator == "cpu" and refit.two_tower.embedding_dim == 32


def test_a_champion_recorded_with_machine_settings_keeps_its_recipe(store: Store) -> None:
    """A version registered while the recipe still hashed machine settings: its re-run on newer data must stay
    "the same recipe" (else every later run is judged as another recipe and can never replace it)."""
    models = ModelsConfig()
    old_json = json.dumps(models.bpr.model_dump(mode="json"), sort_keys=True)  # use_gpu, num_threads included
    old = store.candidate("k1", last=CUT_LAST, recipe="old-hash-with-machine-settings")
    store.register(Candidate(**{**old.__dict__, "recipe_config": old_json}))
    new_hash, new_json = shipping.recipe("bpr", models)
    assert new_hash != "old-hash-with-machine-settings" and "use_gpu" not in new_json
    newer = store.candidate("k2", recipe=new_hash)
    decision = store.register(Candidate(**{**newer.__dict__, "recipe_config": new_json}))
    assert decision["alias"] == "champion" and decision["champion_basis"] == "same recipe", decision
    # a hyperparameter that differs is another recipe
    wider = ModelsConfig.model_validate({"bpr": {"factors": 8}})
    tags = {"model": "bpr", "recipe": "x", "recipe_config": old_json}
    assert registry.same_recipe("bpr", *shipping.recipe("bpr", models), tags)
    assert not registry.same_recipe("bpr", *shipping.recipe("bpr", wider), tags)
    assert not registry.same_recipe("als", *shipping.recipe("als", models), tags)


def test_registry_metric_is_gone() -> None:
    with pytest.raises(ConfigError, match=r"registry\.metric was removed: the champion decision uses eval\.primary"):
        load_config(str(REPO / "configs/retail.yaml"), ["registry.metric=ndcg_at_10"])


def test_version_says_what_its_metrics_measured_and_what_it_was_trained_on(store: Store) -> None:
    trained_on: dict[str, Any] = {"window": {"first": "2010-12-01 08:26:00+00:00", "last": FULL_LAST},
                                  "rows": 1000, "fit": "all kept events"}  # fmt: skip
    split_info = {"method": "temporal", "val_cutoff": "2011-08-18T00:00:00+00:00",
                  "cutoff": "2011-09-28T00:00:00+00:00", "rows_fit": 700, "rows_val": 150,
                  "rows_test": 150}  # fmt: skip
    tags = {**shipping.data_identity("fp", IngestConfig(), trained_on),
            **shipping.evaluation_windows(split_info, trained_on["window"])}  # fmt: skip
    assert tags["test_window"] == f"[2011-09-28T00:00:00+00:00, {FULL_LAST}] (150 rows)"
    assert tags["fit_window"] == "[2010-12-01 08:26:00+00:00, 2011-08-18T00:00:00+00:00) (700 rows)"
    decision = store.register(store.candidate("k1", extra=tags))
    mv = store.client.get_model_version("tiny", decision["version"])
    measured, trained = mv.tags["metrics_measured"], mv.tags["trained_on"]
    assert measured.startswith("metrics: evaluation fit on the fit window [2010-12-01")
    assert f"scored on the test window [2011-09-28T00:00:00+00:00, {FULL_LAST}]" in measured
    assert trained == f"trained on: all kept events 2010-12-01 08:26:00+00:00 .. {FULL_LAST}, 1000 rows"
    assert measured in mv.description and trained in mv.description
    logged = store.client.get_logged_model(decision["model_uri"].removeprefix("models:/"))
    assert logged.tags["metrics_measured"] == measured and logged.tags["trained_on"] == trained
