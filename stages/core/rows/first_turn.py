"""Filter LMSYS-Chat-1M conversations by row group and keep each one's first user turn.

Rules, in order; a row is counted under the first rule that drops it, so the `dropped_*` counts
sum to rows_in - rows_out: null_id (no conversation_id: null, empty or whitespace only; never kept,
translated or published),
language, redacted, first_message_not_user (the first message is not the user's, or there is none),
then duplicate_id. duplicate_id runs last, over the rows every other rule kept: the first such row
of a conversation_id (files in sorted order, then row order) is kept and any later one dropped, so
a row dropped by language never makes a later row with its id a duplicate. First user turns
longer than filter.long_first_turn_chars are kept and flagged long_first_turn. Moderation-flagged
conversations are kept and counted (`flagged`): translate@ja leaves them out, translate@ja+unsafe
keeps them. Any Parquet error, or a column (or a field of its list items) of another type than
EXPECTED, names the file and the fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core.config.errors import SourceError
from stages.core.config.source_params import FilterSpec
from stages.core.storage.atomic import atomic_path
from stages.core.storage.parquet import PARQUET_OPTIONS

BATCH_ROWS = 16_384  # rows decoded at a time: memory stays flat whatever the shard or row group size
READ_BUFFER = 1 << 20  # pages are read through a buffer: never a whole row group's column chunk at once


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


TEXT = (_is_text, "string")
BOOL = (pa.types.is_boolean, "bool")
# column -> (check, what is expected), or for a list of structs, its items' field -> (check, expected):
# the LMSYS-Chat-1M schema as fetch relies on it (other fields of the items are allowed)
EXPECTED = {
    "conversation_id": TEXT,
    "model": TEXT,
    "conversation": {"content": TEXT, "role": TEXT},
    "turn": (pa.types.is_integer, "integer"),
    "language": TEXT,
    "openai_moderation": {"flagged": BOOL},
    "redacted": BOOL,
}
READ_COLUMNS = list(EXPECTED)
SCHEMA = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("model", pa.string()),
        ("language", pa.string()),
        ("turn", pa.int64()),
        ("redacted", pa.bool_()),
        ("flagged", pa.bool_()),
        ("instruction", pa.string()),  # the first user turn, as in LMSYS-Chat-1M
        ("empty_first_turn", pa.bool_()),  # kept and flagged, never silently dropped
        ("instruction_chars", pa.int64()),  # characters of the first user turn (0 when empty)
        ("long_first_turn", pa.bool_()),  # instruction_chars > filter.long_first_turn_chars: kept
    ]
)
MAX_CHARS = "max_instruction_chars"  # a key of the counts that is a maximum, not a row count


def _any_flagged(moderation: pa.ListArray) -> np.ndarray:
    flags = pc.struct_field(pc.list_flatten(moderation), "flagged").fill_null(False)
    rows = pc.filter(pc.list_parent_indices(moderation), flags).to_numpy()
    out = np.zeros(len(moderation), dtype=bool)
    out[rows] = True
    return out


def _first_message(conversation: pa.ListArray) -> tuple[pa.Array, pa.Array]:
    """Role and content of each conversation's first message (null for an empty conversation)."""
    first = pc.list_slice(conversation, 0, 1)
    flat, parents = pc.list_flatten(first), pc.list_parent_indices(first).to_numpy()
    index = np.full(len(conversation), -1, dtype=np.int64)
    index[parents] = np.arange(len(parents))
    take = pa.array(index, mask=index < 0)
    role = pc.take(pc.struct_field(flat, "role"), take)
    content = pc.take(pc.struct_field(flat, "content"), take)
    return role.cast(pa.string()), content.cast(pa.string())


