"""Matrix factorisation with ``implicit``: ALS (Hu, Koren, Volinsky 2008) and BPR (Rendle et al. 2009).

Both trainers share one shape: a backend factory (implicit's GPU build when asked for or, with
``use_gpu="auto"``, when ``implicit.gpu.HAS_CUDA``; CPU otherwise), BLAS pinned to one thread around
implicit only, a per-iteration callback that reports the training signal, validates every
``eval_every`` iterations with ``evaluate`` and snapshots the best iteration's factors, and an
``Embeddings`` result. Training data contract: ``train.matrix`` is CSR (n_users x n_items) float32
confidence; ALS scales it by ``alpha`` inside implicit (do not pre-scale), BPR reads it as binary.

Warm start (``warm_start=`` a previous run's ``Embeddings`` of the same model): implicit 0.7 only draws random
factors when ``user_factors`` / ``item_factors`` are still None at ``fit`` time and otherwise updates the arrays
it finds in place, without checking their shape. So ``warm_start_factors`` builds arrays of exactly the new
shape: rows of IDs the previous run knew (matched by original ID through both ID maps) start from the previous
vectors, rows of new IDs get implicit's own random initialisation, and a previous model of another width is
refused (a logged cold start, never a failed run).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import implicit.als
import implicit.bpr
import implicit.gpu
import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys_embed.config import ALSConfig, BPRConfig
from recsys_embed.errors import ConfigError
from recsys_embed.evaluation.metrics import evaluate, selection_metrics
from recsys_embed.progress import bar as progress_bar
from recsys_embed.types import Embeddings, Interactions, check_trainable

log = logging.getLogger(__name__)


def _implicit_info_to_debug(record: logging.LogRecord) -> bool:
    """A filter on implicit's logger: its INFO lines (``loss 0.0123`` on every iteration when its own bar is off,
    ``Final training loss``) are per-iteration detail, already in the history and our DEBUG line; they are logged
    again at DEBUG here (``-vv`` shows them) and dropped at INFO. Warnings pass unchanged."""
    if record.levelno >= logging.WARNING:
        return True
    log.debug("implicit: %s", record.getMessage())
    return False


logging.getLogger("implicit").addFilter(_implicit_info_to_debug)

OnMetrics = Callable[[dict[str, float], int], None]
"""``on_metrics(metrics, step)``: ``step`` is the number of completed iterations (1-based)."""


def use_gpu_backend(use_gpu: bool | Literal["auto"], model: str) -> bool:
    """Resolve ``use_gpu`` (True / False / "auto") against implicit's CUDA build.

    Raises:
        ConfigError: ``use_gpu=True`` while implicit has no usable CUDA backend.
    """
    if use_gpu == "auto":
        return bool(implicit.gpu.HAS_CUDA)
    if use_gpu and not implicit.gpu.HAS_CUDA:
        raise ConfigError(
            f"models.{model}.use_gpu is true but implicit has no CUDA backend here (implicit.gpu.HAS_CUDA is "
            f"False: it needs a CUDA GPU and the 'rmm' package); set models.{model}.use_gpu to auto or false"
        )
    return bool(use_gpu)


def _to_numpy(factors: Any) -> np.ndarray:
    """implicit's factors as a NumPy array (GPU ``implicit.gpu.Matrix`` is copied to host)."""
    return factors if isinstance(factors, np.ndarray) else factors.to_numpy()


