"""``recsys-embed bench``: named suites, each timing the pipeline's path against a baseline side by side."""
