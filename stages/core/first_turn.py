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

READ_COLUMNS = [
    "conversation_id",
    "model",
    "conversation",
    "turn",
    "language",
    "openai_moderation",
    "redacted",
]
SCHEMA = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("model", pa.string()),
        ("language", pa.string()),
        ("turn", pa.int64()),
        ("redacted", pa.bool_()),
        ("flagged", pa.bool_()),
        ("instruction", pa.string()),  # the first user turn, as in LMSYS-Chat-1M
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
    role = np.full(len(conversation), None, dtype=object)
    content = np.full(len(conversation), None, dtype=object)
    role[parents] = pc.struct_field(flat, "role").to_numpy(zero_copy_only=False)
    content[parents] = pc.struct_field(flat, "content").to_numpy(zero_copy_only=False)
    return pa.array(role, pa.string()), pa.array(content, pa.string())


def filter_batch(group: pa.Table, spec: FilterSpec, counts: Counter) -> pa.Table:
    """Apply the filter rules to one row group, counting the rows each rule drops."""
    batch = pa.RecordBatch.from_arrays(
        [column.combine_chunks() for column in group.columns], names=group.column_names
    )
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
    table = pa.table(
        {
            "conversation_id": batch.column("conversation_id"),
            "model": batch.column("model"),
            "language": batch.column("language"),
            "turn": batch.column("turn"),
            "redacted": batch.column("redacted"),
            "flagged": pa.array(flagged),
            "instruction": content,
        },
        schema=SCHEMA,
    ).filter(pa.array(keep))
    counts["rows_out"] += table.num_rows
    counts["empty_first_turn"] += int(
        pc.sum(pc.equal(pc.utf8_trim_whitespace(table["instruction"]), "")).as_py() or 0
    )
    return table


def iter_first_turns(files: list[Path], spec: FilterSpec, counts: Counter) -> Iterator[pa.Table]:
    """Stream the filtered first-turn rows of `files`, one Parquet row group at a time."""
    for path in files:
        parquet = pq.ParquetFile(path)
        missing = sorted(set(READ_COLUMNS) - set(parquet.schema_arrow.names))
        if missing:
            raise ValueError(f"{path}: missing LMSYS-Chat-1M columns {missing}")
        for group in range(parquet.num_row_groups):
            yield filter_batch(parquet.read_row_group(group, columns=READ_COLUMNS), spec, counts)


def write_first_turns(files: list[Path], spec: FilterSpec, out: Path) -> Counter:
    """Write the filtered first-turn table to `out` atomically; return per-rule row counts."""
    counts: Counter = Counter()
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, SCHEMA, **PARQUET_OPTIONS) as writer:
        for table in iter_first_turns(files, spec, counts):
            writer.write_table(table)
    return counts
