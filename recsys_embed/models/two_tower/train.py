"""Entry point: ``train_two_tower(train, cfg, ...) -> Embeddings`` (the model factory calls it).

Steps: seed -> time-ordered sequences (``data``) -> item/user feature tables (``features``) -> module
(``module``: towers + task) -> Lightning ``Trainer`` (``accelerator="auto"``; bf16-mixed on CUDA, fp32 on
CPU; gradient clipping; warmup + cosine LR; best checkpoint and early stopping on validation recall by
full-corpus retrieval; ``MLFlowLogger`` when given) -> best checkpoint restored -> every train user and
item embedded -> the encoder (weights + feature specs) saved for new users/items.

Determinism: on CPU the run is bit-for-bit repeatable under ``cfg.seed`` (``seed_everything``, a seeded
shuffle, ``Trainer(deterministic=True)``, ``num_workers=0`` by default). On GPU it is not: the embedding
backward pass accumulates with atomics and bf16 rounding follows, so two GPU runs differ slightly
(``deterministic`` is left off there, since PyTorch has no deterministic CUDA ``EmbeddingBag`` backward).

Distributed: with several GPUs Lightning picks DDP; every rank embeds its share of the validation users
and the vectors are all-gathered, so all ranks see the same metric; only rank 0 logs and saves. Inside a
long-lived process (the Prefect flow) set ``strategy: ddp_spawn`` so the calling script is not re-launched.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytorch_lightning as pl_
import scipy.sparse as sp
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint

from recsys_embed import progress
from recsys_embed.config import TwoTowerConfig
from recsys_embed.errors import ConfigError
from recsys_embed.models.two_tower.data import (
    HistoryConfig,
    Sequences,
    TwoTowerDataModule,
    UserBatches,
    batch_loader,
    build_sequences,
)
from recsys_embed.models.two_tower.encoder import ItemContent, TwoTowerEncoder, warm_start_module
from recsys_embed.models.two_tower.features import TabularSpec, align, hash_tokens
from recsys_embed.models.two_tower.module import FeatureTables, TwoTowerModule
from recsys_embed.models.two_tower.task import FullCorpusMetrics
from recsys_embed.types import Embeddings, Interactions, check_trainable

log = logging.getLogger(__name__)

OnMetrics = Callable[[dict[str, float], int], None]

# Lightning hints that do not apply here: workers add nothing to batches built by vectorised gathers.
# (and a torch 2.13 deprecation raised inside Lightning 2.6's own pytree helper).
_QUIET = (
    r".*does not have many workers.*",
    r".*The number of training batches .* is smaller than the logging.*",
    r".*isinstance\(treespec, LeafSpec\).*",
)


def resolve_hardware(cfg: TwoTowerConfig) -> tuple[str, str, bool]:
    """(accelerator, precision, on_gpu) for ``cfg``: "auto" precision is bf16-mixed on CUDA with bf16
    support (16-mixed on older GPUs) and 32-true on CPU.

    Raises:
        ConfigError: a GPU accelerator is asked for and CUDA is not available.
    """
    cuda = torch.cuda.is_available()
    acc = cfg.accelerator.lower()
    if acc in ("gpu", "cuda") and not cuda:
        raise ConfigError(
            f"models.two_tower.accelerator is {cfg.accelerator!r} but torch sees no CUDA device "
            f"(torch {torch.__version__}); set it to auto or cpu"
        )
    on_gpu = acc in ("gpu", "cuda") or (acc == "auto" and cuda)
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    return acc, precision, on_gpu


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op (OpenMP) threads and restore the previous count afterwards.

    Torch sizes its pool to the cores; on a shared 2-core box every parallel op then waits for a descheduled
    thread (measured: 1.0-1.2 s per step with 2 threads against 57-68 ms with 1 under load ~3). ``n`` <= 0 leaves
    the count alone. The inter-op pool (unused by eager CPU training) can be sized only once per process, before
    any parallel work: it is set to ``n`` when still possible and otherwise left as it is.

    Yields:
        The intra-op thread count in force inside the block.
    """
    before = torch.get_num_threads()
    if n <= 0:
        yield before
        return
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # parallel work has started in this process: the inter-op pool is fixed now
            log.debug("two_tower: inter-op threads stay %d (already in use)", torch.get_num_interop_threads())
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def item_tables(
    train: Interactions,
    cfg: TwoTowerConfig,
    item_text: pl.DataFrame | None,
    item_features: pl.DataFrame | None,
) -> tuple[FeatureTables, ItemContent, dict[str, float]]:
    """Item feature tables over the train item map (+ padding row) and the encoding to replay on new items.

    Args:
        item_text: ``item_id``, ``text`` (one row per item; others ignored). None: no text tower.
        item_features: ``item_id`` + the columns named by ``cfg.item_categorical`` / ``cfg.item_numeric``.
    """
    n_items = len(train.items)
    feats = align(item_features, train.items.ids, "item_id")
    spec = TabularSpec.fit(feats, cfg.item_categorical, cfg.item_numeric, "item")
    text = align(item_text, train.items.ids, "item_id")
    stats: dict[str, float] = {}
    sentence_dim = 0
    if cfg.sentence_encoder:
        if text is None:
            raise ConfigError("models.two_tower.sentence_encoder is true but the log has no item text column")
        from recsys_embed.models.two_tower.sentence import embedding_dim

        sentence_dim = embedding_dim()
    content = ItemContent("text" if text is not None else None, spec, sentence_dim)
    n_tokens = cfg.max_text_tokens if text is not None else 0
    frame = pl.DataFrame({"item_id": train.items.ids})
    if text is not None:
        frame = frame.with_columns(text["text"])
        _, stats = hash_tokens(text["text"], cfg.text_buckets, n_tokens, cfg.text_bigrams)
        stats["items_with_text"] = float(text["text"].is_not_null().sum()) / max(n_items, 1)
    if feats is not None:
        frame = pl.concat([frame, feats.drop("item_id")], how="horizontal")
    tables = content.encode(frame, cfg, n_tokens)
    assert tables.tokens.shape[0] == n_items + 1
    return tables, content, stats


