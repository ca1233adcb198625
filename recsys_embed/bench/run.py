"""Run named benchmark suites and print one table (the CLI's ``bench`` command)."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from recsys_embed.bench.harness import BenchResult, format_table, machine, write_json

log = logging.getLogger(__name__)

SUITES = {
    "ingest": "recsys_embed.bench.ingest_suite",
    "als": "recsys_embed.bench.als_suite",
    "topk": "recsys_embed.bench.topk_suite",
    "lightning": "recsys_embed.bench.lightning_suite",
    "ann": "recsys_embed.bench.ann_suite",
    "e2e": "recsys_embed.bench.e2e_suite",
    "gpu": "recsys_embed.bench.gpu_suite",
}


def main(suites: list[str], size: str, repeats: int, json_path: str | None) -> int:
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {sorted(SUITES)}")
    results: list[BenchResult] = []
    for name in suites:
        module = importlib.import_module(SUITES[name])
        log.info("bench: running suite %s at %s x%d", name, size, repeats)
        suite_results = module.run(size=size, repeats=repeats)
        results.extend(suite_results)
        print(format_table(suite_results), flush=True)
    print(f"\n{_machine_line(machine())}")
    print(format_table(results))
    if json_path:
        print(f"results written to {write_json(results, json_path)}")
    return 0


def _machine_line(m: dict[str, Any]) -> str:
    return f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python {m['python']}"


def scaling_main(sizes: list[str], json_path: str | None) -> int:
    """``recsys-embed bench scaling --sizes tiny,1m``: per size, each stage's time and peak memory (fresh process)."""
    from recsys_embed.bench.scaling import format_scaling
    from recsys_embed.bench.scaling import run as run_scaling
    from recsys_embed.io import write_json_atomic

    result = run_scaling(sizes)
    m = machine()
    print(_machine_line(m))
    print(format_scaling(result))
    if json_path:
        print(f"results written to {write_json_atomic({'machine': m, **result}, json_path)}")
    return 0
