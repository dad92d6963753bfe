"""Streaming helpers: aligned reading of inter-stage tables, deterministic writers."""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import random
import threading
import time

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.config.errors import PipelineError
from stages.core.storage.atomic import WriteError, atomic_path, staged_dir, writing
from stages.core.storage.jsonl import (
    GZIP_BLOCK,
    json_lines,
    jsonl_gz_table_writer,
    jsonl_gz_writer,
    read_jsonl_gz,
    write_jsonl_gz,
)
from stages.core.storage.parquet import RowGroups, in_thread, iter_aligned

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


def test_gzip_bytes_do_not_depend_on_how_the_text_is_cut_into_writes(tmp_path, records):
    write_jsonl_gz(records, tmp_path / "records.jsonl.gz", level=1, threads=2)  # one write per record
    table = pa.Table.from_pylist(records)
    for rows in (7, 1000, 3000):  # one write per table: from 60 kB to the whole 4 MB
        with jsonl_gz_table_writer(tmp_path / f"{rows}.jsonl.gz", level=1, threads=2) as write:
            for batch in table.to_batches(rows):
                write(pa.Table.from_batches([batch]))
        assert (tmp_path / f"{rows}.jsonl.gz").read_bytes() == (tmp_path / "records.jsonl.gz").read_bytes()


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
EDGES = [  # what JSON escapes or spells in more than one way
    "", "a\"b\\c", "line\nnext\ttab\r\b\f", "\x00\x01\x1f\x7f\x80\x9f", "\u2028\u2029\ufeff",
    "日本語😀", "</script>",
]  # fmt: skip
FLOATS = [7.0, -1.0, -0.0, 7.5, 1e-7, 5e-324, 0.1 + 0.2, 1e16, 1e22, 123456789012345.0, 1.7e308]


def test_json_lines_are_the_bytes_orjson_writes_for_the_rows():
    rng = random.Random(1)
    strings = EDGES + ["".join(rng.choices([chr(c) for c in range(0x250)] + WORDS, k=30)) for _ in range(300)]
    floats = FLOATS + [rng.uniform(-1, 11) for _ in range(300)] + [rng.uniform(-1e9, 1e9) for _ in range(96)]
    n = len(floats)
    texts = (strings * 2)[:n]
    table = pa.table(
        {
            "text": pa.array(texts),
            "score": pa.array(floats),
            "tokens": pa.array([rng.randint(-(2**63), 2**63 - 1) for _ in range(n)]),
            "flag": pa.array([[True, False, None][i % 3] for i in range(n)]),
            "turns": pa.array(
                [
                    [None, [], [None], [{"role": "assistant", "content": t}]][i % 4]
                    for i, t in enumerate(texts)
                ],
                MESSAGES,
            ),
            "nothing": pa.nulls(n, MESSAGES),
        }
    )
    expected = b"".join(orjson.dumps(row) + b"\n" for row in table.to_pylist())
    assert json_lines(table) == expected
    assert json_lines(pa.concat_tables([table.slice(0, 100), table.slice(100)])) == expected  # chunked
    assert json_lines(table.slice(0, 0)) == b""


def test_row_groups_give_the_same_parquet_bytes_for_any_batching(tmp_path):
    """Parquet cuts pages where chunks end: RowGroups must not let the caller's batches show."""
    rng = random.Random(2)
    table = pa.table({"text": [" ".join(rng.choices(WORDS, k=rng.randint(50, 400))) for _ in range(3000)]})
    files = set()
    for rows in (7, 500, 3000):
        with pq.ParquetWriter(tmp_path / f"{rows}.parquet", table.schema) as writer:
            groups = RowGroups(writer, 2048)
            for batch in table.to_batches(rows):
                groups.write(pa.Table.from_batches([batch]))
            groups.close()
        assert pq.ParquetFile(tmp_path / f"{rows}.parquet").metadata.num_row_groups == 2
        files.add((tmp_path / f"{rows}.parquet").read_bytes())
    assert len(files) == 1


def test_a_writer_thread_takes_tables_in_order_and_passes_its_error_on():
    got: list[int] = []

    def write(table: pa.Table) -> None:
        time.sleep(0.01 * (table["x"][0].as_py() % 2))  # uneven work: the order must still hold
        got.append(table["x"][0].as_py())

    with in_thread(write) as hand_over:
        for i in range(10):
            hand_over(pa.table({"x": [i]}))
    assert got == list(range(10))  # all written, in order, when the block ends

    def broken(table: pa.Table) -> None:
        if table["x"][0].as_py() == 3:
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"), in_thread(broken) as hand_over:
        for i in range(50):
            hand_over(pa.table({"x": [i]}))


