"""gzip JSON-lines files (deterministic and compressed in parallel), JSON and text files, each
written atomically, and file checksums."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import orjson
import pyarrow as pa
from zlib_ng import gzip_ng_threaded

from stages.core.config.errors import SourceError
from stages.core.storage.atomic import atomic_path, discard, writing

CHUNK = 1 << 20
GZIP_LEVEL = 9  # zlib-ng 9: a little smaller than stdlib gzip 9, and parallel; see ReleaseParams.gzip_level
GZIP_LEVELS = range(10)  # zlib-ng: 0 (stored) to 9 (smallest)
GZIP_BLOCK = 1 << 20  # bytes of text per compressed block: the unit of work of one thread


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
            discard(raw)  # stops its threads
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