@dataclass
class _Progress:
    """Per-iteration bookkeeping shared by ALS and BPR: logging, callbacks, validation, best snapshot."""

    name: str
    train: Interactions
    iterations: int
    eval_every: int
    val_targets: sp.csr_matrix | None
    ks: list[int]
    metric: str
    on_metrics: OnMetrics | None
    factors: Callable[[], tuple[Any, Any]]
    history: list[dict[str, float]] = field(default_factory=list)
    best_iteration: int | None = None
    best_value: float = -math.inf
    best_factors: tuple[np.ndarray, np.ndarray] | None = None
    eval_seconds: float = 0.0
    # time spent in our per-iteration callback outside validation (the wrapper's cost inside implicit's fit)
    callback_seconds: float = 0.0

    @property
    def validating(self) -> bool:
        return self.eval_every > 0 and self.val_targets is not None

    def embeddings(self, user: np.ndarray, item: np.ndarray, info: dict[str, Any] | None = None) -> Embeddings:
        return Embeddings(
            user_vectors=user,
            item_vectors=item,
            users=self.train.users,
            items=self.train.items,
            model=self.name,
            scoring="dot",
            info=info or {},
        )

    def step(self, iteration: int, seconds: float, train_metrics: dict[str, float]) -> None:
        """Record iteration ``iteration`` (0-based, as implicit passes it)."""
        t0, eval_before = time.perf_counter(), self.eval_seconds
        done = iteration + 1
        row: dict[str, float] = {"iteration": float(done), "seconds": seconds, **train_metrics}
        shown = " ".join(f"{k} {v:.5g}" for k, v in train_metrics.items())
        log.debug("%s iteration %d/%d: %s (%.2f s)", self.name, done, self.iterations, shown, seconds)
        if self.on_metrics is not None and train_metrics:
            self.on_metrics(dict(train_metrics), done)
        if self.validating and (done % self.eval_every == 0 or done == self.iterations):
            row.update(self._validate(done))
        self.history.append(row)
        self.callback_seconds += time.perf_counter() - t0 - (self.eval_seconds - eval_before)

    def _validate(self, done: int) -> dict[str, float]:
        assert self.val_targets is not None
        t0 = time.perf_counter()
        user, item = (_to_numpy(f) for f in self.factors())
        metrics = evaluate(self.embeddings(user, item), self.train.matrix, self.val_targets, self.ks)
        val = {f"val_{k}": v for k, v in metrics.items()}
        value = metrics[self.metric]
        if value > self.best_value:  # NaN (no validation user) never improves
            self.best_value, self.best_iteration = value, done
            # implicit updates its factors in place: copy, except after the last iteration (nothing follows)
            last = done == self.iterations
            self.best_factors = (user, item) if last else (np.array(user, copy=True), np.array(item, copy=True))
        self.eval_seconds += time.perf_counter() - t0
        log.debug(
            "%s iteration %d: val %s %.5f (best %.5f at %s)",
            self.name,
            done,
            self.metric,
            value,
            self.best_value,
            self.best_iteration,
        )
        if self.on_metrics is not None:
            self.on_metrics(val, done)
        return val

    def result(self, backend: str, fit_seconds: float, extra: dict[str, Any]) -> Embeddings:
        user, item = (_to_numpy(f) for f in self.factors())
        returned = self.iterations
        if self.best_factors is not None and self.best_iteration != self.iterations:
            log.info(
                "%s: final iteration is worse on val %s than iteration %d (%.5f); returning that snapshot",
                self.name,
                self.metric,
                self.best_iteration,
                self.best_value,
            )
            user, item = self.best_factors
            returned = int(self.best_iteration or self.iterations)
        info: dict[str, Any] = {
            "backend": backend,
            "best_iteration": self.best_iteration,
            "best_val_metric": None if self.best_iteration is None else self.best_value,
            "val_metric": self.metric if self.validating else None,
            "returned_iteration": returned,
            "history": self.history,
            "fit_seconds": fit_seconds,
            "eval_seconds": self.eval_seconds,
            "callback_seconds": self.callback_seconds,
            **extra,
        }
        return self.embeddings(user, item, info)


def sample_val_targets(targets: sp.csr_matrix, max_users: int, seed: int) -> sp.csr_matrix:
    """``targets`` with all but a seeded sample of ``max_users`` users-with-targets zeroed (0 = keep all).

    Same shape, so it still lines up with the train matrix; ``evaluate`` skips the emptied rows.
    """
    targets = sp.csr_matrix(targets)
    users = np.flatnonzero(np.diff(targets.indptr) > 0)
    if max_users <= 0 or len(users) <= max_users:
        return targets
    keep = np.zeros(targets.shape[0], dtype=targets.dtype)
    keep[np.random.default_rng(seed).choice(users, max_users, replace=False)] = 1
    out = sp.csr_matrix(sp.diags(keep) @ targets)
    out.eliminate_zeros()
    return out


def _check_inputs(
    train: Interactions, val_targets: sp.csr_matrix | None, ks: Sequence[int], metric: str, name: str
) -> list[int]:
    check_trainable(train, val_targets, name)
    ks_list = sorted({int(k) for k in ks})
    allowed = selection_metrics(ks_list)
    if metric not in allowed:
        raise ValueError(f"{name}: validation metric {metric!r} is not computed for ks={ks_list}; use one of {allowed}")
    return ks_list


def _backend_name(gpu: bool) -> str:
    return "implicit-gpu" if gpu else "implicit-cpu"


