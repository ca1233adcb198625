"""The serving layer: what users consume (coverage of every user with history, top-k and similar-item exports,
shards, ANN, the database export, the registered recommender and its answers).

Imports models and below."""
