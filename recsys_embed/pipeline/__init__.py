"""The pipeline layer: the stages the Prefect flows call (content-keyed cache, atomic commits), the run lock, and
the two-tower DDP launcher.

Imports every layer below; only ``flows/``, ``cli`` and ``bench`` import it."""