class WarmStartError(ValueError):
    """A previous model cannot seed this fit (another width or model); the fit starts cold instead."""


@dataclass
class WarmStart:
    """Initial factors for one fit, in the new ID maps' row order.

    Attributes:
        user, item: float32 C-contiguous (n_users, d) / (n_items, d).
        users_reused, items_reused: rows that start from the previous run's vectors (the rest are new IDs).
    """

    user: np.ndarray
    item: np.ndarray
    users_reused: int
    items_reused: int

    def info(self) -> dict[str, Any]:
        return {"warm_start": True, "warm_start_users": self.users_reused, "warm_start_items": self.items_reused}


def _random_rows(name: str, n: int, factors: int, rng: np.random.Generator, user_side: bool) -> np.ndarray:
    """implicit 0.7's own CPU initialisation for ``n`` fresh rows: ALS ``U[0, 0.01)``; BPR ``(U[0, 1) - 0.5) /
    factors`` with a last column that is the item bias (users: fixed at 1)."""
    if name == "als":
        return rng.random((n, factors), dtype=np.float32) * np.float32(0.01)
    rows = (rng.random((n, factors + 1), dtype=np.float32) - np.float32(0.5)) / np.float32(factors)
    if user_side:
        rows[:, factors] = 1.0
    return rows


def warm_start_factors(previous: Embeddings, train: Interactions, name: str, factors: int, seed: int) -> WarmStart:
    """Map ``previous`` (an earlier fit of model ``name``) onto ``train``'s ID maps as initial factors.

    Args:
        previous: the earlier run's ``Embeddings`` (its ``users`` / ``items`` ID maps say which row is which ID).
        train: this fit's interactions; rows follow ``train.users`` / ``train.items``.
        name: "als" (d = ``factors``) or "bpr" (d = ``factors + 1``: implicit's item-bias column).
        factors: this fit's configured factors.
        seed: seeds the random rows of IDs the previous run did not know.

    Returns:
        ``WarmStart``: a previous vector wherever the original ID is in both maps (so extended maps, reordered maps
        and IDs that dropped out are all handled by ID, not by position); implicit's random init elsewhere.

    Raises:
        WarmStartError: the previous model is another model or another width (e.g. ``factors`` changed).
    """
    d = factors if name == "als" else factors + 1
    if previous.model != name:
        raise WarmStartError(f"previous embeddings are of model {previous.model!r}, not {name!r}")
    if previous.dim != d:
        raise WarmStartError(f"previous {name} has {previous.dim} columns, this fit needs {d} (factors changed?)")
    rng = np.random.default_rng([seed, 7])
    out, reused = [], []
    for side, new_map, old_map, old_vec in (
        ("user", train.users, previous.users, previous.user_vectors),
        ("item", train.items, previous.items, previous.item_vectors),
    ):
        mat = _random_rows(name, len(new_map), factors, rng, side == "user")
        new_idx = new_map.lookup(old_map.ids.cast(new_map.dtype, strict=False))
        hit = new_idx.is_not_null().to_numpy()
        mat[new_idx.to_numpy()[hit].astype(np.int64)] = np.asarray(old_vec, dtype=np.float32)[hit]
        out.append(np.ascontiguousarray(mat, dtype=np.float32))
        reused.append(int(hit.sum()))
    return WarmStart(out[0], out[1], reused[0], reused[1])


def _set_factors(model: Any, gpu: bool, warm: WarmStart) -> None:
    """Hand the initial factors to implicit (host arrays on CPU, ``implicit.gpu.Matrix`` on the GPU build)."""
    if gpu:
        model.user_factors = implicit.gpu.Matrix(warm.user)
        model.item_factors = implicit.gpu.Matrix(warm.item)
    else:
        model.user_factors, model.item_factors = warm.user, warm.item