def _mismatch(name: str, found: pa.DataType, want: tuple | dict) -> str | None:
    """How column `name`'s type `found` differs from `want` (see EXPECTED), or None."""
    if isinstance(want, tuple):
        check, expected = want
        return None if check(found) else f"column {name!r} is {found}, expected {expected}"
    is_list = pa.types.is_list(found) or pa.types.is_large_list(found)
    if not (is_list and pa.types.is_struct(found.value_type)):
        fields = ", ".join(f"{field}: {expected}" for field, (_, expected) in want.items())
        return f"column {name!r} is {found}, expected a list of structs with {fields}"
    item = found.value_type
    for field, (check, expected) in want.items():
        if item.get_field_index(field) < 0:
            return f"column {name!r} is {found}, whose items lack the field {field!r} ({expected})"
        if not check(item.field(field).type):
            return f"field {field!r} of column {name!r} is {item.field(field).type}, expected {expected}"
    return None


def check_schema(schema: pa.Schema, path: Path | str) -> None:
    """Raise SourceError naming the file and column when a column is missing or of another type."""
    fix = "check that fetch.source (uri, include) names LMSYS-Chat-1M files"
    missing = [name for name in EXPECTED if name not in schema.names]
    if missing:
        raise SourceError(f"{path}: missing LMSYS-Chat-1M columns {missing}; {fix}")
    for name, want in EXPECTED.items():
        problem = _mismatch(name, schema.field(name).type, want)
        if problem:
            raise SourceError(f"{path}: {problem}; {fix}")


def _unreadable(name: str, err: Exception) -> SourceError:
    detail = " ".join(str(err).split())  # pyarrow's messages span lines
    return SourceError(
        f"{name}: not a readable Parquet file ({detail}); it is truncated or not Parquet: "
        "re-fetch it (run fetch again, which copies it afresh) or check fetch.source (uri, include)"
    )


def _no_id(ids: pa.Array) -> np.ndarray:
    """Rows without a conversation_id: null, empty or whitespace only (an id that names nothing)."""
    blank = pc.equal(pc.utf8_trim_whitespace(ids), "")
    return pc.fill_null(blank, True).to_numpy(zero_copy_only=False)


def _drop_rules(batch: pa.RecordBatch, spec: FilterSpec, role: pa.Array) -> dict:
    """Rule name -> rows it would drop, in the order rules are applied (duplicate_id comes after)."""
    none = np.zeros(batch.num_rows, dtype=bool)
    language = pc.is_in(batch.column("language"), pa.array(spec.languages))
    redacted = batch.column("redacted").to_numpy(zero_copy_only=False) == True  # noqa: E712
    user_first = pc.fill_null(pc.equal(role, "user"), False)  # null role: no message at all
    return {
        "null_id": _no_id(batch.column("conversation_id")),
        "language": ~language.to_numpy(zero_copy_only=False),
        "redacted": redacted if spec.redacted == "drop" else none,
        "first_message_not_user": ~user_first.to_numpy(zero_copy_only=False),
    }


class SeenIds:
    """The conversation_ids kept so far, as one sorted NumPy array of fixed-width bytes: about
    23 MB for LMSYS-Chat-1M's ~700,000 kept ids of 32 characters, where a Python set of them took
    110 MB, the most of fetch's growth with rows. Each batch's new ids are merged in (np.insert:
    a copy of the array per batch, linear in the ids kept)."""

    END = b"$"  # after each id's UTF-8 bytes: NumPy's bytes type drops trailing NULs, this keeps them

    def __init__(self) -> None:
        self._ids = np.empty(0, dtype="S1")

    def __len__(self) -> int:
        return len(self._ids)

    def drop(self, ids: pa.Array) -> np.ndarray:
        """Which of `ids` (none null: the null_id rule dropped those rows) to drop: those kept
        before, in an earlier batch or earlier in this one; the others are kept from now on."""
        if not len(ids):
            return np.zeros(0, dtype=bool)
        values = np.array([v + self.END for v in ids.cast(pa.binary()).to_pylist()])
        if values.dtype.itemsize > self._ids.dtype.itemsize:
            self._ids = self._ids.astype(values.dtype)
        values = values.astype(self._ids.dtype)
        unique, first = np.unique(values, return_index=True)  # first occurrence in this batch
        at = np.searchsorted(self._ids, unique)
        known = self._ids[np.minimum(at, len(self._ids) - 1)] == unique if len(self._ids) else at < 0
        drop = np.ones(len(values), dtype=bool)
        drop[first[~known]] = False
        self._ids = np.insert(self._ids, at[~known], unique[~known])
        return drop