def _full_disk() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def test_a_write_error_names_the_file_and_the_space_left(tmp_path):
    path = tmp_path / "a.parquet"
    with pytest.raises(WriteError) as err, writing(path):
        raise _full_disk()
    assert isinstance(err.value, PipelineError) and isinstance(err.value, OSError)
    assert err.value.errno == errno.ENOSPC
    message = str(err.value)
    assert message.startswith(f"cannot write {path}: No space left on device (") and "\n" not in message
    assert " free on its disk); free some space and run the stage again" in message


def test_only_a_full_disk_in_the_block_of_atomic_path_is_called_a_write_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("previous")
    with pytest.raises(FileNotFoundError), atomic_path(path):
        (tmp_path / "missing").read_text()  # an input that is missing is not a write error
    with pytest.raises(WriteError, match=r"cannot write .*a\.json: No space left"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise _full_disk()
    with (
        pytest.raises(WriteError, match=r"cannot write .*release: No space left"),
        staged_dir(tmp_path / "release") as out,
    ):
        (out / "README.md").write_text("half")
        raise _full_disk()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"] and path.read_text() == "previous"


class _Stuck(io.RawIOBase):
    """A file whose every write and close raises the one error it stored, as zlib-ng's threaded
    writer does after a failed write."""

    def __init__(self) -> None:
        self.error = _full_disk()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        raise self.error

    def close(self) -> None:
        super().close()
        raise self.error


def test_an_error_that_is_its_own_context_does_not_hang_an_exit_stack(tmp_path):
    """contextlib.ExitStack walks the __context__ chain of an error raised on exit while another
    is pending: a chain that loops spins forever. `writing` cuts the loop."""
    outcome: list[BaseException] = []

    def close() -> None:
        stream = io.BufferedWriter(_Stuck())
        stream.write(b"x")
        with writing(tmp_path / "a.jsonl.gz"):
            stream.close()  # flush raises the error, close raises it again: chained to itself

    def package() -> None:
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(close)
                raise OSError(errno.EIO, "the Parquet writer failed first")
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=package, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "ExitStack spun on a looping exception chain"
    [err] = outcome
    assert isinstance(err, WriteError) and "a.jsonl.gz" in str(err)


def _dead_pid() -> int:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_litter_of_a_killed_writer_is_removed_by_the_next_run_and_a_live_ones_is_kept(tmp_path):
    from stages.core.storage.atomic import atomic_path, staged_dir

    dead, live = _dead_pid(), os.getpid()
    torn = tmp_path / f".out.parquet.{dead}.x1y2.tmp"
    torn.write_bytes(b"half")
    busy = tmp_path / f".out.parquet.{live}.a1b2.tmp"  # another writer of this process, still at work
    busy.write_bytes(b"busy")
    partial = tmp_path / f".release.{dead}.q9.partial"
    partial.mkdir()
    (partial / "file").write_text("x")
    other = tmp_path / f".other.parquet.{dead}.z.tmp"  # another file's litter: its own writer cleans it
    other.write_bytes(b"")
    with atomic_path(tmp_path / "out.parquet") as tmp:
        tmp.write_bytes(b"new")
    with staged_dir(tmp_path / "release") as out:
        (out / "a").write_text("a")
    assert not torn.exists() and not partial.exists()
    assert busy.exists() and other.exists()
    assert (tmp_path / "out.parquet").read_bytes() == b"new"


def test_plaintext_intermediates_live_in_a_private_dir_removed_on_any_exit(tmp_path):
    from stages.core.storage.atomic import private_tempdir

    stale = tmp_path / f".package-gemma3.{_dead_pid()}.k.tmp"  # a SIGKILLed package's plaintext
    stale.mkdir()
    (stale / "instructions.jsonl.gz").write_bytes(b"plaintext")
    with pytest.raises(RuntimeError), private_tempdir(tmp_path, "package-gemma3") as tmp:
        assert not stale.exists()
        assert tmp.parent == tmp_path and (tmp.stat().st_mode & 0o777) == 0o700
        (tmp / "instructions.jsonl.gz").write_bytes(b"plaintext")
        raise RuntimeError("the stage failed")
    assert list(tmp_path.iterdir()) == []
