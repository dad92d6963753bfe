"""Streaming helpers: aligned reading of inter-stage tables, deterministic writers."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.io import iter_aligned, read_jsonl_gz, write_jsonl_gz


def _write(path, ids, column, values, row_group_size):
    pq.write_table(pa.table({"conversation_id": ids, column: values}), path, row_group_size=row_group_size)


def test_iter_aligned_joins_files_with_different_row_groups(tmp_path):
    ids = [f"c{i}" for i in range(1000)]
    _write(tmp_path / "a.parquet", ids, "a", list(range(1000)), 333)
    _write(tmp_path / "b.parquet", ids, "b", [i * 2 for i in range(1000)], 100)
    parts = list(iter_aligned((tmp_path / "a.parquet", ["a"]), (tmp_path / "b.parquet", ["b"]), rows=128))
    assert [p.num_rows for p in parts] == [128] * 7 + [104]
    table = pa.concat_tables(parts)
    assert table.column_names == ["conversation_id", "a", "b"]
    assert table["b"].to_pylist() == [2 * a for a in table["a"].to_pylist()]


@pytest.mark.parametrize(("other_ids", "message"), [
    ([f"c{i}" for i in range(999)], "has fewer rows than"),
    ([f"c{i}" for i in range(1001)], "has more rows than"),
    ([f"c{i}" for i in range(1, 1001)], "lists other conversations than its input"),
])  # fmt: skip
def test_iter_aligned_refuses_files_that_do_not_match(tmp_path, other_ids, message):
    _write(tmp_path / "a.parquet", [f"c{i}" for i in range(1000)], "a", list(range(1000)), 500)
    _write(tmp_path / "b.parquet", other_ids, "b", list(range(len(other_ids))), 500)
    with pytest.raises(ValueError, match=message):
        list(iter_aligned((tmp_path / "a.parquet", ["a"]), (tmp_path / "b.parquet", ["b"]), rows=300))


def test_jsonl_gz_is_byte_identical_and_round_trips(tmp_path):
    records = [{"conversation_id": "x", "text": "こんにちは"}, {"conversation_id": "y", "text": None}]
    write_jsonl_gz(records, tmp_path / "a.jsonl.gz")
    write_jsonl_gz(records, tmp_path / "b.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    assert list(read_jsonl_gz(tmp_path / "a.jsonl.gz")) == records
