"""Sharded, resumable processing: each finished shard is checkpointed under the stage's resume key
(stages/core/resume.py) with the digest of its input rows; a rerun reuses it only when it is
readable, valid and computed from the same input."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
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


class CheckpointStore:
    """Checkpoint shards under a local directory or any fsspec URL (s3://bucket/prefix, a shared
    filesystem): local files are written through a temporary file and renamed, object-store files in
    one PUT, so a reader never sees half a shard."""

    def __init__(self, root: str | Path) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, stage: str, key: str, index: int) -> str:
        return f"{self.root}/{stage}/{key}/{index:05d}.parquet"

    def read(self, path: str) -> pa.Table | None:
        if not self.fs.exists(path):
            return None
        return pq.read_table(path, filesystem=None if self.local else self.fs)

    def write(self, table: pa.Table, path: str) -> None:
        if self.local:
            write_table(table, path)
            return
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **PARQUET_OPTIONS)
        self.fs.pipe_file(path, sink.getvalue().to_pybytes())

    def remove_other_keys(self, stage: str, key: str) -> None:
        directory = f"{self.root}/{stage}"
        if not self.fs.exists(directory):
            return
        for stale in self.fs.ls(directory, detail=False):
            if stale.rstrip("/").rsplit("/", 1)[-1] != key and self.fs.isdir(stale):
                LOG.info("%s: removing checkpoints of another key %s", stage, stale)
                self.fs.rm(stale, recursive=True)


def _reuse(
    store: CheckpointStore, path: str, want: str, shard: pa.Table, schema: pa.Schema, label: str
) -> pa.Table | None:
    """The checkpoint at `path` if it can be read back, was computed from this input and is valid."""
    try:
        table = store.read(path)
    except (pa.ArrowException, OSError) as err:
        LOG.warning("%s: checkpoint %s cannot be read back (%s): recomputing it", label, path, err)
        return None
    if table is None:
        return None
    if (table.schema.metadata or {}).get(INPUT_DIGEST) != want.encode():
        LOG.info("%s: its input rows changed since %s was written: recomputing it", label, path)
        return None
    if problem := mismatch(table, schema, shard):
        LOG.warning("%s: checkpoint %s is invalid (%s): recomputing it", label, path, problem)
        return None
    LOG.info("%s: already done, reusing %s", label, path)
    return table.replace_schema_metadata(None)


@dataclass
class _Slot:
    """One shard on its way to `out`: its reused checkpoint, or its result (a table or a Future)."""

    index: int
    shard: pa.Table
    path: str
    want: str
    reused: pa.Table | None
    result: pa.Table | Future | None = None

    def ready(self) -> bool:
        return not isinstance(self.result, Future) or self.result.done()


def run_sharded(
    shards: Iterable[pa.Table],
    fn: Callable[[pa.Table, int], pa.Table | Future],
    *,
    out: str | Path,
    schema: pa.Schema,
    checkpoints: str | Path,
    stage: str,
    key: str,
    total: int | None = None,
    window: int = 1,
    metadata: dict[bytes, bytes] | None = None,
) -> int:
    """Apply `fn(shard, index)` to each input shard and stream the results into `out`; return its rows.

    `fn` returns the result, or a Future of it: up to `window` shards are then in flight at once
    (read ahead, computing, or waiting to be written), and results are written in input order.
    Each result (with `schema`, one row per input row, same conversation_id) is written atomically
    to `<checkpoints>/<stage>/<key>/<i:05d>.parquet` with its input digest. A rerun reuses a shard
    only if it reads back, matches the input digest and is valid; otherwise it is recomputed with a
    warning. Directories of other keys are removed once this key has finished. `out` (with
    `metadata` in its schema) takes its place only when every shard is done.
    """
    store, rows, count = CheckpointStore(checkpoints), 0, 0
    slots: deque[_Slot] = deque()
    out_schema = schema.with_metadata(metadata) if metadata else schema
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, out_schema, **PARQUET_OPTIONS) as writer:

        def finish(slot: _Slot) -> None:
            nonlocal rows, count
            table, label = slot.reused, f"{stage} shard {slot.index:05d}"
            if table is None:
                table = slot.result.result() if isinstance(slot.result, Future) else slot.result
                if problem := mismatch(table, schema, slot.shard):
                    raise RuntimeError(f"{label}: the stage returned an invalid shard: {problem}")
                store.write(table.replace_schema_metadata({INPUT_DIGEST: slot.want}), slot.path)
            writer.write_table(table.replace_schema_metadata(metadata))
            rows, count = rows + table.num_rows, count + 1

        try:
            for i, shard in enumerate(tqdm(shards, desc=stage, unit="shard", total=total)):
                path, want = store.path(stage, key, i), input_digest(shard)
                slot = _Slot(
                    i, shard, path, want, _reuse(store, path, want, shard, schema, f"{stage} shard {i:05d}")
                )
                if slot.reused is None:
                    slot.result = fn(shard, i)
                slots.append(slot)
                while slots and (len(slots) >= window or slots[0].ready()):
                    finish(slots.popleft())
            while slots:
                finish(slots.popleft())
        except BaseException:
            for slot in slots:
                if isinstance(slot.result, Future):
                    slot.result.cancel()
            raise
        if count == 0:
            raise PipelineError(f"{stage}: no input rows: re-run the stage that writes its input")
    store.remove_other_keys(stage, key)
    return rows
