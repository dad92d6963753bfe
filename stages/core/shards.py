"""Sharded, resumable processing: finished shards are checkpointed under a fingerprint of
(input content, stage params, engine and model identity); a rerun skips them."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from stages.core.io import read_table, write_json, write_table

LOG = logging.getLogger(__name__)


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (pydantic models are dumped first)."""
    plain = [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def run_sharded(
    table: pa.Table,
    fn: Callable[[pa.Table, int], pa.Table],
    *,
    shard_size: int,
    checkpoints: str | Path,
    stage: str,
    key: str,
) -> pa.Table:
    """Apply `fn(shard, index)` to consecutive slices of `table`; return the concatenated results.

    Each result is written atomically to `<checkpoints>/<stage>/<key>/<i:05d>.parquet`; existing
    files are reused, so a killed run resumes from its finished shards. Directories of other
    keys (stale inputs or params) are removed once this key has finished.
    """
    root = Path(checkpoints) / stage
    directory = root / key
    n_shards = max(1, math.ceil(table.num_rows / shard_size))
    write_json(
        {"key": key, "rows": table.num_rows, "shards": n_shards, "stage": stage}, directory / "meta.json"
    )
    parts = []
    for i in tqdm(range(n_shards), desc=stage, unit="shard"):
        path = directory / f"{i:05d}.parquet"
        if path.exists():
            LOG.info("%s: shard %05d already done, skipping (%s)", stage, i, path)
        else:
            write_table(fn(table.slice(i * shard_size, shard_size), i), path)
        parts.append(read_table(path))
    for stale in (p for p in root.iterdir() if p.is_dir() and p.name != key):
        LOG.info("%s: removing stale checkpoints %s", stage, stale)
        shutil.rmtree(stale)
    return pa.concat_tables(parts)
