"""Deterministic, atomic file I/O: Parquet tables, jsonl.gz records, checksums.

A write that fails (a full disk, a quota) raises WriteError: one line naming the file and the space
left on its filesystem, and the file's previous version stays whole."""

from __future__ import annotations

import collections
import contextlib
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import re
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

from stages.core.config.errors import PipelineError, SourceError

LOG = logging.getLogger(__name__)

CHUNK = 1 << 20
GZIP_LEVEL = 9  # zlib-ng 9: a little smaller than stdlib gzip 9, and parallel; see ReleaseParams.gzip_level
GZIP_LEVELS = range(10)  # zlib-ng: 0 (stored) to 9 (smallest)
GZIP_BLOCK = 1 << 20  # bytes of text per compressed block: the unit of work of one thread
PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": True, "store_schema": True}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # raised only by a write: whoever raised it, the disk is full


class WriteError(PipelineError, OSError):
    """A file could not be written: the message names it and the space left on its filesystem."""


@contextlib.contextmanager
def writing(path: str | os.PathLike, only: tuple[int, ...] | None = None) -> Iterator[None]:
    """Turn an OSError raised in the block, which writes `path`, into a WriteError naming `path` and
    the space left (with `only`, just the errors of those errno values)."""
    try:
        yield
    except OSError as err:
        if isinstance(err, PipelineError) or (only is not None and err.errno not in only):
            raise
        fix = "; free some space and run the stage again" if err.errno in DISK_FULL else ""
        reason = f"{err.strerror or err} ({_free(path)} free on its disk)"
        error = WriteError(f"cannot write {path}: {reason}{fix}")
        error.errno = err.errno
        raise error from _acyclic(err)


def _acyclic(err: BaseException) -> BaseException:
    """`err`, its chain of __context__ cut where it comes back to itself.

    zlib-ng's threaded writer raises its one stored exception again from every later write, flush
    and close, and io.BufferedWriter.close chains the last two: the exception becomes its own
    __context__. contextlib.ExitStack, finding that chain under another pending error, walks it
    forever (100% CPU, no message)."""
    seen, link = {id(err)}, err
    while (context := link.__context__) is not None:
        if id(context) in seen:
            link.__context__ = None
            break
        seen.add(id(context))
        link = context
    return err


def _free(path: str | os.PathLike) -> str:
    """The space left on the filesystem of `path` (of its nearest existing parent), for a message."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = float(shutil.disk_usage(where).free)
    except OSError:
        return "unknown space"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024:
            return f"{free:,.0f} {unit}" if unit == "bytes" else f"{free:,.1f} {unit}"
        free /= 1024
    return f"{free:,.1f} TiB"


def _discard(writer: BinaryIO | pq.ParquetWriter) -> None:
    """Close the writer of a file that is thrown away (its block failed): a second error from it,
    most often the same full disk, adds nothing to the block's, which goes on."""
    try:
        writer.close()
    except OSError as err:
        _acyclic(err)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    The file's data is flushed to disk (fsync) before the rename and the directory entry after
    it, so a crash or power loss leaves either the old file or the whole new one. A full disk in
    the block, or an error of the flush or the rename, is a WriteError naming `path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_litter(path.parent, f".{path.name}.")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        with writing(path, DISK_FULL):
            yield tmp_path
        with writing(path):
            fsync(tmp_path)
            os.replace(tmp_path, path)
            fsync(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


LITTER = re.compile(r"\.(?P<pid>\d+)\.[^/]*\.(?:tmp|partial|old)$")  # what a killed writer leaves


def clean_litter(directory: Path, prefix: str) -> None:
    """Remove what writers killed before they could clean up left in `directory`: the entries named
    `<prefix><pid>.<random>.tmp|partial|old` (see atomic_path, staged_dir, private_tempdir) whose
    process no longer runs. A live process's entries are its own and are left alone."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        found = LITTER.search(entry.name[len(prefix) - 1 :]) if entry.name.startswith(prefix) else None
        if found and not running(int(found["pid"])):
            LOG.info("removing %s, left by a process that was killed (pid %s)", entry, found["pid"])
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def running(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def private_tempdir(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A directory only this user can read (0700) under `parent` (a private data directory, never the
    system's temp dir), for plaintext intermediates; removed on exit, and by the next run's
    `clean_litter` if this process is killed."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_litter(parent, f".{name}.")
    path = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
            _discard(writer)
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


@contextlib.contextmanager
def gzip_writer(path: str | os.PathLike, level: int = GZIP_LEVEL, threads: int = 0) -> Iterator[_Blocks]:
    """Yield a binary stream into a gzip file (mtime 0, no file name) that takes its place only when
    the block succeeds.

    `threads` compress 1 MiB blocks in parallel (0: one per CPU); each block is deflated with the
    previous 32 kB as its dictionary, so the file is one standard gzip member whose bytes depend on
    the text, `level` and the zlib-ng version: not on `threads`, nor on the machine's CPU count, nor
    on how the text was cut into writes."""
    workers = _gzip_threads(path, level, threads)
    with atomic_path(path) as tmp:
        with writing(path):
            raw = gzip_ng_threaded.open(tmp, "wb", level, threads=workers, block_size=GZIP_BLOCK)
        blocks = _Blocks(raw, path)
        try:
            yield blocks
            blocks.flush()
        except BaseException:
            _discard(raw)  # stops its threads
            raise
        with writing(path):
            raw.close()


class _Blocks:
    """Passes text on in whole GZIP_BLOCK pieces. zlib-ng compresses each write (cut at GZIP_BLOCK)
    as a block of its own, and its buffered writer passes large writes through as they come, so
    without this the compressed bytes would depend on the sizes of the writes. An error of zlib-ng's
    writer (its threads write the file) is a WriteError naming `path`."""

    def __init__(self, raw: BinaryIO, path: str | os.PathLike) -> None:
        self._raw, self._path, self._pending = raw, path, bytearray()

    def write(self, data: bytes) -> int:
        self._pending += data
        whole = len(self._pending) - len(self._pending) % GZIP_BLOCK
        if whole:
            with memoryview(self._pending) as view, view[:whole] as blocks, writing(self._path):
                self._raw.write(blocks)
            del self._pending[:whole]
        return len(data)

    def flush(self) -> None:
        """Pass on the last, shorter piece (at the end of the file)."""
        with writing(self._path):
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
    with atomic_path(path) as tmp, writing(path):
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def merge_json(data: dict, path: str | os.PathLike) -> None:
    """`data`'s keys written into the JSON object at `path` (created if missing), atomically."""
    path = Path(path)
    held = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    write_json(held | data, path)


def write_lines(lines: list[str], path: str | os.PathLike) -> None:
    """`lines`, one per line, atomically (an empty list: an empty file)."""
    with atomic_path(path) as tmp, writing(path):
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


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
    """Yield an empty sibling directory that replaces `path` only if the block succeeds.

    Every file in it, however it was written, is flushed to disk before the rename; a full disk in
    the block, or an error of the flush or the rename, is a WriteError naming `path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_litter(path.parent, f".{path.name}.")
        staging = Path(
            tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
        )
    old = staging.with_suffix(".old")
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700
        with writing(path, DISK_FULL):
            yield staging
        with writing(path):
            for entry in [*staging.rglob("*"), staging]:
                if not entry.is_symlink():
                    fsync(entry)
            if path.exists():
                os.replace(path, old)  # the previous version stays whole until the new one is in place
            try:
                os.replace(staging, path)
            except OSError:
                if old.exists():
                    os.replace(old, path)
                raise
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
