"""Storage: atomic files, Parquet and JSON lines, the bounded-memory spill and alignment, fetched
sources, encryption, the response cache and the resume keys. Imports only config."""
