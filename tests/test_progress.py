"""progress: bars are silent in tests and non-interactive logs, off under --quiet, one at a time, and a long step
(the top-k export) closes its bar when it ends."""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_embed import progress
from recsys_embed.config import ExportConfig
from recsys_embed.serving.export import export_similar_items, export_topk, read_export
from recsys_embed.types import Embeddings, IdMap


@pytest.fixture
def forced_on() -> Iterator[None]:
    progress.set_enabled(True)
    try:
        yield
    finally:
        progress.set_enabled(None)


def test_silent_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()  # pytest captures it, like a CI log or a file
    assert progress.enabled() is False
    with progress.bar("step", total=3, unit="rows") as b:
        b.advance(2)
    assert not b.live and b.completed == 2  # counted, not drawn
    assert list(progress.track(range(3), "items")) == [0, 1, 2]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_one_bar_at_a_time_and_show_false(forced_on: None) -> None:
    with progress.bar("outer", total=2) as outer:
        with progress.bar("inner", total=2) as inner:
            assert outer.live and not inner.live  # rich draws one live display: the nested step stays silent
        with progress.bar("asked off", total=1, show=False) as off:
            assert not off.live
    with progress.bar("next", total=1) as after:
        assert after.live  # the outer bar released the display


def test_cli_quiet_turns_bars_off_and_default_restores_auto() -> None:
    from recsys_embed.cli import _setup_logging, build_parser

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        progress.set_enabled(True)
        _setup_logging(build_parser().parse_args(["-q", "ui"]))
        assert progress.enabled() is False
        _setup_logging(build_parser().parse_args(["ui", "-q"]))  # after the command too
        assert progress.enabled() is False
        _setup_logging(build_parser().parse_args(["ui"]))
        assert progress.enabled() is False  # automatic again: stderr is not a terminal here
        assert sum(isinstance(h, progress.LogHandler) for h in root.handlers) == 1  # replaced, never stacked
    finally:
        progress.set_enabled(None)
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_land_above_a_live_bar(monkeypatch: pytest.MonkeyPatch, forced_on: None) -> None:
    """Regression (issue 22): implicit's lines ran into the bar on a terminal (``eta 0:00:0102:20:41 INFO implicit:
    loss``). A line logged through ``LogHandler`` while a bar is live is printed through the bar's console: on a
    line of its own, the bar redrawn below it."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(progress, "_console", None)  # a console on this terminal
    logger = logging.getLogger("tests.progress.bar")
    handler = progress.LogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with progress.bar("fit", total=3, unit="iterations") as b:
            assert b.live
            b.advance()
            logger.warning("loss 0.1234")
            b.advance(2)
        logger.warning("after the bar")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.getvalue())  # drop the cursor and colour codes
    lines = [seg for line in text.split("\n") for seg in line.split("\r")]
    assert "WARNING tests.progress.bar: loss 0.1234" in lines, lines  # its own line, nothing of the bar on it
    assert not [line for line in lines if "loss 0.1234" in line and "eta" in line]
    assert lines.count("WARNING tests.progress.bar: after the bar") == 1


def test_export_closes_its_bar_and_writes_the_same_table(forced_on: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = Embeddings(
        user_vectors=rng.standard_normal((50, 4), dtype=np.float32),
        item_vectors=rng.standard_normal((30, 4), dtype=np.float32),
        users=IdMap(pl.Series("id", np.arange(50, dtype=np.int64))),
        items=IdMap(pl.Series("id", np.arange(30, dtype=np.int64))),
        model="random",
    )
    cfg = ExportConfig(k=5, similar_k=3, chunk_users=16)  # 4 chunks of users, 2 of items
    res = export_topk(emb, None, cfg, tmp_path, "run")
    sim = export_similar_items(emb, cfg, tmp_path, "run")
    assert (res.rows, res.users, sim.rows) == (250, 50, 90)
    assert read_export(res.path)["user_id"].n_unique() == 50
    with progress.bar("after the export", total=1) as b:
        assert b.live  # neither export left its bar holding the display
