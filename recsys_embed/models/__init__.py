"""The models layer: ``Interactions`` become ``Embeddings`` (the factory, popularity, ALS/BPR via implicit, EASE,
the two-tower package, the Optuna search).

Imports tracking, evaluation, data and below."""
