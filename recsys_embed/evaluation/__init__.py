"""The evaluation layer: ``Embeddings`` plus targets become numbers (the ranking kernel ``topk`` shared with the
exports, the metrics, selection on validation, model comparison, the backtest against what happened next).

Imports the data layer and below."""
