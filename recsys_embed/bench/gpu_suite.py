"""GPU benchmark (``recsys-embed bench gpu``): what a CUDA card buys each GPU path, as ratios. Skips without CUDA.

Rows (each candidate against its baseline, alternating, ``repeats`` times; throughputs higher-is-better, times
lower-is-better):

- "gpu-tt-bf16": two-tower training through Lightning on CUDA, ``bf16-mixed`` against ``32-true`` (samples/s; the
  ``lightning_suite`` loop timer, same seeded module and data).
- "gpu-tt-plain": the same bf16 Lightning run against the hand-written PyTorch loop under ``torch.autocast``
  (``lightning_suite._plain``), so Lightning's overhead on a GPU is measured too. An extra gives the CPU
  (``models.two_tower.torch_threads`` threads) figure beside them.
- "gpu-als": implicit ALS fit on its CUDA backend against its CPU backend (seconds; BLAS pinned to one thread on
  the CPU side, as the pipeline runs it). Skipped with a note when implicit has no CUDA build (``implicit.gpu``).
- "gpu-topk": all-users top-k by ``torch.mm`` + ``torch.topk`` on CUDA (train-seen items masked, chunked as the
  export chunks, results copied back to host) against the pipeline's CPU scorer ``evaluation.topk.topk``
  (seconds). One untimed run checks that both return the same top-k scores.

Without CUDA (``torch.cuda.is_available()`` is false) ``run`` logs why and returns no rows, so the command and
its tests pass on a CPU-only machine. The data is the suites' seeded power-law matrix (``bench.matrices``).
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from recsys_embed.bench.harness import BenchResult, Measurement, alternate
from recsys_embed.bench.lightning_suite import _lightning, _plain, _Setup, synthetic
from recsys_embed.bench.matrices import power_law_matrix
from recsys_embed.bench.topk_suite import random_embeddings
from recsys_embed.config import ALSConfig, ExportConfig, TwoTowerConfig
from recsys_embed.evaluation.topk import topk
from recsys_embed.models.two_tower.train import torch_threads

log = logging.getLogger(__name__)


def cuda_device() -> str | None:
    """The CUDA card's name, or None when torch sees none."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def gpu_topk(
    user_vectors: np.ndarray, item_vectors: np.ndarray, seen: sp.csr_matrix, k: int, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """All-users top-k on CUDA: per chunk of users ``scores = U @ V.T`` with train-seen items set to -inf, then
    ``torch.topk``. Returns host (n_users, k) int64 item indices and float32 scores, best first."""
    dev = torch.device("cuda")
    items = torch.from_numpy(item_vectors).to(dev)
    n_users, n_items = user_vectors.shape[0], item_vectors.shape[0]
    k = min(k, n_items)
    out_idx = np.empty((n_users, k), dtype=np.int64)
    out_val = np.empty((n_users, k), dtype=np.float32)
    for lo in range(0, n_users, chunk):
        hi = min(lo + chunk, n_users)
        scores = torch.from_numpy(user_vectors[lo:hi]).to(dev) @ items.T
        block = seen[lo:hi].tocoo()
        rows = torch.from_numpy(block.row.astype(np.int64)).to(dev)
        cols = torch.from_numpy(block.col.astype(np.int64)).to(dev)
        scores[rows, cols] = float("-inf")
        val, idx = torch.topk(scores, k, dim=1)
        out_idx[lo:hi], out_val[lo:hi] = idx.cpu().numpy(), val.cpu().numpy()
    return out_idx, out_val


