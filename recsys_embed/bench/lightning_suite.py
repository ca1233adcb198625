"""Lightning overhead: two-tower training throughput through ``Trainer.fit`` against a hand-written PyTorch loop.

- Candidate ("lightning"): ``Trainer(max_steps=steps, accelerator="auto", precision as the pipeline resolves
  it, gradient clipping as configured, no validation, no logger, no checkpointing, no progress bar).fit(module,
  datamodule)``. The training loop is timed by a callback from the epoch's start (before the first batch is
  fetched) to the end of training; the whole ``fit`` call (Trainer setup and teardown too) is an extra row.
- Baseline ("pytorch"): the minimal loop over the same ``TwoTowerDataModule`` loader and the same
  ``TwoTowerModule``: ``module.loss(batch)`` (the exact computation of ``training_step`` without Lightning's
  logging), ``backward``, ``clip_grad_norm_``, AdamW ``step`` and the per-step LR schedule
  (``make_optimizer``, as ``configure_optimizers``), under ``torch.autocast`` when the precision is mixed.
  Timed from the loader's first batch to the last step (and, as an extra, from the optimizer's creation).

Both sides start from a freshly built module under the same seed, so they do identical arithmetic; they run
alternately ``repeats`` times, with ``models.two_tower.torch_threads`` torch threads as the pipeline trains.
Throughput = ``steps * batch_size / seconds`` (samples/s, higher is better).

Load: each row is measured once on the box as it is and once beside two spinning ``while True: pass``
processes (``busy_loops``, started and stopped by the suite), with the 1-minute load average before and after.
Extras give the plain loop at torch's default thread count (one per core) under the same load, the throughput
per process CPU-second (what a free core would give), and the Lightning/plain ratio.

Data: ``size="retail"`` is the shipped retail log (``configs/retail.yaml``'s ingest and split: 3,741 users x
3,526 items, ~198k train pairs), read from the repository root. Other sizes are synthetic and seeded: a
MovieLens-shaped power-law matrix (``bench.matrices``), a random first time for every pair over 90 days, and a
5-word random text per item, so that the item tower runs its text ``EmbeddingBag`` as it does on the retail log.
Model and batch are ``TwoTowerConfig()``'s defaults.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytorch_lightning as pl_
import scipy.sparse as sp
import torch

from recsys_embed.bench.harness import BenchResult, Measurement
from recsys_embed.bench.matrices import SHAPES, power_law_matrix
from recsys_embed.config import TwoTowerConfig
from recsys_embed.models.two_tower.data import HistoryConfig, Sequences, TwoTowerDataModule, build_sequences
from recsys_embed.models.two_tower.module import TwoTowerModule, make_optimizer
from recsys_embed.models.two_tower.train import item_tables, resolve_hardware, torch_threads, user_tables
from recsys_embed.types import IdMap, Interactions, RowReport

log = logging.getLogger(__name__)

TARGET = ">= 0.9x"
BUSY_TARGET = 20_000  # samples/s under two busy-loop processes with the default threads (issue 21)
_DAY_US = 86_400_000_000
_T0_US = 1_700_000_000_000_000


def synthetic(size: str, seed: int = 0) -> tuple[Interactions, pl.DataFrame]:
    """(train ``Interactions`` with timed events, item text) of MovieLens shape ``size`` (``bench.matrices``)."""
    m = power_law_matrix(size, seed)
    n_users, n_items = m.shape
    rng = np.random.default_rng(seed + 1)
    coo = sp.coo_matrix(m)
    ts = _T0_US + rng.integers(0, 90 * _DAY_US, coo.nnz)
    events = pl.DataFrame(
        {
            "user_idx": coo.row.astype(np.int64),
            "item_idx": coo.col.astype(np.int64),
            "ts": pl.Series(ts).cast(pl.Datetime("us", "UTC")),
            "weight": np.ones(coo.nnz),
        }
    )
    words = pl.DataFrame({f"w{j}": rng.integers(0, 3000, n_items) for j in range(5)})
    text = words.select(pl.concat_str([pl.lit("w") + pl.col(c).cast(pl.Utf8) for c in words.columns], separator=" "))
    item_ids = pl.Series("id", np.arange(n_items, dtype=np.int64))
    train = Interactions(
        matrix=m,
        users=IdMap(pl.Series("id", np.arange(n_users, dtype=np.int64))),
        items=IdMap(item_ids),
        report=RowReport(rows_read=m.nnz, kept=m.nnz),
        events=events,
    )
    return train, pl.DataFrame({"item_id": item_ids, "text": text.to_series()})


class _Setup:
    """Everything both sides share: prepared sequences and feature tables; builds fresh seeded modules."""

    def __init__(self, train: Interactions, text: pl.DataFrame, cfg: TwoTowerConfig) -> None:
        self.cfg = cfg
        self.n_users, self.n_items = train.shape
        self.seq: Sequences = build_sequences(train, cfg.history_confidence, cfg.seed)
        self.items, self.content, _ = item_tables(train, cfg, text, None)
        self.users, self.user_spec = user_tables(train, cfg, None)
        self.history = HistoryConfig(cfg.history_length, cfg.history_half_life_days, cfg.history_confidence)

    def module(self) -> TwoTowerModule:
        pl_.seed_everything(self.cfg.seed, verbose=False)
        # the feature tables are read-only buffers: sharing them between modules is safe
        return TwoTowerModule(
            self.cfg, self.n_users, self.n_items, self.seq.item_count, self.items, self.users,
            self.content.item_spec.cardinalities, self.user_spec.cardinalities,
        )  # fmt: skip

    def datamodule(self) -> TwoTowerDataModule:
        dm = TwoTowerDataModule(self.seq, self.n_items, self.history, self.cfg.batch_size, None, self.cfg.seed)
        dm.setup("fit")
        return dm


class _LoopTimer(pl_.Callback):
    """Wall time of Lightning's training loop: from the epoch's start (before the first batch is fetched) to
    the end of training (after the last optimizer step)."""

    def on_train_epoch_start(self, trainer: pl_.Trainer, pl_module: pl_.LightningModule) -> None:
        if not hasattr(self, "t0"):
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer: pl_.Trainer, pl_module: pl_.LightningModule) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()


def _lightning(s: _Setup, steps: int, accelerator: str, precision: str) -> tuple[float, float]:
    """(training-loop seconds, whole ``fit`` seconds)."""
    module, dm = s.module(), s.datamodule()
    timer = _LoopTimer()
    trainer = pl_.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_steps=steps,
        gradient_clip_val=s.cfg.gradient_clip_val,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=max(1, steps),
    )
    gc.collect()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return timer.t1 - timer.t0, time.perf_counter() - t0


def _plain(s: _Setup, steps: int, on_gpu: bool, precision: str) -> tuple[float, float]:
    """(training-loop seconds, seconds including the module's device move and the optimizer's creation)."""
    module, dm = s.module(), s.datamodule()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    mixed = on_gpu and precision.endswith("-mixed")
    gc.collect()
    t_setup = time.perf_counter()
    module.to(device).train()
    opt, sched = make_optimizer(module, steps)
    params = [p for p in module.parameters() if p.requires_grad]
    clip = s.cfg.gradient_clip_val
    t0 = time.perf_counter()
    for batch in islice(dm.train_dataloader(), steps):
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=mixed):
            out = module.loss(b)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
    if on_gpu:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    return t1 - t0, t1 - t_setup


def retail(config: str | Path = "configs/retail.yaml") -> tuple[Interactions, pl.DataFrame]:
    """(train ``Interactions`` with events, item text) of the shipped retail log: its config's ingest and split,
    computed into a temporary folder (a few seconds)."""
    from recsys_embed.config import load_config
    from recsys_embed.pipeline import stages

    if not Path(config).exists():
        raise FileNotFoundError(f"size 'retail' reads '{config}' (run the bench from the repository root)")
    cfg = load_config(config)
    with tempfile.TemporaryDirectory(prefix="recsys-bench-retail-") as tmp:
        ingest = stages.run_ingest(cfg.ingest, Path(tmp) / "cache")
        split = stages.run_split(ingest, cfg.ingest, cfg.split, Path(tmp) / "split")
        train = stages.load_train(split, with_events=True)
        text = pl.read_parquet(t) if (t := split.get("item_text")) else pl.DataFrame({"item_id": [], "text": []})
    return train, text


@contextmanager
def busy_loops(n: int) -> Iterator[list[int]]:
    """``n`` processes spinning ``while True: pass`` (a CPU hog each) for the block; stopped by their pid after."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0.0)  # let the scheduler see them
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _measure(
    setup: _Setup, steps: int, repeats: int, accelerator: str, precision: str, on_gpu: bool
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(lightning loop, pytorch loop, whole fit, pytorch incl. setup) samples/s, alternating ``repeats`` times."""
    samples = steps * setup.cfg.batch_size
    light: list[float] = []
    plain: list[float] = []
    light_fit: list[float] = []
    plain_all: list[float] = []
    for i in range(repeats):
        for side in (0, 1) if i % 2 == 0 else (1, 0):  # alternate so warm caches favour neither side
            if side == 0:
                loop, whole = _lightning(setup, steps, accelerator, precision)
                light.append(samples / loop)
                light_fit.append(samples / whole)
            else:
                loop, whole = _plain(setup, steps, on_gpu, precision)
                plain.append(samples / loop)
                plain_all.append(samples / whole)
    return light, plain, light_fit, plain_all


def run(
    size: str = "1m",
    repeats: int = 3,
    steps: int = 150,
    cfg: TwoTowerConfig | None = None,
    loads: Sequence[int] = (0, 2),
    default_threads_steps: int = 10,
) -> list[BenchResult]:
    """Training throughput through Lightning against the hand-written loop, alternating, ``repeats`` times, once
    per background load.

    Args:
        size: "retail" (the shipped retail log, ``configs/retail.yaml``'s ingest and split) or a matrix preset of
            ``bench.matrices`` (tiny, 1m, 20m, 100m); only ``steps`` batches are trained.
        steps: optimizer steps per measurement (150 x 1024 samples: several seconds on 2 CPU cores).
        cfg: model and batch (default ``TwoTowerConfig()``); both sides run with ``cfg.torch_threads`` threads.
        loads: background CPU hogs (``busy_loops``) per row: 0 = the box as it is, 2 = two spinning processes.
        default_threads_steps: also time this many plain-loop steps at torch's default thread count (one per
            core) under each load, beside the configured count (0: skip).
    """
    if size != "retail" and size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose retail or one of {sorted(SHAPES)}")
    cfg = cfg or TwoTowerConfig()
    accelerator, precision, on_gpu = resolve_hardware(cfg)
    train, text = retail() if size == "retail" else synthetic(size)
    setup = _Setup(train, text, cfg)
    steps = min(steps, max(1, setup.seq.n_examples // cfg.batch_size))
    log.info("lightning bench: %s, %d examples, %d steps of %d, precision %s", size, setup.seq.n_examples, steps,
             cfg.batch_size, precision)  # fmt: skip
    shape: tuple[Any, ...] = (*train.shape, train.matrix.nnz)
    cores = torch.get_num_threads() if cfg.torch_threads <= 0 else None
    results: list[BenchResult] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec).*")
        for n_busy in loads:
            with busy_loops(n_busy), torch_threads(cfg.torch_threads) as threads:
                load_before = os.getloadavg()[0]
                _plain(setup, min(steps, 5), on_gpu, precision)  # warm-up: first-call allocations, lazy imports
                _lightning(setup, min(steps, 5), accelerator, precision)
                cpu0 = time.process_time()
                light, plain, light_fit, plain_all = _measure(setup, steps, repeats, accelerator, precision, on_gpu)
                cpu_seconds = time.process_time() - cpu0
                load_after = os.getloadavg()[0]
            extra: dict[str, Any] = {
                "data": f"{shape[0]:,} users x {shape[1]:,} items, {shape[2]:,} pairs; "
                f"{steps} steps x {cfg.batch_size}",
                "device": f"{'cuda' if on_gpu else 'cpu'} ({threads} torch threads), precision {precision}",
                "load": f"{n_busy} busy-loop processes; 1-min load average {load_before:.1f} -> {load_after:.1f}",
                # what one free core would give: the work done, whatever other processes took of the cores
                "samples per process CPU-second (both sides, Trainer setup included)": round(
                    2 * repeats * steps * cfg.batch_size / cpu_seconds
                ),
                "model": f"d={cfg.embedding_dim} hidden={cfg.hidden_dim} history={cfg.history_length} "
                f"negatives={cfg.num_negatives} text_buckets={cfg.text_buckets} user_encoder={cfg.user_encoder}",
                "lightning / pytorch (median of per-repeat ratios)": round(
                    statistics.median(a / b for a, b in zip(light, plain, strict=True)), 3
                ),
                "whole fit() incl. Trainer setup/teardown, samples/s (median): lightning / pytorch": (
                    f"{statistics.median(light_fit):.4g} / {statistics.median(plain_all):.4g} = "
                    f"{statistics.median(light_fit) / statistics.median(plain_all):.3f}x"
                ),
            }
            if default_threads_steps and not on_gpu:
                with busy_loops(n_busy), torch_threads(cores or _cores()) as n_default:
                    loop, _ = _plain(setup, min(steps, default_threads_steps), on_gpu, precision)
                extra[f"pytorch loop at torch's default {n_default} threads, samples/s"] = round(
                    min(steps, default_threads_steps) * cfg.batch_size / loop
                )
            results.append(
                BenchResult(
                    suite="lightning" if not n_busy else f"lightning+busy{n_busy}",
                    size=size,
                    candidate=Measurement("lightning", light, unit="samples/s"),
                    baseline=Measurement("pytorch", plain, unit="samples/s"),
                    better="higher",
                    target=TARGET if not n_busy else f"{TARGET}; >= {BUSY_TARGET:,} samples/s",
                    extra=extra,
                )
            )
    return results


def _cores() -> int:
    """Torch's default intra-op thread count: the usable cores."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
