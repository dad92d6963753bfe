"""Bounded-memory building blocks of the stages that join big tables: Parquet read a batch at a
time and re-cut to exact sizes, rows spilled by key to Arrow IPC parts and read back one part at a
time, a part put back in row order (`in_order`, the one alignment of translate, the published file
and the merged file), DuckDB's settings and its repeated-ids query, and a Parquet writer that
encodes in a background thread. Peak memory is set by the rows of a batch, part or range, not by the
number of rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.storage.atomic import atomic_path
from stages.core.storage.parquet import PARQUET_OPTIONS

ID = "conversation_id"
T = TypeVar("T")
_END = object()  # what next() returns at the end of an iterator
BATCH_ROWS = 16_384  # rows of a part, a row range and an output row group: sets the peak memory
# DuckDB's own limit (it spills to the scratch directory beyond it); one thread: its narrow joins
# are quick, and each thread adds buffers that grow with the number of rows
DUCKDB = {"memory_limit": "64MB", "threads": 1}
READ_BUFFER = 1 << 20  # Parquet pages are read through a buffer: a whole column chunk never is


def repeated_ids(
    db: duckdb.DuckDBPyConnection, relation: str, params: dict | None = None, limit: int = 5
) -> list[str]:
    """Up to `limit` conversation_ids that `relation` (a table name, or read_parquet($x) with
    `params`) holds more than once, in id order."""
    query = f"SELECT {ID} FROM {relation} GROUP BY {ID} HAVING count(*) > 1 ORDER BY {ID} LIMIT {int(limit)}"
    return [cid for (cid,) in db.sql(query, params=params).fetchall()]


def read_batches(path: str | Path, columns: list[str] | None, rows: int) -> Iterator[pa.RecordBatch]:
    """The rows of a Parquet file, a batch at a time."""
    parquet = pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False)
    return parquet.iter_batches(batch_size=rows, columns=columns)


def rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly `rows` rows (the last one shorter) out of batches of any size."""
    pending: list[pa.Table] = []
    have = 0
    for batch in batches:
        pending.append(pa.Table.from_batches([batch]))
        have += batch.num_rows
        while have >= rows:
            table = pa.concat_tables(pending)
            yield table.slice(0, rows)
            pending, have = [table.slice(rows)], have - rows
    if have:
        yield pa.concat_tables(pending)


class Spill:
    """Rows appended by key to `parts` Arrow IPC files, then read back one part at a time."""

    def __init__(self, directory: Path, schema: pa.Schema, parts: int) -> None:
        directory.mkdir()
        self.paths = [directory / f"{part:05d}.arrow" for part in range(parts)]
        self._writers = [pa.ipc.new_stream(str(path), schema) for path in self.paths]

    def write(self, table: pa.Table, keys: np.ndarray) -> None:
        """Append each row of `table` to part keys[i] (0 <= key < parts)."""
        order = np.argsort(keys, kind="stable")
        bounds = np.searchsorted(keys[order], np.arange(len(self.paths) + 1))
        table = table.take(order)
        for part in np.flatnonzero(np.diff(bounds)):
            self._writers[part].write_table(table.slice(bounds[part], bounds[part + 1] - bounds[part]))

    def parts(self) -> Iterator[pa.Table]:
        """Each part in key order, whole; its file is removed once read."""
        for writer in self._writers:
            writer.close()
        for path in self.paths:
            with pa.OSFile(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
            path.unlink()
            yield table


def read_rows(path: str | Path, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """The given rows (ascending) of a Parquet file, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(path)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    ends = np.cumsum(sizes, dtype=np.int64)
    pieces = [parquet.schema_arrow.empty_table().select(columns)]
    for group in np.unique(np.searchsorted(ends, rows, side="right")):
        start = ends[group] - sizes[group]
        local = rows[(rows >= start) & (rows < ends[group])] - start
        pieces.append(parquet.read_row_group(group, columns).take(pa.array(local)))
    return pa.concat_tables(pieces)


def in_order(placed: pa.Table, start: int, rows: int) -> tuple[pa.Table, np.ndarray]:
    """The rows of a spill part placed in the range [start, start + rows) (its `row` column), in row
    order with a null row where a row has none; and which rows have one. The one alignment of
    translate, the published file and the merged file."""
    index = np.full(rows, -1, dtype=np.int64)
    index[placed["row"].to_numpy() - start] = np.arange(placed.num_rows)
    present = index >= 0
    if np.count_nonzero(present) != placed.num_rows:
        raise ValueError(f"a row of [{start}, {start + rows}) is placed more than once")
    return placed.take(pa.array(index, mask=~present)), present


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """`items`, the next one made in a background thread while the caller works on this one."""
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(next, iterator, _END)
        while (item := ahead.result()) is not _END:
            ahead = pool.submit(next, iterator, _END)
            yield item


def write_parquet(tables: Iterable[pa.Table], schema: pa.Schema, out: Path) -> int:
    """Write `tables` atomically to `out`, one row group each; a table is encoded in a background
    thread while the next one is made. Return the rows written."""
    rows = 0
    with (
        atomic_path(out) as tmp,
        pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS) as writer,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        done = pool.submit(int)  # a finished future: nothing is being written yet
        for table in tables:
            done.result()
            done = pool.submit(writer.write_table, pa.Table.from_arrays(table.columns, schema=schema))
            rows += table.num_rows
        done.result()
    return rows