def transform_confidence(
    matrix: sp.csr_matrix, how: str, k1: float = 100.0, b: float = 0.8
) -> sp.csr_matrix:
    """The summed confidence r of each stored (user, item) pair, transformed for ALS (``ALSConfig.confidence``).

    Args:
        matrix: CSR (n_users x n_items), stored values > 0.
        how: "none" (unchanged), "log1p" (log(1 + r)), or "bm25": implicit's ``bm25_weight`` on the items x users
            matrix, as implicit's last.fm example weighs play counts (``bm25_weight(artist_user_plays, K1, B)``):
            ``r (K1 + 1) / (K1 ((1 - B) + B len_i / mean len) + r) * idf_u``, with ``len_i`` item i's total and
            ``idf_u = log(n_items) - log1p(items of user u)``.
        k1, b: BM25's K1 and B.

    Returns:
        A CSR of the same shape and sparsity pattern, float32, every stored value > 0 (BM25 can reach 0 or below
        for a user holding nearly every item: such values are raised to 1e-6 so the pair stays a positive).
    """
    if how == "none":
        return matrix
    out = matrix.astype(np.float32, copy=True)
    if how == "log1p":
        out.data = np.log1p(out.data)
        return out
    if how != "bm25":
        raise ConfigError(f"models.als.confidence={how!r}: choose none, log1p or bm25")
    from implicit.nearest_neighbours import bm25_weight

    weighted = bm25_weight(out.T.tocoo(), K1=k1, B=b).T.tocsr()
    weighted.sort_indices()
    weighted.data = np.maximum(weighted.data, 1e-6).astype(np.float32)
    return weighted


def als_model(cfg: ALSConfig, gpu: bool, training_loss: bool | None = None) -> Any:
    """implicit's ``AlternatingLeastSquares`` as ``cfg`` configures it (``training_loss`` overrides the config's)."""
    return implicit.als.AlternatingLeastSquares(
        factors=cfg.factors,
        regularization=cfg.regularization,
        alpha=cfg.alpha,
        iterations=cfg.iterations,
        use_cg=cfg.use_cg,
        use_gpu=gpu,
        calculate_training_loss=cfg.training_loss if training_loss is None else training_loss,
        random_state=cfg.seed,
    )


def train_als(
    train: Interactions,
    cfg: ALSConfig,
    val_targets: sp.csr_matrix | None = None,
    ks: Sequence[int] = (20,),
    metric: str = "ndcg_at_20",
    on_metrics: OnMetrics | None = None,
    show_progress: bool = True,
    warm_start: Embeddings | None = None,
) -> Embeddings:
    """Fit implicit ALS on ``train.matrix`` (confidence; implicit multiplies it by ``cfg.alpha``).

    Args:
        train: the train interactions (CSR users x items, float32 > 0).
        cfg: the ALS slice of the config.
        val_targets: CSR (n_users x n_items) held-out positives for validation (None: no validation).
        ks, metric: validation cut-offs and the metric that picks the best iteration (higher is better).
        on_metrics: called with ``{"train_loss": ...}`` every iteration (when ``cfg.training_loss``) and
            ``{"val_<metric>": ...}`` every ``cfg.eval_every`` iterations and after the last one, with the
            1-based iteration. Validation scores at most ``cfg.val_max_users`` sampled users.
        show_progress: an iteration bar when ``recsys_embed.progress`` allows one (an interactive terminal
            without ``--quiet``); iterations are logged either way.
        warm_start: a previous run's ALS ``Embeddings``: known IDs start from their previous vectors, new IDs
            from implicit's random init (``warm_start_factors``). None, or an incompatible one: a cold start.

    Returns:
        ``Embeddings`` (model "als", d = ``cfg.factors``) of the best validated iteration, or of the last
        one without validation. ``info``: backend, best_iteration, best_val_metric, returned_iteration,
        history (one dict per iteration), fit_seconds (implicit's fit, callbacks included), eval_seconds,
        callback_seconds (the callback's own cost outside validation), warm_start (bool) with
        warm_start_users / warm_start_items (rows reused) or warm_start_skipped (why a given one was not used).
    """

    def make_model(gpu: bool) -> Any:
        return als_model(cfg, gpu)

    def signal(loss: float | None) -> dict[str, float]:
        return {} if loss is None else {"train_loss": float(loss)}

    if cfg.confidence != "none":
        train = replace(train, matrix=transform_confidence(train.matrix, cfg.confidence, cfg.bm25_k1, cfg.bm25_b))
    extra: dict[str, Any] = {"confidence": cfg.confidence}
    if cfg.confidence == "bm25":
        extra.update(bm25_k1=cfg.bm25_k1, bm25_b=cfg.bm25_b)
    return _fit_implicit(
        "als", train, cfg, make_model, signal, val_targets, ks, metric, on_metrics, show_progress, extra, warm_start
    )


