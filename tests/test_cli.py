"""The command line's conventions (issue 22): ``--version``, ``-q``/``-v`` after the command too, a bad ``--set``
refused before any server starts (backtest like run), and one answer for an unknown user, locally and from the
registry. What reaches the terminal: warnings by default, INFO with ``-v``, per-task and per-iteration lines only
with ``-vv``."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed import progress
from recsys_embed.cli import _setup_logging, build_parser, main
from tests.conftest import REPO

RETAIL_CFG = REPO / "configs" / "retail.yaml"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``_setup_logging`` changes process-wide state: put the root logger and bars back afterwards. Prefect's task
    logger at INFO, as the CLI sets it (PREFECT_LOGGING_LEVEL; conftest sets WARNING for the test session)."""
    root, tasks = logging.getLogger(), logging.getLogger("prefect.task_runs")
    handlers, level, task_level = list(root.handlers), root.level, tasks.level
    tasks.setLevel(logging.INFO)
    yield None
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)
    tasks.setLevel(task_level)
    logging.captureWarnings(False)
    progress.set_enabled(None)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"recsys-embed {version('recsys-embed')}"


@pytest.mark.parametrize("command", [["run"], ["backtest", "--holdout-days", "30"], ["ingest"], ["ui"]])
def test_quiet_and_verbose_after_the_command(command: list[str]) -> None:
    """Regression (issue 22): `recsys-embed run -q` was refused; only `recsys-embed -q run` worked."""
    parse = build_parser().parse_args
    for flags, quiet, verbose in ((["-q"], True, 0), (["-v"], False, 1), (["-vv"], False, 2), ([], False, 0)):
        before, after = parse([*flags, *command]), parse([*command, *flags])
        assert (before.quiet, before.verbose) == (after.quiet, after.verbose) == (quiet, verbose)
    assert parse(["--mlflow-config", "a.yml", *command]).mlflow_config == "a.yml"
    assert parse([*command, "--mlflow-config", "b.yml"]).mlflow_config == "b.yml"
    assert parse(command).mlflow_config == "mlflow.yml"  # the command's parser does not reset the default
    with pytest.raises(SystemExit):
        main(["-v", *command, "-q"])  # exclusive, wherever they are given


def test_every_option_and_command_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert parser.description and not parser.description.startswith("``")  # for users, not the module's docstring
    for name, cmd in sub.choices.items():
        assert cmd.description and "\n" not in cmd.description.strip(), name  # one description line
        if name == "bench":
            continue  # its options belong to the benchmark work
        bare = [a.option_strings or a.dest for a in cmd._actions if not a.help]
        assert not bare, (name, bare)


