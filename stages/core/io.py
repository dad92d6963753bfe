"""Deterministic, atomic file I/O: Parquet tables, jsonl.gz records, checksums."""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from zlib_ng import gzip_ng_threaded

from stages.core.errors import SourceError

CHUNK = 1 << 20
GZIP_LEVEL = 9  # zlib-ng 9: a little smaller than stdlib gzip 9, and parallel; see ReleaseParams.gzip_level
GZIP_LEVELS = range(10)  # zlib-ng: 0 (stored) to 9 (smallest)
GZIP_BLOCK = 1 << 20  # bytes of text per compressed block: the unit of work of one thread
PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": True, "store_schema": True}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    The file's data is flushed to disk (fsync) before the rename and the directory entry after
    it, so a crash or power loss leaves either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
    try:
        yield tmp_path
        fsync(tmp_path)
        os.replace(tmp_path, path)
        fsync(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a Parquet file atomically; the same table always gives the same bytes."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **PARQUET_OPTIONS)


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


@contextlib.contextmanager
def gzip_writer(path: str | os.PathLike, level: int = GZIP_LEVEL, threads: int = 0) -> Iterator[_Blocks]:
    """Yield a binary stream into a gzip file (mtime 0, no file name) that takes its place only when
    the block succeeds.

    `threads` compress 1 MiB blocks in parallel (0: one per CPU); each block is deflated with the
    previous 32 kB as its dictionary, so the file is one standard gzip member whose bytes depend on
    the text, `level` and the zlib-ng version: not on `threads`, nor on the machine's CPU count, nor
    on how the text was cut into writes."""
    workers = _gzip_threads(path, level, threads)
    with (
        atomic_path(path) as tmp,
        gzip_ng_threaded.open(tmp, "wb", level, threads=workers, block_size=GZIP_BLOCK) as raw,
    ):
        blocks = _Blocks(raw)
        yield blocks
        blocks.flush()


class _Blocks:
    """Passes text on in whole GZIP_BLOCK pieces. zlib-ng compresses each write (cut at GZIP_BLOCK)
    as a block of its own, and its buffered writer passes large writes through as they come, so
    without this the compressed bytes would depend on the sizes of the writes."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw, self._pending = raw, bytearray()

    def write(self, data: bytes) -> int:
        self._pending += data
        whole = len(self._pending) - len(self._pending) % GZIP_BLOCK
        if whole:
            with memoryview(self._pending) as view, view[:whole] as blocks:
                self._raw.write(blocks)
            del self._pending[:whole]
        return len(data)

    def flush(self) -> None:
        """Pass on the last, shorter piece (at the end of the file)."""
        self._raw.write(self._pending)
        self._pending.clear()


@contextlib.contextmanager
def jsonl_gz_writer(
    path: str | os.PathLike, level: int = GZIP_LEVEL, threads: int = 0
) -> Iterator[Callable[[dict], None]]:
    """Yield a function that appends one record to a gzip JSON-lines file (see gzip_writer)."""
    with gzip_writer(path, level, threads) as raw:
        yield lambda record: raw.write(orjson.dumps(record) + b"\n")  # compact UTF-8 JSON, keys in order


@contextlib.contextmanager
def jsonl_gz_table_writer(
    path: str | os.PathLike, level: int = GZIP_LEVEL, threads: int = 0
) -> Iterator[Callable[[pa.Table], None]]:
    """Yield a function that appends the rows of an Arrow table to a gzip JSON-lines file: the
    bytes jsonl_gz_writer writes for `table.to_pylist()`, without a Python object per value."""
    with gzip_writer(path, level, threads) as raw:
        yield lambda table: raw.write(json_lines(table))


def json_lines(table: pa.Table) -> bytes:
    """One compact UTF-8 JSON object per row, columns in order, each line ending in a newline.

    polars' writer gives the bytes of orjson over `table.to_pylist()` (tests/test_io.py checks
    this on generated tables) for about half the CPU: no Python object per value."""
    import polars  # package's JSON writer alone: every other stage skips its 0.2 s import

    buffer = io.BytesIO()
    polars.from_arrow(table, rechunk=False).write_ndjson(buffer)
    return buffer.getvalue()


def _gzip_threads(path: str | os.PathLike, level: int, threads: int) -> int:
    """Check the options; the number of compressing threads, at least 1 even for 0 (all CPUs):
    zlib-ng's threads=0 is its single-stream writer, whose bytes differ."""
    if level not in GZIP_LEVELS:
        raise ValueError(f"{path}: gzip level {level} is not in 0..9")
    if threads < 0:
        raise ValueError(f"{path}: gzip threads {threads} must be 0 (all CPUs) or more")
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_jsonl_gz(
    records: Iterable[dict], path: str | os.PathLike, level: int = GZIP_LEVEL, threads: int = 0
) -> int:
    """Write records as gzip-compressed JSON lines, atomically; return how many."""
    count = 0
    with jsonl_gz_writer(path, level, threads) as write:
        for record in records:
            write(record)
            count += 1
    return count


def read_jsonl_gz(path: str | os.PathLike) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as text:
        for line_no, line in enumerate(text, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise SourceError(f"{path}: line {line_no} is not JSON: {err}") from err


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(data: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def align(base: pa.Table, other: pa.Table, columns: list[str], other_name: str) -> pa.Table:
    """Append `columns` of `other` to `base`; both must list the same conversations in the same order."""
    if not base["conversation_id"].equals(other["conversation_id"]):
        raise SourceError(
            f"{other_name} lists other conversations than its input: re-run the stage that wrote it"
        )
    for column in columns:
        base = base.append_column(column, other[column])
    return base


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700
    old = staging.with_suffix(".old")
    try:
        yield staging
        fsync(staging)
        if path.exists():
            os.replace(path, old)  # the previous version stays whole until the new one is in place
        os.replace(staging, path)
        fsync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


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
