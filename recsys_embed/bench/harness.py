"""Timing harness shared by every benchmark suite.

A suite measures its candidate and its baseline in the same process, alternating, ``repeats`` times,
and reports median, min and max for both, plus the ratio of medians (candidate / baseline; lower is
better for times, higher for throughputs). Nothing here asserts: a benchmark prints measured numbers.
"""

from __future__ import annotations

import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass
class Measurement:
    name: str
    values: list[float]
    unit: str = "s"

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)


@dataclass
class BenchResult:
    """One line of the results table: a candidate against its baseline."""

    suite: str
    size: str
    candidate: Measurement
    baseline: Measurement
    # "lower" for times, "higher" for throughputs; decides how the ratio reads.
    better: str = "lower"
    target: str = ""  # the acceptance bound, e.g. "<= 0.8x"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.candidate.median / self.baseline.median if self.baseline.median else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["candidate"]["median"] = self.candidate.median
        d["baseline"]["median"] = self.baseline.median
        return d


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call (after a GC, so one run's garbage doesn't bill the next)."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def alternate(
    candidate: Callable[[], Any], baseline: Callable[[], Any], repeats: int
) -> tuple[list[float], list[float]]:
    """Run candidate and baseline alternately ``repeats`` times each; return both lists of seconds."""
    c: list[float] = []
    b: list[float] = []
    for i in range(repeats):
        # alternate the order so that warm caches favour neither side
        if i % 2 == 0:
            c.append(time_call(candidate)[0])
            b.append(time_call(baseline)[0])
        else:
            b.append(time_call(baseline)[0])
            c.append(time_call(candidate)[0])
    return c, b


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def format_table(results: list[BenchResult]) -> str:
    head = (
        f"{'suite':<16}{'size':<10}{'candidate (median, min-max)':<34}"
        f"{'baseline (median, min-max)':<34}{'ratio':>8}  target"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        def cell(m: Measurement) -> str:
            return f"{m.name}: {m.median:.3g} ({m.lo:.3g}-{m.hi:.3g}) {m.unit}"

        lines.append(
            f"{r.suite:<16}{r.size:<10}{cell(r.candidate):<33} {cell(r.baseline):<33} {r.ratio:>7.2f}x  {r.target}"
        )
        for k, v in r.extra.items():
            lines.append(f"{'':<26}{k}: {v}")
    return "\n".join(lines)


def write_json(results: list[BenchResult], path: str | Path) -> Path:
    from recsys_embed.io import write_json_atomic

    return write_json_atomic({"machine": machine(), "results": [r.to_dict() for r in results]}, path)