@pytest.mark.parametrize(
    ("flags", "shown"),
    [(["-q"], []), ([], []), (["-v"], ["flow step"]), (["-vv"], ["flow step", "task done", "loss 0.1", "detail"])],
)
def test_what_reaches_the_terminal(
    flags: list[str], shown: list[str], restore_logging: None, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Per-task (Prefect's `Finished in state Completed()`) and per-iteration (implicit's `loss`) lines are DEBUG
    detail: shown with -vv only; -v shows the steps; the default and -q show warnings only."""
    import recsys_embed.models.mf  # noqa: F401  (implicit's INFO lines are re-logged at DEBUG from here on)

    # outside a flow run, the API handlers an earlier test's Prefect harness put on named loggers ("prefect",
    # "recsys_embed" as an extra logger) refuse records: this test is about our terminal, so every named logger hands
    # its records to the root handlers only, as in a fresh CLI process
    for obj in list(logging.root.manager.loggerDict.values()):
        if isinstance(obj, logging.Logger) and (obj.handlers or not obj.propagate):
            monkeypatch.setattr(obj, "handlers", [])
            monkeypatch.setattr(obj, "propagate", True)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # and root holds only the CLI's own handler

    _setup_logging(build_parser().parse_args(["ui", *flags]))
    capsys.readouterr()
    logging.getLogger("recsys_embed.pipeline").info("flow step")
    logging.getLogger("prefect.task_runs").info("task done")
    logging.getLogger("implicit").info("loss 0.1")
    logging.getLogger("recsys_embed.models").debug("detail")
    logging.getLogger("recsys_embed.data").warning("a warning")
    err = capsys.readouterr().err
    for text in ("flow step", "task done", "loss 0.1", "detail"):
        assert (text in err) == (text in shown), (flags, text, err)
    assert "a warning" in err
    assert err.count("loss 0.1") <= 1  # once, re-logged at DEBUG, never twice


def _env(tmp_path: Path) -> dict[str, str]:
    from tests.prefect_server import prefect_env

    return {**prefect_env(tmp_path / "home"), "PYTHONPATH": str(REPO)}  # no PREFECT_API_URL, no user profile


@pytest.mark.parametrize("command", [["backtest", "--holdout-days", "30"], ["run"]])
def test_bad_set_is_refused_before_any_server(command: list[str], tmp_path: Path) -> None:
    """Regression (issue 22): `backtest --set nope=1` started a Prefect server and printed a 30-line traceback after
    16 s; `run` refused the same mistake in 0.37 s. Both must refuse in one line, well under 2 s, without importing
    Prefect (so without starting its server)."""
    code = ("import sys\nfrom recsys_embed.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'prefect' not in sys.modules, 'prefect was imported'\nsys.exit(rc)")  # fmt: skip
    args = [*command, "--config", str(RETAIL_CFG), "--set", "nope=1"]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(tmp_path),
                         cwd=tmp_path, timeout=60)  # fmt: skip
    wall = time.perf_counter() - t0
    print(f"{command[0]} --set nope=1: exit {out.returncode} in {wall:.2f} s")
    assert out.returncode == 2 and wall < 2.0, (out.stderr, wall)
    assert out.stderr.strip().splitlines() == [
        f"error: invalid config '{RETAIL_CFG}': nope: Extra inputs are not permitted"
    ]


# ------------------------------------------------------------------------------------------------------------
# One answer for a user: from the latest run's table and from the registered model


N_USERS, N_ITEMS = 30, 20


@pytest.fixture
def latest_run_and_champion(tmp_path: Path, mlflow_yml: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A finished run (``latest.json`` -> ``summary.json`` -> a committed top-k table) and the registered model
    built from the same embeddings, standing in for ``registry.load_recommender``; returns the CLI's shared args."""
    from recsys_embed.config import ExportConfig
    from recsys_embed.serving import registry
    from recsys_embed.serving.export import export_topk
    from recsys_embed.serving.registry import ServedInputs, write_served_bundle
    from recsys_embed.serving.served_model import ServedRecommender
    from recsys_embed.types import Embeddings, IdMap

    rng = np.random.default_rng(0)
    emb = Embeddings(
        user_vectors=rng.standard_normal((N_USERS, 4), dtype=np.float32),
        item_vectors=rng.standard_normal((N_ITEMS, 4), dtype=np.float32),
        users=IdMap(pl.Series("id", np.arange(100, 100 + N_USERS, dtype=np.int64))),
        items=IdMap(pl.Series("id", [f"sku{i}" for i in range(N_ITEMS)])),
        model="als",
    )
    seen = sp.random(N_USERS, N_ITEMS, density=0.2, format="csr", random_state=1, dtype=np.float32)
    seen.data[:] = 1.0
    run_dir = tmp_path / "out" / "retail" / "runs" / "r1"
    res = export_topk(emb, seen, ExportConfig(k=5), run_dir / "exports" / "als", "r1")
    manifest = {"run_dir": str(run_dir), "best_model": "als", "exports": {"als": {"topk": str(res.path)}}}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(manifest))
    (tmp_path / "out" / "retail" / "latest.json").write_text(json.dumps({"run_dir": str(run_dir)}))

    served = ServedRecommender().load(write_served_bundle(tmp_path / "bundle", ServedInputs(emb, seen),
                                                          ExportConfig(k=5), 5))  # fmt: skip

    class Loaded:  # what mlflow.pyfunc.load_model returns, as far as the CLI looks
        def predict(self, frame: object, params: dict[str, int]) -> object:
            return served.predict(None, frame, params)

        def unwrap_python_model(self) -> ServedRecommender:
            return served

    monkeypatch.setattr(registry, "load_recommender", lambda *a, **k: Loaded())
    return ["--mlflow-config", str(mlflow_yml), "recommend", "--config", str(RETAIL_CFG), "--set",
            f"output_root={tmp_path / 'out'}", "-k", "5"]  # fmt: skip


def _ask(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("user", ["999", "not-a-number", " 9 "])
def test_unknown_user_gets_the_same_answer_locally_and_from_the_registry(
    user: str, latest_run_and_champion: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression (issue 22): an unknown user exited 2 locally but got the popularity fallback from the registry.
    Both now exit 2 with the same one-line message (a mistyped ID is far likelier than a new user at a prompt;
    the served model still answers a program with the popularity fallback, and the message says so)."""
    local = _ask([*latest_run_and_champion, "--user", user], capsys)
    remote = _ask([*latest_run_and_champion, "--user", user, "--from-registry"], capsys)
    assert local[0] == remote[0] == 2 and local[1] == remote[1] == ""
    assert local[2] == remote[2] and local[2].count("\n") == 1, (local, remote)
    assert f"user {user!r} is unknown to the model" in local[2] and "popularity" in local[2]


def test_known_user_gets_the_same_items_locally_and_from_the_registry(
    latest_run_and_champion: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rc_local, local, _ = _ask([*latest_run_and_champion, "--user", "107"], capsys)
    rc_remote, remote, _ = _ask([*latest_run_and_champion, "--user", "107", "--from-registry"], capsys)
    assert rc_local == rc_remote == 0

    def items(text: str) -> list[str]:
        return [line.split()[1] for line in text.splitlines()[1:] if line.strip()[:1].isdigit()]

    assert items(local) == items(remote) and len(items(local)) == 5, (local, remote)
