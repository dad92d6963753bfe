"""Storage: atomic files, Parquet and JSON lines, the bounded-memory spill and alignment, fetched
sources, encryption, the response cache, the resume keys and the DVC remotes' check. Imports only
config."""