def _two_tower(size: str, repeats: int, steps: int, cfg: TwoTowerConfig) -> list[BenchResult]:
    train, text = synthetic(size)
    setup = _Setup(train, text, cfg)
    steps = min(steps, max(1, setup.seq.n_examples // cfg.batch_size))
    samples = steps * cfg.batch_size
    bf16 = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    runs: dict[str, list[float]] = {"bf16": [], "fp32": [], "plain": []}
    with warnings.catch_warnings(), torch_threads(cfg.torch_threads):
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec).*")
        _lightning(setup, min(steps, 5), "gpu", bf16)  # warm-up: CUDA context, kernels, allocator
        _plain(setup, min(steps, 5), True, bf16)
        for i in range(repeats):
            order = ["bf16", "fp32", "plain"] if i % 2 == 0 else ["plain", "fp32", "bf16"]
            for side in order:
                if side == "plain":
                    loop, _ = _plain(setup, steps, True, bf16)
                else:
                    loop, _ = _lightning(setup, steps, "gpu", bf16 if side == "bf16" else "32-true")
                runs[side].append(samples / loop)
        cpu_steps = min(steps, 20)
        cpu_loop, _ = _plain(setup, cpu_steps, False, "32-true")
    extra = {
        "data": f"{train.shape[0]:,} users x {train.shape[1]:,} items; {steps} steps x {cfg.batch_size}",
        "device": cuda_device(),
        f"cpu plain loop ({cfg.torch_threads or torch.get_num_threads()} threads, {cpu_steps} steps), samples/s": round(
            cpu_steps * cfg.batch_size / cpu_loop
        ),
    }
    bf16_m = Measurement(f"lightning {bf16}", runs["bf16"], unit="samples/s")
    return [
        BenchResult("gpu-tt-bf16", size, bf16_m, Measurement("lightning fp32", runs["fp32"], unit="samples/s"),
                    better="higher", extra=extra),
        BenchResult("gpu-tt-plain", size, bf16_m, Measurement(f"pytorch {bf16}", runs["plain"], unit="samples/s"),
                    better="higher", target=">= 0.9x"),
    ]  # fmt: skip


def _als(size: str, repeats: int) -> list[BenchResult]:
    import implicit

    from recsys_embed.models.mf import als_model

    if not implicit.gpu.HAS_CUDA:
        log.warning("gpu bench: implicit has no CUDA backend here (implicit.gpu.HAS_CUDA is False); ALS row skipped")
        return []
    m = power_law_matrix(size)
    cfg = ALSConfig(factors=64, iterations=15, eval_every=0)

    def fit(gpu: bool) -> Any:
        with threadpool_limits(1, "blas"):
            model = als_model(cfg, gpu, training_loss=False)
            model.fit(m, show_progress=False)
        return model

    fit(True)  # warm-up: CUDA context and kernels
    gpu_s, cpu_s = alternate(lambda: fit(True), lambda: fit(False), repeats)
    return [
        BenchResult("gpu-als", size, Measurement("implicit cuda", gpu_s), Measurement("implicit cpu", cpu_s),
                    extra={"data": f"{m.shape[0]:,} x {m.shape[1]:,}, {m.nnz:,} nnz; factors 64, 15 iterations"})
    ]  # fmt: skip


def _topk(size: str, repeats: int, k: int = 20) -> list[BenchResult]:
    m = power_law_matrix(size)
    emb = random_embeddings(m.shape[0], m.shape[1], 64)
    chunk = ExportConfig().chunk_users
    users = np.arange(m.shape[0])

    def on_gpu() -> tuple[np.ndarray, np.ndarray]:
        out = gpu_topk(emb.user_vectors, emb.item_vectors, m, k, chunk)
        torch.cuda.synchronize()
        return out

    def on_cpu() -> Any:
        return topk(emb, k, users, seen=m, chunk_users=chunk)

    _, g_val = on_gpu()
    c_val = on_cpu().scores
    same = bool(np.allclose(np.sort(g_val, axis=1), np.sort(c_val, axis=1), rtol=1e-4, atol=1e-3))
    gpu_s, cpu_s = alternate(on_gpu, on_cpu, repeats)
    return [
        BenchResult("gpu-topk", size, Measurement("torch cuda mm+topk", gpu_s), Measurement("cpu topk", cpu_s),
                    extra={"data": f"{m.shape[0]:,} users x {m.shape[1]:,} items, factors 64, k {k}",
                           "same top-k scores": same})
    ]  # fmt: skip


def run(size: str = "1m", repeats: int = 3, steps: int = 150, cfg: TwoTowerConfig | None = None) -> list[BenchResult]:
    """Every GPU row (module docstring) on the ``size`` matrix preset; no rows, and a warning, without CUDA."""
    device = cuda_device()
    if device is None:
        log.warning("gpu bench: torch %s sees no CUDA device; nothing measured (the CPU path needs none)",
                    torch.__version__)  # fmt: skip
        return []
    log.info("gpu bench on %s (%s)", device, size)
    t0 = time.perf_counter()
    results = _two_tower(size, repeats, steps, cfg or TwoTowerConfig())
    results += _als(size, repeats)
    results += _topk(size, repeats)
    for r in results:
        r.extra.setdefault("device", device)
    log.info("gpu bench: %d rows in %.0f s; ratios %s", len(results), time.perf_counter() - t0,
             {r.suite: round(r.ratio, 3) for r in results if statistics.median(r.baseline.values)})  # fmt: skip
    return results
