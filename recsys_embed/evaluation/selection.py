"""Choosing what to ship, on the validation window only.

Each model was fitted on the fit window, its best iteration or epoch chosen on the validation window by its
trainer. ``select`` then picks the best model from the validation metrics alone; test metrics are scored once per
model and reported, and never reach this module.

The rule: rank the models by the validation metric; every model whose paired difference from the leader is
within ``tie_se`` standard errors (over the same validation users) is tied with it, and the simplest tied model
wins (``COMPLEXITY``). A model with a lower mean can thus be picked only when the data cannot tell it from the
leader. ``paired_se`` is the standard error of the mean per-user difference: both models are scored on the same
users, so the users' own difficulty cancels out and the test is far sharper than comparing two means.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Simplest first: a tie goes to the model earlier in this order (cheaper to fit, to serve and to explain).
COMPLEXITY = ("popularity", "ease", "als", "bpr", "two_tower")


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a - b) over users (both arrays over the same users, same order); NaN below 2 users."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_se needs per-user values over the same users; got shapes {a.shape} and {b.shape}")
    n = a.size
    if n < 2:
        return float("nan")
    return float(np.std(a - b, ddof=1) / math.sqrt(n))


def mean_se(a: np.ndarray) -> float:
    """Standard error of a mean over users (NaN below 2 users)."""
    a = np.asarray(a, dtype=np.float64)
    return float(np.std(a, ddof=1) / math.sqrt(a.size)) if a.size >= 2 else float("nan")


@dataclass(frozen=True)
class Selection:
    """The pick and why.

    Attributes:
        best: the chosen model (None when no model has a validation value).
        metric: the validation metric (``eval.primary_metric``).
        values: validation metric per model.
        leader: the model with the highest validation value.
        tied: models within ``tie_se`` paired standard errors of the leader (the leader included).
        gap_se: per model, (leader - model) / paired SE.
        users: validation users the values are over.
        reason: one sentence for people.
    """

    best: str | None
    metric: str
    values: dict[str, float]
    leader: str | None
    tied: list[str] = field(default_factory=list)
    gap_se: dict[str, float] = field(default_factory=dict)
    users: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"basis": "validation window", **asdict(self)}


def _rank(name: str) -> int:
    return COMPLEXITY.index(name) if name in COMPLEXITY else len(COMPLEXITY)


def select(
    val_metrics: dict[str, dict[str, float]],
    per_user: dict[str, np.ndarray],
    metric: str,
    tie_se: float,
) -> Selection:
    """Pick the best model from validation results (see the module docstring).

    Args:
        val_metrics: model -> its validation metrics (``evaluate``); a NaN or missing ``metric`` cannot win.
        per_user: model -> its per-user ``metric`` over the validation users (``evaluate_users``), all over the
            same users; a model missing here is compared on its mean alone (it ties only on an exact tie).
        metric: the metric to select on.
        tie_se: the tie band, in paired standard errors.
    """
    values = {m: float(v[metric]) for m, v in val_metrics.items() if metric in v and not math.isnan(float(v[metric]))}
    if not values:
        return Selection(None, metric, {}, None, reason="no model has a validation value: nothing to select on")
    leader = max(values, key=lambda m: (values[m], -_rank(m)))
    users = int(per_user[leader].size) if leader in per_user else 0
    gaps: dict[str, float] = {}
    tied = [leader]
    for m, v in values.items():
        if m == leader:
            continue
        gap = values[leader] - v
        se = paired_se(per_user[leader], per_user[m]) if leader in per_user and m in per_user else float("nan")
        gaps[m] = gap / se if se and not math.isnan(se) else (0.0 if gap == 0 else math.inf)
        if gaps[m] <= tie_se:
            tied.append(m)
    best = min(tied, key=_rank)
    if best == leader:
        reason = f"{leader} has the highest validation {metric} ({values[leader]:.4f} over {users:,} users)"
        if len(tied) > 1:
            reason += f"; tied within {tie_se:g} SE with {', '.join(t for t in tied if t != leader)}, but simpler"
    else:
        reason = (
            f"{best} ({values[best]:.4f}) is within {tie_se:g} paired SE of the leader {leader} ({values[leader]:.4f}, "
            f"gap {gaps[best]:.2f} SE over {users:,} validation users): the simplest of the tied models wins"
        )
    return Selection(best, metric, values, leader, sorted(tied, key=_rank), gaps, users, reason)
