"""Peak resident memory of one stage, measured in a fresh process so nothing else inflates the figure.

The stage runs in a ``spawn``-ed child (a clean interpreter, not a fork of this one); the child reports the
high-water mark of its own RSS, which includes the interpreter and the imports the stage needs. On Linux that is
``VmHWM`` from ``/proc/self/status``, not ``getrusage().ru_maxrss``: the latter survives ``execve`` and so starts
at the parent's RSS at fork time, which would bill the parent's memory to the child.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass
class PeakMemory:
    """What one isolated run of a stage cost.

    Attributes:
        peak_bytes: the child's peak RSS over its whole life (interpreter + imports + stage).
        start_bytes: the child's RSS just before the stage was called (interpreter + imports).
        seconds: wall time of the stage call alone.
        value: what the stage returned (keep it small: it is pickled back).
    """

    peak_bytes: int
    start_bytes: int
    seconds: float
    value: Any

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def stage_bytes(self) -> int:
        """Peak growth attributable to the stage (peak minus the RSS before it ran)."""
        return max(self.peak_bytes - self.start_bytes, 0)


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def _run_measured(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> PeakMemory:
    start = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    return PeakMemory(peak_bytes=max(peak, start), start_bytes=start, seconds=seconds, value=value)


def peak_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> PeakMemory:
    """Call ``fn(*args, **kwargs)`` in a fresh spawned process and return its peak RSS.

    ``fn`` must be a module-level (picklable) function; its arguments and result are pickled across.
    Exceptions raised by ``fn`` propagate here.
    """
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run_measured, fn, args, kwargs).result()