def train_bpr(
    train: Interactions,
    cfg: BPRConfig,
    val_targets: sp.csr_matrix | None = None,
    ks: Sequence[int] = (20,),
    metric: str = "ndcg_at_20",
    on_metrics: OnMetrics | None = None,
    show_progress: bool = True,
    warm_start: Embeddings | None = None,
) -> Embeddings:
    """Fit implicit BPR on ``train.matrix`` (any stored positive is a positive; weights are ignored).

    Arguments as ``train_als``. implicit's BPR reports no loss, so the per-iteration training signal is
    ``{"train_auc": correct / (samples - skipped)}``, the fraction of sampled (positive, negative) pairs
    already ranked correctly.

    Returns:
        ``Embeddings`` (model "bpr", d = ``cfg.factors + 1``: implicit's last item column is an item bias
        and the matching user column is 1, so the dot product includes the bias).
    """
    samples = train.matrix.nnz

    def make_model(gpu: bool) -> Any:
        return implicit.bpr.BayesianPersonalizedRanking(
            factors=cfg.factors,
            learning_rate=cfg.learning_rate,
            regularization=cfg.regularization,
            iterations=cfg.iterations,
            use_gpu=gpu,
            num_threads=cfg.num_threads,
            random_state=cfg.seed,
        )

    def signal(correct: int, skipped: int) -> dict[str, float]:
        judged = samples - skipped
        return {"train_auc": correct / judged} if judged > 0 else {}

    extra = {"num_threads": cfg.num_threads}
    return _fit_implicit(
        "bpr", train, cfg, make_model, signal, val_targets, ks, metric, on_metrics, show_progress, extra, warm_start
    )


def _fit_implicit(
    name: str,
    train: Interactions,
    cfg: ALSConfig | BPRConfig,
    make_model: Callable[[bool], Any],
    signal: Callable[..., dict[str, float]],
    val_targets: sp.csr_matrix | None,
    ks: Sequence[int],
    metric: str,
    on_metrics: OnMetrics | None,
    show_progress: bool,
    extra_info: dict[str, Any],
    warm_start: Embeddings | None = None,
) -> Embeddings:
    """The fit both implicit models share: validation sample, backend choice, single-threaded BLAS around
    implicit, per-iteration progress (``signal`` maps implicit's callback stats to training metrics),
    best-iteration snapshots, timing; a warm start when ``warm_start`` fits."""
    ks_list = _check_inputs(train, val_targets, ks, metric, name)
    warm: WarmStart | None = None
    warm_info: dict[str, Any] = {"warm_start": False}
    if warm_start is not None:
        try:
            warm = warm_start_factors(warm_start, train, name, cfg.factors, cfg.seed)
            warm_info = warm.info()
        except WarmStartError as e:
            log.warning("%s: not warm-starting (%s); training from a random start", name, e)
            warm_info["warm_start_skipped"] = str(e)
    if val_targets is not None and cfg.eval_every:
        val_targets = sample_val_targets(val_targets, cfg.val_max_users, cfg.seed)
    gpu = use_gpu_backend(cfg.use_gpu, name)
    backend = _backend_name(gpu)
    log.info(
        "%s: %s on %d users x %d items (%d nnz), factors=%d iterations=%d %s",
        name,
        backend,
        *train.shape,
        train.matrix.nnz,
        cfg.factors,
        cfg.iterations,
        " ".join(f"{k}={v}" for k, v in extra_info.items()),
    )
    if warm is not None:
        log.info("%s: warm start from the previous run: %d of %d users and %d of %d items keep their vectors",
                 name, warm.users_reused, train.shape[0], warm.items_reused, train.shape[1])  # fmt: skip
    bar_cm = progress_bar(f"{name} fit", cfg.iterations, "iterations", show=show_progress)
    with threadpool_limits(1, "blas"), bar_cm as bar:
        model = make_model(gpu)
        if warm is not None:
            _set_factors(model, gpu, warm)
        progress = _Progress(
            name,
            train,
            cfg.iterations,
            cfg.eval_every,
            val_targets,
            ks_list,
            metric,
            on_metrics,
            factors=lambda: (model.user_factors, model.item_factors),
        )

        def callback(iteration: int, seconds: float, *stats: Any) -> None:
            progress.step(iteration, seconds, signal(*stats))
            bar.advance()

        t0 = time.perf_counter()
        model.fit(train.matrix, show_progress=False, callback=callback)  # our bar, not implicit's tqdm
        fit_seconds = time.perf_counter() - t0
    log.info("%s: fitted in %.2f s (%.2f s of it validating)", name, fit_seconds, progress.eval_seconds)
    return progress.result(backend, fit_seconds, {**extra_info, **warm_info})
