"""``python -m recsys_embed.pipeline.two_tower_launch``: the two-tower stage alone, for launchers that start one
process per device (``torchrun``, SLURM's ``srun``, any Lightning cluster environment), e.g. DDP across several nodes.

The Prefect flow is one process, so inside it only ``strategy: ddp_spawn`` (one node, several devices) works: a
launcher would start the whole flow once per device. This command trains the two-tower model on the split of an
existing run instead (``--run-dir outputs/<name>/runs/<run>``, e.g. one made with
``--set models.two_tower.enabled=false``). Every process trains its DDP share; the process of global rank 0
(``RANK`` from torchrun, ``SLURM_PROCID`` from srun) alone writes ``<run>/models/two_tower``, evaluates on the
test targets, exports ``<run>/exports/two_tower`` and writes ``<run>/two_tower_launch.json``; with
``--mlflow-run-id`` it also logs the training curves and test metrics to that run. Lightning reads the world
layout from the launcher's environment; ``models.two_tower.devices`` / ``num_nodes`` / ``strategy`` must match it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (0 when started without a launcher)."""
    for var in _RANK_VARIABLES:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def run(config: str | None, overrides: list[str], run_dir: Path, mlflow_config: str, mlflow_run_id: str | None,
        ) -> dict[str, Any] | None:  # fmt: skip
    """Train (every rank), then on rank 0 evaluate, export and record; returns rank 0's record, None elsewhere."""
    from recsys_embed.config import load_config, load_mlflow_settings
    from recsys_embed.io import write_json_atomic
    from recsys_embed.pipeline import shipping, stages
    from recsys_embed.pipeline.records import SplitRecord

    cfg = load_config(config, overrides)
    record_file = Path(run_dir) / "split" / "record.json"
    if not record_file.exists():
        raise FileNotFoundError(
            f"no split record at '{record_file}'; pass --run-dir outputs/<name>/runs/<run> of a finished run"
        )
    split: SplitRecord = json.loads(record_file.read_text(encoding="utf-8"))
    rank = launcher_rank()
    logger = None
    settings = load_mlflow_settings(mlflow_config) if mlflow_run_id else None
    if settings is not None and mlflow_run_id and rank == 0:
        from recsys_embed.tracking.tracker import lightning_logger

        logger = lightning_logger(settings, mlflow_run_id)
    if rank != 0:  # other ranks train into a scratch folder: their embeddings equal rank 0's and are thrown away
        with tempfile.TemporaryDirectory(prefix=f"two-tower-rank{rank}-") as scratch:
            stages.run_train("two_tower", split, cfg.models, cfg.eval, Path(scratch))
        return None
    models_dir = Path(run_dir) / "models"
    model = stages.run_train("two_tower", split, cfg.models, cfg.eval, models_dir, lightning_logger=logger)
    out: dict[str, Any] = {"model": model}
    if split.get("test_targets"):
        out["metrics"] = stages.run_evaluate(model, split, cfg.eval)
    out["export"] = shipping.run_export(model, split, cfg.export, Path(run_dir) / "exports", mlflow_run_id or "")
    if settings is not None and mlflow_run_id and "metrics" in out:
        from recsys_embed.tracking.tracker import Tracker

        Tracker(settings).log_metrics(mlflow_run_id, {f"test_{k}": v for k, v in out["metrics"].items()})
    write_json_atomic(out, Path(run_dir) / "two_tower_launch.json")
    log.info("two_tower launch: %s", Path(run_dir) / "two_tower_launch.json")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--config", default="configs/retail.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--run-dir", required=True, help="outputs/<name>/runs/<run> of a finished run (its split)")
    ap.add_argument("--mlflow-config", default="mlflow.yml")
    ap.add_argument("--mlflow-run-id", default=None, help="log training curves and test metrics to this run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{launcher_rank()} %(name)s: %(message)s")
    run(args.config, args.overrides, Path(args.run_dir), args.mlflow_config, args.mlflow_run_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
