"""Progress bars for long steps, in one place: a rich bar on an interactive terminal, silent everywhere else.

A bar is drawn only when all of these hold:

- stderr is a terminal (CI logs, pipes, pytest's captured output and Prefect workers writing to files get none);
- the ``recsys_embed`` logger is enabled for INFO (the CLI's ``--quiet`` raises it to WARNING);
- no other bar is live (rich draws one live display at a time, so a nested long step stays silent).

``set_enabled(True/False)`` overrides the automatic choice for the whole process (``None`` restores it). Every
long step logs its start and end anyway; the bar only adds the in-between.

Bars own the terminal line: every bar draws on one rich console (``console()``, on stderr), and ``LogHandler`` (the
CLI's log handler) prints a record through that console while a bar is live, so the line lands above the bar and
the bar is redrawn below it, never "eta 0:00:0102:20:41 INFO ..." on one line.

Usage::

    with progress.bar("export topk (als)", total=n_users, unit="users") as b:
        for chunk in chunks:
            ...
            b.advance(len(chunk))

    for f in progress.track(files, "ingest: reading files"):
        ...
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

_override: bool | None = None
_lock = threading.Lock()
_live = False  # a bar is being drawn (rich allows one live display per console)
_console: Any = None  # the rich Console every bar draws on, made on first use


def set_enabled(on: bool | None) -> None:
    """Force bars on (True) or off (False) for this process; None returns to the automatic choice."""
    global _override
    _override = on


def enabled() -> bool:
    """Whether a new bar would be drawn (ignoring a bar that is already live)."""
    if _override is not None:
        return _override
    interactive = sys.stderr is not None and sys.stderr.isatty()
    return interactive and logging.getLogger("recsys_embed").isEnabledFor(logging.INFO)


def console() -> Any:
    """The rich ``Console`` (stderr, like the logs; stdout stays for results) that every bar draws on."""
    global _console
    with _lock:
        if _console is None:
            from rich.console import Console

            _console = Console(stderr=True)
        return _console


class LogHandler(logging.Handler):
    """Writes formatted records to stderr, or, while a bar is live, through the bars' console: the line then lands
    above the bar instead of running into it. Resolves ``sys.stderr`` at each record (pytest and redirections
    replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if _live and _console is not None:
                _console.out(msg, highlight=False)  # no markup, no wrapping: the text as formatted
                return
            stream = sys.stderr
            if stream is not None:
                stream.write(msg + "\n")
                stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class Bar:
    """A handle on one bar; every method is a no-op when the bar is not drawn (``live`` is False).

    Attributes:
        completed: units advanced so far (counted even when nothing is drawn).
    """

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress, self._task = progress, task
        self.completed = 0

    @property
    def live(self) -> bool:
        return self._progress is not None

    def advance(self, n: float = 1) -> None:
        self.completed += int(n)
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def set_total(self, total: float | None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=total)


@contextmanager
def bar(description: str, total: float | None = None, unit: str = "", show: bool = True) -> Iterator[Bar]:
    """A transient bar for one step (``total`` None: an indeterminate bar); yields a ``Bar``.

    ``show=False`` (a caller's own switch) never draws; otherwise ``enabled()`` decides.
    """
    global _live
    with _lock:
        draw = show and enabled() and not _live
        if draw:
            _live = True
    if not draw:
        yield Bar()
        return
    try:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        if unit:
            columns.append(TextColumn(unit))
        columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        # stderr, like the logs; stdout stays for results (the CLI prints tables there)
        with Progress(*columns, console=console(), transient=True, redirect_stdout=False,
                      redirect_stderr=False) as p:  # fmt: skip
            yield Bar(p, p.add_task(description, total=total))
    finally:
        with _lock:
            _live = False


def track(
    iterable: Iterable[T], description: str, total: int | None = None, unit: str = ""
) -> Generator[T, None, None]:
    """Yield from ``iterable`` while advancing a bar by one per item (``total`` defaults to ``len()``).

    A consumer that may stop early should ``close()`` the generator (``contextlib.closing``) to end the bar.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with bar(description, total, unit) as b:
        for item in iterable:
            yield item
            b.advance()
