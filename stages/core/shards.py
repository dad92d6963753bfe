"""Sharded, resumable processing: finished shards are checkpointed under a fingerprint of
(input content, stage params, engine and model identity); a rerun skips them."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from stages.core.io import PARQUET_OPTIONS, atomic_path, write_json, write_table

LOG = logging.getLogger(__name__)


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (pydantic models are dumped first)."""
    plain = [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def slices(table: pa.Table, size: int) -> Iterable[pa.Table]:
    """Consecutive slices of an in-memory table, `size` rows each."""
    return (table.slice(start, size) for start in range(0, max(table.num_rows, 1), size))


def shard_count(path: str | Path, size: int) -> int:
    """How many shards of `size` rows the Parquet file at `path` makes (for progress bars)."""
    return -(-pq.ParquetFile(path).metadata.num_rows // size)


def run_sharded(
    shards: Iterable[pa.Table],
    fn: Callable[[pa.Table, int], pa.Table],
    *,
    out: str | Path,
    checkpoints: str | Path,
    stage: str,
    key: str,
    total: int | None = None,
) -> int:
    """Apply `fn(shard, index)` to each input shard and stream the results into `out`; return its rows.

    Each result is written atomically to `<checkpoints>/<stage>/<key>/<i:05d>.parquet`; existing
    files are reused, so a killed run resumes from its finished shards (the input must yield
    the same shards again). Directories of other keys (stale inputs or params) are removed once
    this key has finished. Only one shard is in memory at a time.
    """
    root = Path(checkpoints) / stage
    directory = root / key
    done: list[Path] = []
    for i, shard in enumerate(tqdm(shards, desc=stage, unit="shard", total=total)):
        path = directory / f"{i:05d}.parquet"
        if path.exists():
            LOG.info("%s: shard %05d already done, skipping (%s)", stage, i, path)
        else:
            write_table(fn(shard, i), path)
        done.append(path)
    write_json({"key": key, "shards": len(done), "stage": stage}, directory / "meta.json")
    rows = 0
    with atomic_path(out) as tmp:
        writer = None
        for path in done:
            table = pq.read_table(path)
            writer = writer or pq.ParquetWriter(tmp, table.schema, **PARQUET_OPTIONS)
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:
            raise ValueError(f"{stage}: no input rows")
        writer.close()
    for stale in (p for p in root.iterdir() if p.is_dir() and p.name != key):
        LOG.info("%s: removing stale checkpoints %s", stage, stale)
        shutil.rmtree(stale)
    return rows
