"""The data layer: an interaction log becomes ``Interactions`` (sources, parsing, dedup, ingest with quarantine and
accounting, ID maps and the CSR, splits, the incremental state, the synthetic generator, ``init``'s sniffer).

Imports only the top-level shared modules (config, types, errors, io, progress)."""
