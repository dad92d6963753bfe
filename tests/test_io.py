"""Streaming helpers: aligned reading of inter-stage tables, deterministic writers."""

from __future__ import annotations

import gzip
import json
import random
import threading

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.io import GZIP_BLOCK, iter_aligned, jsonl_gz_writer, read_jsonl_gz, write_jsonl_gz

WORDS = ["猫", "東京", "翻訳", "データ", "モデル", "応答", "です。", "ます。", "the", "model", "answers", "a"]


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


@pytest.fixture(scope="module")
def records():
    """About 4 MB of compressible Japanese and English text: several compressed blocks."""
    rng = random.Random(0)
    return [{"conversation_id": f"c{i}", "text": " ".join(rng.choices(WORDS, k=200))} for i in range(3000)]


def test_jsonl_gz_has_the_same_bytes_on_reruns_and_for_any_thread_count(tmp_path, records):
    assert sum(len(json.dumps(r, ensure_ascii=False).encode()) for r in records) > 3 * GZIP_BLOCK
    files = {}
    for run, threads in enumerate([1, 2, 4, 0, 4]):
        write_jsonl_gz(records, tmp_path / f"{run}.jsonl.gz", level=6, threads=threads)
        files[run, threads] = (tmp_path / f"{run}.jsonl.gz").read_bytes()
    assert len(set(files.values())) == 1, {key: len(data) for key, data in files.items()}


def test_jsonl_gz_reads_back_line_for_line_with_the_stdlib(tmp_path, records):
    assert write_jsonl_gz(records, tmp_path / "a.jsonl.gz", threads=3) == len(records)
    with gzip.open(tmp_path / "a.jsonl.gz", "rt", encoding="utf-8") as text:
        lines = text.read().split("\n")
    assert lines == [orjson.dumps(r).decode() for r in records] + [""]


def test_jsonl_gz_honours_the_level(tmp_path, records):
    sizes = {}
    for level in (0, 1, 6, 9):
        write_jsonl_gz(records, tmp_path / f"{level}.jsonl.gz", level=level, threads=2)
        sizes[level] = (tmp_path / f"{level}.jsonl.gz").stat().st_size
    assert sizes[0] > sizes[1] > sizes[9] and sizes[6] >= sizes[9], sizes


def test_jsonl_gz_header_has_no_mtime_and_no_file_name(tmp_path):
    write_jsonl_gz([{"text": "こんにちは"}], tmp_path / "a.jsonl.gz", threads=2)
    header = (tmp_path / "a.jsonl.gz").read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"  # gzip, deflate
    assert header[3] == 0  # flags: no FNAME, FCOMMENT, FEXTRA
    assert header[4:8] == b"\0\0\0\0"  # mtime 0


@pytest.mark.parametrize(("options", "message"), [
    ({"level": 10}, "gzip level 10 is not in 0..9"),
    ({"level": -1}, "gzip level -1 is not in 0..9"),
    ({"threads": -1}, "gzip threads -1 must be 0"),
])  # fmt: skip
def test_jsonl_gz_refuses_bad_options_naming_the_file(tmp_path, options, message):
    with pytest.raises(ValueError, match=message) as err:
        write_jsonl_gz([{"a": 1}], tmp_path / "a.jsonl.gz", **options)
    assert "a.jsonl.gz" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_jsonl_gz_writer_leaves_nothing_and_no_threads_when_the_block_fails(tmp_path):
    before, path = threading.active_count(), tmp_path / "a.jsonl.gz"
    with pytest.raises(RuntimeError, match="stop"), jsonl_gz_writer(path, threads=4) as write:
        write({"a": 1})
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    assert threading.active_count() == before
