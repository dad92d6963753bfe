"""Parquet tables: deterministic, atomic writers (the same rows give the same bytes, however they
were batched), the engine identities in a file's metadata, and aligned streaming reads of the
tables of consecutive stages."""

from __future__ import annotations

import collections
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.config.errors import SourceError
from stages.core.storage.atomic import atomic_path, discard, writing

PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": True, "store_schema": True}


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a Parquet file atomically; the same table always gives the same bytes."""
    with atomic_path(path) as tmp, writing(path):
        pq.write_table(table, tmp, **PARQUET_OPTIONS)


@contextlib.contextmanager
def parquet_table_writer(
    path: str | os.PathLike, schema: pa.Schema, rows: int
) -> Iterator[Callable[[pa.Table], None]]:
    """Yield a function that appends tables to a Parquet file in row groups of `rows` rows (see
    RowGroups); the file takes its place only when the block succeeds."""
    with atomic_path(path) as tmp:
        with writing(path):
            writer = pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS)
        groups = RowGroups(writer, rows)

        def write(table: pa.Table) -> None:
            with writing(path):
                groups.write(table)

        try:
            yield write
            with writing(path):
                groups.close()
        except BaseException:
            discard(writer)
            raise
        with writing(path):
            writer.close()


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


# Parquet metadata keys `lmsys_synth.engine.<role>`: the identity of the engine that filled a file
ENGINE_METADATA = "lmsys_synth.engine."


def engines_of(path: str | Path) -> dict[bytes, bytes]:
    """The engine identities recorded in a Parquet file's metadata, by key."""
    metadata = pq.read_schema(path).metadata or {}
    return {k: v for k, v in metadata.items() if k.startswith(ENGINE_METADATA.encode())}


def engine_roles(paths: list[str | Path]) -> dict[str, dict]:
    """role -> the engine identity recorded in the Parquet files `paths` (the release manifest's)."""
    return {
        k.decode().removeprefix(ENGINE_METADATA): json.loads(v)
        for p in paths
        for k, v in engines_of(p).items()
    }


def value_counts(path: str | os.PathLike, columns: list[str]) -> dict[str, int]:
    """`<column>:<value>` -> rows, over the non-null values of string columns of a Parquet file."""
    counts: dict[str, int] = {}
    for batch in pq.ParquetFile(path).iter_batches(columns=columns):
        for column in columns:
            for item in batch[column].value_counts().to_pylist():
                if item["values"] is not None:
                    name = f"{column}:{item['values']}"
                    counts[name] = counts.get(name, 0) + item["counts"]
    return counts


def align(base: pa.Table, other: pa.Table, columns: list[str], other_name: str) -> pa.Table:
    """Append `columns` of `other` to `base`; both must list the same conversations in the same order."""
    if not base["conversation_id"].equals(other["conversation_id"]):
        raise SourceError(
            f"{other_name} lists other conversations than its input: re-run the stage that wrote it"
        )
    for column in columns:
        base = base.append_column(column, other[column])
    return base


class _Rows:
    """Reads a Parquet file in pieces of exactly the requested number of rows.

    pyarrow is asked for batches of that size too: its default (65,536 rows) holds, for a table
    of ten responses per row, gigabytes at a time, whatever the piece size."""

    def __init__(self, path: str | os.PathLike, columns: list[str], rows: int) -> None:
        self.path = Path(path)
        self._file = pq.ParquetFile(self.path)
        self._batches = self._file.iter_batches(batch_size=rows, columns=["conversation_id", *columns])
        self._rest: pa.Table | None = None

    def take(self, n: int) -> pa.Table | None:
        """The next n rows (fewer at the end of the file), or None when the file is exhausted."""
        parts = [] if self._rest is None else [self._rest]
        have = sum(p.num_rows for p in parts)
        while have < n and (batch := next(self._batches, None)) is not None:
            parts.append(pa.Table.from_batches([batch]))
            have += batch.num_rows
        if have == 0:
            return None
        table = pa.concat_tables(parts)
        self._rest = table.slice(n)
        return table.slice(0, n)


def iter_aligned(
    base: tuple[str | os.PathLike, list[str]], *others: tuple[str | os.PathLike, list[str]], rows: int = 8192
) -> Iterator[pa.Table]:
    """Stream `rows` rows at a time of `base`'s columns with `others`' columns appended.

    Every file must list the same conversations in the same order (conversation_id is checked),
    whatever its row groups; only one piece of each file is in memory at a time.
    """
    first = _Rows(*base, rows)
    readers = [(_Rows(path, columns, rows), columns) for path, columns in others]
    while (part := first.take(rows)) is not None:
        for reader, columns in readers:
            other = reader.take(part.num_rows)
            if other is None or other.num_rows != part.num_rows:
                raise SourceError(
                    f"{reader.path} has fewer rows than {first.path}: re-run the stage that wrote it"
                )
            part = align(part, other, columns, str(reader.path))
        yield part
    for reader, _ in readers:
        if reader.take(1) is not None:
            raise SourceError(
                f"{reader.path} has more rows than {first.path}: re-run the stage that wrote it"
            )


@contextlib.contextmanager
def in_thread(write: Callable[[pa.Table], object], depth: int = 2) -> Iterator[Callable[[pa.Table], None]]:
    """Yield a function that hands tables to `write` in a thread of its own, in order, with at most
    `depth` waiting (the memory of `depth` tables). An error `write` raised comes out of the next
    hand-over or the block's end; the thread has finished every table when the block ends."""
    with ThreadPoolExecutor(1, thread_name_prefix="writer") as pool:
        pending: collections.deque[Future] = collections.deque()

        def hand_over(table: pa.Table) -> None:
            pending.append(pool.submit(write, table))
            while len(pending) > depth or (pending and pending[0].done()):
                pending.popleft().result()

        try:
            yield hand_over
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class RowGroups:
    """Appends tables to a Parquet writer in row groups of exactly `rows` rows (the last one
    shorter), so the file's bytes do not depend on how the caller batched its tables.

    Each row group is written from one contiguous chunk per column: Parquet cuts pages where
    chunks end, so chunks that followed the caller's batches would change the bytes."""

    def __init__(self, writer: pq.ParquetWriter, rows: int) -> None:
        self._writer, self._rows, self._pending = writer, rows, []

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        if sum(t.num_rows for t in self._pending) >= self._rows:
            whole = pa.concat_tables(self._pending)
            cut = whole.num_rows - whole.num_rows % self._rows
            for start in range(0, cut, self._rows):
                self._writer.write_table(whole.slice(start, self._rows).combine_chunks())
            self._pending = [whole.slice(cut)]

    def close(self) -> None:
        """Write the last, shorter row group."""
        rest = pa.concat_tables(self._pending) if self._pending else None
        if rest is not None and rest.num_rows:
            self._writer.write_table(rest.combine_chunks())
        self._pending = []