def user_tables(
    train: Interactions, cfg: TwoTowerConfig, user_features: pl.DataFrame | None
) -> tuple[FeatureTables, TabularSpec]:
    """User feature tables over the train user map (+ padding row) and their fitted encoding."""
    n_users = len(train.users)
    feats = align(user_features, train.users.ids, "user_id")
    spec = TabularSpec.fit(feats, cfg.user_categorical, cfg.user_numeric, "user")
    tables = FeatureTables.empty(n_users, 0, len(spec.categorical), spec.n_numeric)
    codes, values = spec.encode(feats, n_users)
    tables.codes[:n_users], tables.values[:n_users] = torch.from_numpy(codes), torch.from_numpy(values)
    return tables, spec


class _Timer(Callback):
    def on_fit_start(self, trainer: pl_.Trainer, pl_module: pl_.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_fit_end(self, trainer: pl_.Trainer, pl_module: pl_.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.t0


@torch.no_grad()
def embed_all(
    module: TwoTowerModule, seq: Sequences, history: HistoryConfig, device: torch.device, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Final vectors: (n_users, d) user vectors (unit / temperature) from each user's whole train history,
    and (n_items, d) unit item vectors; float32, eval mode, on ``device``."""
    module.eval().to(device)
    items = module.all_item_vectors()
    users = UserBatches(seq, np.arange(module.n_users), history, module.n_items)
    scale = module.task.scale.float()
    parts = []
    for batch in batch_loader(users, chunk, False, 0, False):
        b = {k: v.to(device) for k, v in batch.items()}
        parts.append((module.embed_users(b["user"], b["hist_items"], b["hist_weights"], items).float() * scale).cpu())
    user = torch.cat(parts).numpy() if parts else np.zeros((0, module.cfg.embedding_dim), np.float32)
    return user, items[: module.n_items].cpu().numpy()


def train_two_tower(
    train: Interactions,
    cfg: TwoTowerConfig,
    val_targets: sp.csr_matrix | None = None,
    ks: Sequence[int] = (20,),
    item_text: pl.DataFrame | None = None,
    on_metrics: OnMetrics | None = None,
    lightning_logger: Any | None = None,
    item_features: pl.DataFrame | None = None,
    user_features: pl.DataFrame | None = None,
    warm_start: str | Path | None = None,
) -> Embeddings:
    """Train the two-tower model on ``train`` and return its ``Embeddings`` (model "two_tower").

    Args:
        train: ``matrix`` CSR (n_users x n_items) confidence (> 0 = positive pair); ``events`` (user_idx,
            item_idx, ts, weight) give each pair its first time (an empty frame: seeded random order).
        cfg: the two-tower config slice.
        val_targets: CSR (n_users x n_items) validation positives: full-corpus validation every
            ``cfg.val_every_n_epochs`` epochs, early stopping and the best checkpoint on ``val_<cfg.monitor>``.
            None: train ``cfg.max_epochs`` epochs and keep the last.
        ks: validation cut-offs (``cfg.monitor``'s k is added).
        item_text: ``item_id``, ``text``: hashed word/bigram tokens feed the item tower.
        on_metrics: called once per epoch with ``train_loss`` and validation metrics (only when no
            ``lightning_logger`` is given, which logs the same numbers itself).
        lightning_logger: a Lightning logger (e.g. ``tracking.lightning_logger``: MLFlowLogger on the model's run).
        item_features, user_features: optional ``item_id`` / ``user_id`` frames with the configured columns.
        warm_start: a saved ``TwoTowerEncoder`` folder of an earlier run: its weights initialise this model where
            shapes allow, ID rows matched through the ID maps (``encoder.warm_start_module``). None: fresh init.

    Returns:
        ``Embeddings``: user vectors (n_users, d) = unit vector / temperature, item vectors (n_items, d)
        unit length, ``scoring="dot"`` (the dot product is the trained logit). ``info``: backend,
        accelerator, precision, devices, epochs_run, best_epoch, best_val_metric, val_metric,
        samples_per_second, fit_seconds, temperature, history (one dict per epoch), artifact_dir (the saved
        ``TwoTowerEncoder`` for new users/items), warm_start (bool) and its counts (``warm_start_module``),
        torch_threads, stopped_by_clock (``max_minutes`` ended the fit: not converged, never cached) and
        stopped_by ("early_stopping", "max_epochs" or "clock").
    """
    check_trainable(train, val_targets, "two_tower")
    with torch_threads(cfg.torch_threads) as threads:
        emb = _train(train, cfg, val_targets, ks, item_text, on_metrics, lightning_logger, item_features,
                     user_features, warm_start)  # fmt: skip
    emb.info["torch_threads"] = threads
    return emb


def _train(
    train: Interactions,
    cfg: TwoTowerConfig,
    val_targets: sp.csr_matrix | None,
    ks: Sequence[int],
    item_text: pl.DataFrame | None,
    on_metrics: OnMetrics | None,
    lightning_logger: Any | None,
    item_features: pl.DataFrame | None,
    user_features: pl.DataFrame | None,
    warm_start: str | Path | None,
) -> Embeddings:
    """``train_two_tower``'s body, run inside its thread setting."""
    t_start = time.perf_counter()
    pl_.seed_everything(cfg.seed, workers=True, verbose=False)
    accelerator, precision, on_gpu = resolve_hardware(cfg)
    n_users, n_items = train.shape
    history = HistoryConfig(cfg.history_length, cfg.history_half_life_days, cfg.history_confidence)
    seq = build_sequences(train, cfg.history_confidence, cfg.seed)
    items, content, text_stats = item_tables(train, cfg, item_text, item_features)
    users, user_spec = user_tables(train, cfg, user_features)

    k_monitor = int(cfg.monitor.rsplit("_", 1)[1])
    ks_all = sorted({int(k) for k in ks} | {k_monitor})
    metrics: FullCorpusMetrics | None = None
    val_users: np.ndarray | None = None
    if val_targets is not None:
        from recsys_embed.models.mf import sample_val_targets

        val = sample_val_targets(val_targets, cfg.val_max_users, cfg.seed)
        metrics = FullCorpusMetrics(train.matrix, val, ks_all, train.users, train.items)
        val_users = metrics.eval_users
        if not len(val_users):
            log.warning(
                "two_tower: no user has a validation target; training %d epochs without validation", cfg.max_epochs
            )
            metrics, val_users = None, None
    validating = metrics is not None

    workdir = Path(cfg.artifact_dir) if cfg.artifact_dir else Path(tempfile.mkdtemp(prefix="recsys-two-tower-"))
    workdir.mkdir(parents=True, exist_ok=True)
    module = TwoTowerModule(
        cfg, n_users, n_items, seq.item_count, items, users, content.item_spec.cardinalities,
        user_spec.cardinalities, metrics,
    )  # fmt: skip
    warm_info: dict[str, Any] = {"warm_start": False}
    if warm_start is not None:
        try:
            warm_info = warm_start_module(module, warm_start, train.users, train.items, content.item_spec, user_spec)
        except (OSError, KeyError, ValueError, RuntimeError) as e:  # an unreadable encoder must not fail the run
            log.warning("two_tower: cannot warm-start from '%s' (%s); training from a fresh init", warm_start, e)
            warm_info["warm_start_skipped"] = f"unreadable encoder: {e}"
    if lightning_logger is None:
        module.on_epoch = on_metrics
    module.record_path = workdir / "training.json"
    module.record_path.unlink(missing_ok=True)  # a reused artifact_dir must not feed an old run's history
    dm = TwoTowerDataModule(seq, n_items, history, cfg.batch_size, val_users, cfg.seed, cfg.num_workers)

    monitor = f"val_{cfg.monitor}"
    ckpt = ModelCheckpoint(
        dirpath=workdir / "checkpoints",
        filename="best",
        monitor=monitor if validating else None,
        mode="max",
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,
    )
    timer = _Timer()
    callbacks: list[Callback] = [ckpt, timer]
    if validating and cfg.patience > 0:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=cfg.patience, check_finite=True))
    steps_per_epoch = max(1, seq.n_examples // cfg.batch_size)
    trainer = pl_.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=precision,  # type: ignore[arg-type]
        max_epochs=cfg.max_epochs,
        max_time=timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None,
        gradient_clip_val=cfg.gradient_clip_val,
        deterministic=not on_gpu,
        callbacks=callbacks,
        logger=lightning_logger if lightning_logger is not None else False,
        enable_checkpointing=True,
        enable_progress_bar=cfg.progress_bar or progress.enabled(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=cfg.val_every_n_epochs,
        limit_val_batches=1.0 if validating else 0,
        log_every_n_steps=min(50, steps_per_epoch),
        default_root_dir=workdir,
    )
    log.info(
        "two_tower: %d users x %d items, %d examples (%d steps/epoch), accelerator=%s devices=%s precision=%s, "
        "text=%s, validation=%s",
        n_users, n_items, seq.n_examples, steps_per_epoch, trainer.accelerator.__class__.__name__, cfg.devices,
        precision, bool(items.tokens.shape[1]), f"{len(val_users)} users" if val_users is not None else "off",
    )  # fmt: skip
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with warnings.catch_warnings():
            for pattern in _QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            trainer.fit(module, datamodule=dm)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)

    best_path = ckpt.best_model_path if validating else ""
    if best_path and Path(best_path).exists():
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    if not cfg.artifact_dir and trainer.is_global_zero:
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)  # a temporary folder keeps only the encoder
    record = _training_record(module)
    clock_stopped = _clock_stopped(trainer)
    early_stopped = any(isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0 for cb in callbacks)
    hist = record["history"]
    best_epoch, best_value = _best(hist, monitor) if validating else (None, None)
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    user_vec, item_vec = embed_all(module, seq, history, device)
    module.cpu()

    info: dict[str, Any] = {
        "backend": "lightning-gpu" if on_gpu else "lightning-cpu",
        "accelerator": "cuda" if on_gpu else "cpu",
        "precision": precision,
        "devices": str(trainer.num_devices),
        "strategy": type(trainer.strategy).__name__,
        "epochs_run": len(hist),
        # max_minutes ended the fit before max_epochs and before early stopping: the result depends on machine
        # load, so stages.run_train never caches it
        "stopped_by_clock": clock_stopped,
        # what ended the fit: "early_stopping" (validation stopped improving), "max_epochs" or "clock" (max_minutes:
        # not converged; selection should not prefer it over a converged model, see stopped_by_clock)
        "stopped_by": "clock" if clock_stopped else ("early_stopping" if early_stopped else "max_epochs"),
        "best_epoch": best_epoch,
        "best_val_metric": best_value,
        "val_metric": monitor if validating else None,
        "samples_per_second": record["train_samples"] / record["train_seconds"] if record["train_seconds"] else None,
        "fit_seconds": getattr(timer, "seconds", None),
        "train_examples": seq.n_examples,
        "temperature": 1.0 / float(module.task.scale.detach()),
        "history": hist,
        **{f"text_{k}": v for k, v in text_stats.items()},
        **warm_info,
    }
    if trainer.is_global_zero:
        encoder = TwoTowerEncoder(module, train.users, train.items, content, user_spec, history)
        folder = encoder.save(workdir / "encoder")
        info["artifact_dir"] = str(folder)
        _log_artifacts(lightning_logger, folder)
    info["total_seconds"] = time.perf_counter() - t_start
    log.info(
        "two_tower: %d epochs (best %s: %s = %s), %.0f samples/s, %.1f s in all",
        info["epochs_run"], best_epoch, monitor, None if best_value is None else f"{best_value:.5f}",
        info["samples_per_second"] or 0.0, info["total_seconds"],
    )  # fmt: skip
    return Embeddings(user_vec, item_vec, train.users, train.items, model="two_tower", scoring="dot", info=info)


def _clock_stopped(trainer: Any) -> bool:
    """Whether Lightning's ``max_time`` timer ended the fit (its time budget is spent)."""
    from pytorch_lightning.callbacks import Timer

    for cb in trainer.callbacks:
        if isinstance(cb, Timer):
            remaining = cb.time_remaining("train")
            return remaining is not None and remaining <= 0
    return False


def _training_record(module: TwoTowerModule) -> dict[str, Any]:
    """History and throughput of the fit: the module's own, or rank 0's file when the fit ran in spawned
    processes (``ddp_spawn``), whose attributes do not come back."""
    if module.history or module.record_path is None or not module.record_path.exists():
        return {"history": module.history, "train_samples": module.train_samples, "train_seconds": module.train_seconds}
    record: dict[str, Any] = json.loads(module.record_path.read_text(encoding="utf-8"))
    return record


def _best(history: list[dict[str, float]], monitor: str) -> tuple[int | None, float | None]:
    """(epoch, value) of the first maximum of ``monitor`` in the per-epoch history (NaN never wins)."""
    best: tuple[int | None, float | None] = (None, None)
    for row in history:
        v = row.get(monitor)
        if v is not None and v == v and (best[1] is None or v > best[1]):
            best = (int(row["epoch"]), float(v))
    return best


def _log_artifacts(logger: Any | None, folder: Path) -> None:
    """Attach the saved encoder to the logger's MLflow run (an ``MLFlowLogger``); other loggers are skipped."""
    client = getattr(logger, "experiment", None) if logger is not None else None
    run_id = getattr(logger, "run_id", None)
    if client is None or run_id is None or not hasattr(client, "log_artifacts"):
        return
    try:
        client.log_artifacts(run_id, str(folder), "two_tower_encoder")
    except Exception as e:  # tracking must not fail a finished training
        log.warning("two_tower: could not log the encoder to MLflow run %s: %s", run_id, e)
