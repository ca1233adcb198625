"""recsys-embed: leakage-safe recommender embeddings from raw interaction logs.

The library never imports Prefect; ``flows/`` orchestrates it.
"""

__version__ = "0.1.0"
