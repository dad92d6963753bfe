"""Every string of a public release file with its column path and row, for the content check
(leaks.py): a Parquet file's field names, metadata and values at any depth (lists, structs, maps,
dictionaries, binary), JSON lines' values and keys (a key held twice is an error: a reader would
show one value), and the runs of any file's raw bytes that are text. Reads the file a batch at a
time; writes nothing. A field name that is not an identifier is shown as `<a name>`, never quoted."""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core.config.errors import SourceError

MIN_RUN = 32  # the shortest run of raw bytes read as text: what holds leaks.WINDOW characters
BATCH_ROWS = 1024  # rows of a public file read at a time
RAW_CHUNK, RAW_OVERLAP = 1 << 18, 4096  # raw bytes read at a time, and read again with the next
NAME = re.compile(r"[A-Za-z0-9_+-]{1,64}")  # a field name shown as it is in a column path
RAW = "<raw bytes>"  # the column path of a file's raw bytes
KEYS_REMEMBERED = 1 << 16  # JSON keys checked once a file (a key seen again is not checked again)
LISTS = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list, pa.types.is_list_view)
LISTS += (pa.types.is_large_list_view,)
Strings = Iterator[tuple[list, str, np.ndarray]]  # (texts, their column path, the row of each)


@functools.lru_cache(maxsize=4096)
def _name(name: str) -> str:
    """A field name as a column path shows it: a name that is no identifier may be the leaked text."""
    return name if NAME.fullmatch(name) else "<a name>"


def _arrow_strings(array: pa.Array, path: str, rows: np.ndarray) -> Strings:
    """(strings, column path, their rows) of every string or binary value under `array`."""
    kind = array.type
    if isinstance(array, pa.ExtensionArray):
        yield from _arrow_strings(array.storage, path, rows)
    elif pa.types.is_dictionary(kind):  # every entry, those no row uses too
        yield from _arrow_strings(
            array.dictionary, f"{path} (dictionary)", np.full(len(array.dictionary), -1)
        )
        yield from _arrow_strings(array.dictionary_decode(), path, rows)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        yield array.to_pylist(), path, rows
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        yield [None if b is None else b.decode("utf-8", "replace") for b in array.to_pylist()], path, rows
    elif pa.types.is_map(kind):  # as a list of {key, value} (list_parent_indices aborts on a map)
        entries = pa.list_(pa.struct([("key", kind.key_type), ("value", kind.item_type)]))
        yield from _arrow_strings(array.cast(entries), path, rows)
    elif any(test(kind) for test in LISTS):
        yield from _arrow_strings(
            array.flatten(), f"{path}[]", rows[pc.list_parent_indices(array).to_numpy()]
        )
    elif pa.types.is_struct(kind):
        for child, sub in zip(array.flatten(), kind, strict=True):
            yield from _arrow_strings(child, f"{path}.{_name(sub.name)}", rows)
    elif pa.types.is_union(kind):
        raise SourceError(f"column {path} is a union, which package never writes")


def _schema_strings(schema: pa.Schema, metadata: dict | None) -> Strings:
    """Field names at every depth and the key-value metadata, as strings (row -1)."""
    names, stack = [], list(schema)
    while stack:
        item = stack.pop()
        names += [item.name, *(v.decode("utf-8", "replace") for v in (item.metadata or {}).values())]
        kind = item.type
        stack += list(kind) if pa.types.is_struct(kind) else []
        stack += [kind.value_field] if hasattr(kind, "value_field") else []
        stack += [kind.key_field, kind.item_field] if pa.types.is_map(kind) else []
    yield names, "<field names>", np.full(len(names), -1)
    meta = [
        f"{k.decode('utf-8', 'replace')} {v.decode('utf-8', 'replace')}" for k, v in (metadata or {}).items()
    ]
    yield meta, "<metadata>", np.full(len(meta), -1)


def schema_paths(kind: pa.DataType, path: str) -> Iterator[str]:
    """The column paths under a field of type `kind` at `path`: `a[]` for a list's values, `a.b` for
    a struct's fields, `a[].key` and `a[].value` for a map's."""
    if pa.types.is_map(kind):
        yield from (f"{path}[]", f"{path}[].key", f"{path}[].value")
        yield from schema_paths(kind.item_type, f"{path}[].value")
    elif any(test(kind) for test in LISTS):
        yield f"{path}[]"
        yield from schema_paths(kind.value_type, f"{path}[]")
    elif pa.types.is_struct(kind):
        for sub in kind:
            yield f"{path}.{_name(sub.name)}"
            yield from schema_paths(sub.type, f"{path}.{_name(sub.name)}")