def _duplicate_ids(ids: pa.Array, keep: np.ndarray, seen: SeenIds) -> np.ndarray:
    """Rows among `keep` whose conversation_id was kept before, in an earlier batch or row of this
    one; `seen` gains the ids kept here."""
    rows = np.flatnonzero(keep)
    drop = np.zeros(len(ids), dtype=bool)
    drop[rows] = seen.drop(ids.take(pa.array(rows)))
    return drop


def _count(table: pa.Table, counts: Counter) -> None:
    counts["rows_out"] += table.num_rows
    for flag in ("flagged", "empty_first_turn", "long_first_turn"):
        counts[flag] += int(pc.sum(table[flag]).as_py() or 0)
    counts[MAX_CHARS] = max(counts[MAX_CHARS], pc.max(table["instruction_chars"]).as_py() or 0)


def filter_batch(batch: pa.RecordBatch, spec: FilterSpec, counts: Counter, seen: SeenIds) -> pa.Table:
    """Apply the filter rules to one batch, counting the rows each rule drops; `seen`: ids kept so far."""
    counts["rows_in"] += batch.num_rows
    flagged = _any_flagged(batch.column("openai_moderation"))
    role, content = _first_message(batch.column("conversation"))
    keep = np.ones(batch.num_rows, dtype=bool)
    for rule, drop in _drop_rules(batch, spec, role).items():  # counted under the first rule
        counts[f"dropped_{rule}"] += int((keep & drop).sum())
        keep &= ~drop
    duplicate = _duplicate_ids(batch.column("conversation_id"), keep, seen)
    counts["dropped_duplicate_id"] += int(duplicate.sum())
    keep &= ~duplicate
    columns = {
        name: batch.column(name) for name in ("conversation_id", "model", "language", "turn", "redacted")
    }
    chars = pc.fill_null(pc.utf8_length(content), 0).cast(pa.int64())
    columns.update(
        flagged=pa.array(flagged),
        instruction=content,
        empty_first_turn=pc.fill_null(pc.equal(pc.utf8_trim_whitespace(content), ""), True),
        instruction_chars=chars,
        long_first_turn=pc.greater(chars, spec.long_first_turn_chars),
    )
    table = pa.table({f.name: columns[f.name].cast(f.type) for f in SCHEMA}, schema=SCHEMA).filter(
        pa.array(keep)
    )
    _count(table, counts)
    return table


def _iter_file(path: Path, name: str, spec: FilterSpec, counts: Counter, seen: SeenIds) -> Iterator[pa.Table]:
    """The filtered rows of one file; a Parquet error while opening or reading it names the file."""
    try:
        parquet = pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(name, err) from err
    with parquet:
        check_schema(parquet.schema_arrow, name)
        batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=READ_COLUMNS)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as err:
                raise _unreadable(name, err) from err
            if batch is None:
                return
            yield filter_batch(batch, spec, counts, seen)


def iter_first_turns(
    files: list[Path], spec: FilterSpec, counts: Counter, names: list[str] | None = None
) -> Iterator[pa.Table]:
    """Stream the filtered first-turn rows of `files`, row group by row group, in bounded batches.

    `names`: how errors name each file (default: its path), e.g. its source uri for a staged copy.
    """
    seen = SeenIds()  # conversation_ids kept so far, across files
    for path, name in zip(files, names or map(str, files), strict=True):
        yield from _iter_file(path, name, spec, counts, seen)


def write_first_turns(
    files: list[Path], spec: FilterSpec, out: Path, names: list[str] | None = None
) -> Counter:
    """Write the filtered first-turn table to `out` atomically; return per-rule row counts
    and, under MAX_CHARS, the longest kept first user turn in characters."""
    counts: Counter = Counter()
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, SCHEMA, **PARQUET_OPTIONS) as writer:
        for table in iter_first_turns(files, spec, counts, names):
            writer.write_table(table)
    return counts
