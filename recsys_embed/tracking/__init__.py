"""The tracking layer: the MLflow edge (``tracker.Tracker``), run reports and plots.

Below the models because training logs through it (Lightning's logger, Optuna's trials); imports evaluation and
below."""
