"""Sharded, resumable processing: each finished shard is checkpointed under the stage's resume key
(stages/core/resume.py) with the digest of its input rows; a rerun reuses it only when it is
readable, valid and computed from the same input."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from stages.core.errors import PipelineError
from stages.core.io import PARQUET_OPTIONS, atomic_path, write_table
from stages.core.resume import input_digest

LOG = logging.getLogger(__name__)
INPUT_DIGEST = b"lmsys_synth.input_digest"  # Parquet metadata key of a checkpoint shard


def slices(table: pa.Table, size: int) -> Iterable[pa.Table]:
    """Consecutive slices of an in-memory table, `size` rows each."""
    return (table.slice(start, size) for start in range(0, table.num_rows, size))


def shard_count(path: str | Path, size: int) -> int:
    """How many shards of `size` rows the Parquet file at `path` makes (for progress bars)."""
    return -(-pq.ParquetFile(path).metadata.num_rows // size)


def mismatch(table: pa.Table, schema: pa.Schema, shard: pa.Table) -> str | None:
    """Why `table` is not a valid result for input `shard`, or None when it is."""
    if not table.schema.equals(schema, check_metadata=False):
        return f"schema {table.schema.types} is not {schema.types}"
    if table.num_rows != shard.num_rows:
        return f"{table.num_rows} rows for {shard.num_rows} input rows"
    if not table["conversation_id"].equals(shard["conversation_id"]):
        return "its conversations are not those of the input shard"
    return None


def _reuse(path: Path, want: str, shard: pa.Table, schema: pa.Schema, label: str) -> pa.Table | None:
    """The checkpoint at `path` if it can be read back, was computed from this input and is valid."""
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        LOG.warning("%s: checkpoint %s cannot be read back (%s): recomputing it", label, path, err)
        return None
    if (table.schema.metadata or {}).get(INPUT_DIGEST) != want.encode():
        LOG.info("%s: its input rows changed since %s was written: recomputing it", label, path)
        return None
    if problem := mismatch(table, schema, shard):
        LOG.warning("%s: checkpoint %s is invalid (%s): recomputing it", label, path, problem)
        return None
    LOG.info("%s: already done, reusing %s", label, path)
    return table.replace_schema_metadata(None)


def run_sharded(
    shards: Iterable[pa.Table],
    fn: Callable[[pa.Table, int], pa.Table],
    *,
    out: str | Path,
    schema: pa.Schema,
    checkpoints: str | Path,
    stage: str,
    key: str,
    total: int | None = None,
) -> int:
    """Apply `fn(shard, index)` to each input shard and stream the results into `out`; return its rows.

    Each result (with `schema`, one row per input row, same conversation_id) is written atomically
    to `<checkpoints>/<stage>/<key>/<i:05d>.parquet` with its input digest. A rerun reuses a shard
    only if it reads back, matches the input digest and is valid; otherwise it is recomputed with a
    warning. Directories of other keys are removed once this key has finished. Only one shard is
    in memory at a time; `out` takes its place only when every shard is done.
    """
    directory, rows, count = Path(checkpoints) / stage / key, 0, 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS) as writer:
        for i, shard in enumerate(tqdm(shards, desc=stage, unit="shard", total=total)):
            path, want, label = directory / f"{i:05d}.parquet", input_digest(shard), f"{stage} shard {i:05d}"
            table = _reuse(path, want, shard, schema, label)
            if table is None:
                table = fn(shard, i)
                if problem := mismatch(table, schema, shard):
                    raise RuntimeError(f"{label}: the stage returned an invalid shard: {problem}")
                write_table(table.replace_schema_metadata({INPUT_DIGEST: want}), path)
            writer.write_table(table.replace_schema_metadata(None))
            rows, count = rows + table.num_rows, count + 1
        if count == 0:
            raise PipelineError(f"{stage}: no input rows: re-run the stage that writes its input")
    for stale in (p for p in directory.parent.iterdir() if p.is_dir() and p.name != key):
        LOG.info("%s: removing checkpoints of another key %s", stage, stale)
        shutil.rmtree(stale)
    return rows