def parquet_strings(path: Path, paths: set[str]) -> Strings:
    """The strings of a Parquet file: names and metadata, then every value, BATCH_ROWS rows at a time,
    adding every column path to `paths`."""
    with pq.ParquetFile(path, pre_buffer=False) as table:  # pre-buffering holds whole row groups
        for column in table.schema_arrow:
            paths.update([_name(column.name), *schema_paths(column.type, _name(column.name))])
        yield from _schema_strings(table.schema_arrow, table.metadata.metadata)
        first = 0
        for batch in table.iter_batches(batch_size=BATCH_ROWS):
            rows = np.arange(first, first + batch.num_rows)
            for name, column in zip(batch.schema.names, batch.columns, strict=True):
                yield from _arrow_strings(column, _name(name), rows)
            first += batch.num_rows


def _object(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object; SourceError on a key held twice (a reader shows one value, the file holds both)."""
    found = dict(pairs)
    if len(found) < len(pairs):
        twice = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise SourceError(f"an object holds key {_name(twice)} twice: a reader would show one value")
    return found


@dataclass
class _Batch:
    """The strings of a batch of JSON records by column path, with their rows; each key once a file."""

    texts: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    rows: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    keys: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)  # the column path of every key

    def add(self, value: object, path: str, row: int) -> None:
        if type(value) is str:
            self.texts[path].append(value)
            self.rows[path].append(row)
        elif type(value) is dict:
            for key, item in value.items():
                if key not in self.keys and len(self.keys) < KEYS_REMEMBERED:
                    self.keys.add(key)
                    self.texts[f"{path}{{}}"].append(key)
                    self.rows[f"{path}{{}}"].append(row)
                child = f"{path}.{_name(key)}" if path else _name(key)
                self.paths.add(child)
                self.add(item, child, row)
        elif type(value) is list:
            for item in value:
                self.add(item, f"{path}[]", row)

    def take(self) -> Strings:
        yield from ((texts, path, np.array(self.rows[path])) for path, texts in self.texts.items())
        self.texts, self.rows = defaultdict(list), defaultdict(list)


def json_lines_strings(lines: Iterable[bytes], paths: set[str]) -> Strings:
    """The strings of JSON lines (keys too, at `path{}`), BATCH_ROWS records at a time, adding the
    column path of every key to `paths`; SourceError at a line that is not JSON or repeats a key."""
    batch = _Batch(paths=paths)
    for row, line in enumerate(lines):
        try:
            batch.add(json.loads(line, object_pairs_hook=_object) if line.strip() else None, "", row)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, SourceError
            raise SourceError(f"row {row} is not JSON as package writes it ({err})") from None
        if row % BATCH_ROWS == BATCH_ROWS - 1:
            yield from batch.take()
    yield from batch.take()


def _text_runs(data: bytes) -> tuple[list[str], np.ndarray]:
    """The runs of at least MIN_RUN bytes of `data` that are printable UTF-8 text, decoded, and the
    offset of each."""
    b = np.frombuffer(data, dtype=np.uint8)
    n = len(b)
    cont = np.concatenate([(b & 0xC0) == 0x80, np.zeros(3, dtype=bool)])
    text = ((b >= 0x20) & (b < 0x7F)) | (b == 0x09) | (b == 0x0A) | (b == 0x0D)
    for low, high, size in ((0xC2, 0xDF, 2), (0xE0, 0xEF, 3), (0xF0, 0xF4, 4)):
        lead = (b >= low) & (b <= high)
        for k in range(1, size):
            lead &= cont[k : n + k]
        for k in range(size):
            text[np.flatnonzero(lead) + k] = True
    edges = np.flatnonzero(np.diff(np.concatenate([[0], text.view(np.int8), [0]])))
    starts, ends = edges[::2], edges[1::2]
    keep = ends - starts >= MIN_RUN
    runs = [data[s:e].decode("utf-8", "replace") for s, e in zip(starts[keep], ends[keep], strict=True)]
    return runs, starts[keep]


def raw_strings(path: Path) -> Strings:
    """The runs of the file's bytes that are text, a chunk at a time, with their byte offsets: what no
    reader shows, such as a gzip header's comment or bytes after the data."""
    with open(path, "rb") as handle:
        offset, tail = 0, b""
        while chunk := handle.read(RAW_CHUNK):
            runs, starts = _text_runs(tail + chunk)
            yield runs, RAW, starts + (offset - len(tail))
            offset, tail = offset + len(chunk), (tail + chunk)[-RAW_OVERLAP:]


def strings(path: Path, paths: set[str]) -> Strings:
    if path.name.endswith(".parquet"):
        yield from parquet_strings(path, paths)
    elif path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rb") as lines:
            yield from json_lines_strings(lines, paths)
    elif path.name.endswith(".json"):
        yield from json_lines_strings([path.read_bytes()], paths)
