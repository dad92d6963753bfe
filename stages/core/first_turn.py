"""Filter LMSYS-Chat-1M conversations by row group and keep each one's first user turn."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core.io import PARQUET_OPTIONS, atomic_path
from stages.core.params import FilterSpec

BATCH_ROWS = 16_384  # rows decoded at a time: memory stays flat whatever the shard or row group size


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list_of(t: pa.DataType, fields: set[str]) -> bool:
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
    return is_list and pa.types.is_struct(t.value_type) and fields <= {f.name for f in t.value_type}


# column -> (check, what is expected): the LMSYS-Chat-1M schema as fetch relies on it
EXPECTED = {
    "conversation_id": (_is_text, "string"),
    "model": (_is_text, "string"),
    "conversation": (lambda t: _is_list_of(t, {"content", "role"}), "list<struct<content, role>>"),
    "turn": (pa.types.is_integer, "integer"),
    "language": (_is_text, "string"),
    "openai_moderation": (lambda t: _is_list_of(t, {"flagged"}), "list<struct<..., flagged>>"),
    "redacted": (pa.types.is_boolean, "bool"),
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
    ]
)


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


def check_schema(schema: pa.Schema, path: Path) -> None:
    """Raise naming the file and column when a column is missing or of another type."""
    missing = [name for name in EXPECTED if name not in schema.names]
    if missing:
        raise ValueError(f"{path}: missing LMSYS-Chat-1M columns {missing}")
    for name, (check, expected) in EXPECTED.items():
        if not check(schema.field(name).type):
            raise ValueError(f"{path}: column {name!r} is {schema.field(name).type}, expected {expected}")


def filter_batch(batch: pa.RecordBatch, spec: FilterSpec, counts: Counter) -> pa.Table:
    """Apply the filter rules to one batch, counting the rows each rule drops."""
    counts["rows_in"] += batch.num_rows
    flagged = _any_flagged(batch.column("openai_moderation"))
    role, content = _first_message(batch.column("conversation"))
    rules = {
        "language": ~pc.is_in(batch.column("language"), pa.array(spec.languages)).to_numpy(
            zero_copy_only=False
        ),
        "moderation": flagged if spec.moderation == "drop" else np.zeros(batch.num_rows, bool),
        "redacted": (batch.column("redacted").to_numpy(zero_copy_only=False) == True)  # noqa: E712
        if spec.redacted == "drop"
        else np.zeros(batch.num_rows, bool),
        "no_user_turn": ~pc.fill_null(pc.equal(role, "user"), False).to_numpy(zero_copy_only=False),
    }
    keep = np.ones(batch.num_rows, dtype=bool)
    for rule, drop in rules.items():  # a row is counted under the first rule that drops it
        counts[f"dropped_{rule}"] += int((keep & drop).sum())
        keep &= ~drop
    columns = {
        name: batch.column(name) for name in ("conversation_id", "model", "language", "turn", "redacted")
    }
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(content), ""), True)
    columns.update(flagged=pa.array(flagged), instruction=content, empty_first_turn=empty)
    table = pa.table({f.name: columns[f.name].cast(f.type) for f in SCHEMA}, schema=SCHEMA).filter(
        pa.array(keep)
    )
    counts["rows_out"] += table.num_rows
    counts["empty_first_turn"] += int(pc.sum(table["empty_first_turn"]).as_py() or 0)
    return table


def iter_first_turns(files: list[Path], spec: FilterSpec, counts: Counter) -> Iterator[pa.Table]:
    """Stream the filtered first-turn rows of `files`, row group by row group, in bounded batches."""
    for path in files:
        with pq.ParquetFile(path) as parquet:
            check_schema(parquet.schema_arrow, path)
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=READ_COLUMNS):
                yield filter_batch(batch, spec, counts)


def write_first_turns(files: list[Path], spec: FilterSpec, out: Path) -> Counter:
    """Write the filtered first-turn table to `out` atomically; return per-rule row counts."""
    counts: Counter = Counter()
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, SCHEMA, **PARQUET_OPTIONS) as writer:
        for table in iter_first_turns(files, spec, counts):
            writer.write_table(table)
    return counts
