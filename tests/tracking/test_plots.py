"""Training-curve plots: each quantity on an axis that fits it, a colour per series, legends off the data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from recsys_embed.tracking import plots


def _als_history() -> list[dict[str, Any]]:
    """ALS as mf.py records it: wall time and the evaluated-user count beside the [0, 1] validation metrics."""
    rows: list[dict[str, Any]] = []
    for i in range(1, 16):
        row: dict[str, Any] = {"iteration": float(i), "seconds": 0.4, "train_loss": 0.01 / i}
        if i % 5 == 0:
            row |= {"val_ndcg_at_10": 0.05 + 0.01 * i, "val_recall_at_10": 0.06 + 0.01 * i,
                    "val_ndcg_at_20": 0.07 + 0.01 * i, "val_recall_at_20": 0.09 + 0.01 * i, "val_map_at_20": 0.03,
                    "val_hit_rate_at_20": 0.45, "val_coverage_at_20": 0.3, "val_n_users_evaluated": 1500.0}  # fmt: skip
        rows.append(row)
    return rows


def _lines(fig: Any) -> dict[str, Any]:
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}


def test_als_curves_keep_time_and_counts_off_the_metric_axis() -> None:
    fig = plots.training_curves(_als_history(), "als")
    try:
        signal, metrics = fig.axes
        assert signal.get_ylabel() == "train loss" and metrics.get_ylabel() == "validation metric"
        lines = _lines(fig)
        assert "seconds" not in lines and "val_n_users_evaluated" not in lines
        shown = {line.get_label() for line in metrics.get_lines()}
        assert shown == {"val_ndcg_at_10", "val_recall_at_10", "val_ndcg_at_20", "val_recall_at_20"}
        hi = metrics.get_ylim()[1]
        assert 0.0 <= hi <= 1.0  # every series on it is a [0, 1] metric, so none is flattened by a count
        colours = [str(line.get_color()) for line in lines.values()]
        assert len(set(colours)) == len(colours) == 5  # train_loss + 4 validation metrics, all distinguishable
        fig.canvas.draw()
        for ax in fig.axes:  # each legend sits below its panel, over no data
            assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0
    finally:
        plots.close(fig)


def test_bpr_auc_is_not_labelled_loss() -> None:
    history = [{"iteration": float(i), "seconds": 0.1, "train_auc": 0.5 + 0.004 * i} for i in range(1, 101)]
    history[24] |= {"val_ndcg_at_20": 0.02, "val_n_users_evaluated": 900.0}
    fig = plots.training_curves(history, "bpr")
    try:
        assert "AUC" in fig.axes[0].get_ylabel() and "loss" not in fig.axes[0].get_ylabel()
        assert [line.get_label() for line in fig.axes[1].get_lines()] == ["val_ndcg_at_20"]
    finally:
        plots.close(fig)


@pytest.mark.parametrize("history", [[], [{"epoch": 1.0}]])
def test_no_history_draws_a_note_not_an_error(history: list[dict[str, Any]]) -> None:
    fig = plots.training_curves(history, "two_tower")
    try:
        assert [t.get_text() for t in fig.axes[0].texts] == ["no training history"]
    finally:
        plots.close(fig)


def test_two_tower_series_have_distinct_colours() -> None:
    history = [{"epoch": float(i), "train_loss": 5 - 0.2 * i, "val_recall_at_20": 0.05 + 0.01 * i,
                "val_ndcg_at_20": 0.04 + 0.01 * i} for i in range(1, 6)]  # fmt: skip
    fig = plots.training_curves(history, "two_tower")
    try:
        colours = [str(line.get_color()) for line in _lines(fig).values()]
        assert len(colours) == 3 and len(set(colours)) == 3
        assert fig.axes[0].get_xlabel() == "epoch"
    finally:
        plots.close(fig)


def test_item_projection_of_a_wide_catalog_past_the_subsample() -> None:
    """Regression: EASE on 8,204 items (MovieLens latest-small) failed its model logging with
    "`v0` must have shape (5000,)": the 5,000-row subsample of 8,204-wide vectors made svds start on the wrong side."""
    from recsys_embed.tracking.plots import item_projection

    rng = np.random.default_rng(0)
    wide = rng.standard_normal((6000, 6000)).astype(np.float32)
    fig = item_projection(wide, rng.integers(1, 50, 6000), "ease", max_points=5000)
    assert fig.axes and fig.axes[0].collections  # the scatter was drawn
