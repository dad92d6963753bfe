"""Sharded stages resume from finished shards, recompute the ones they cannot trust, and never mix
in stale ones."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.shards import INPUT_DIGEST, run_sharded, slices

SCHEMA = pa.schema([("conversation_id", pa.string()), ("x", pa.int64())])


def _table(values: list[int]) -> pa.Table:
    return pa.table({"conversation_id": [f"c{i}" for i in range(len(values))], "x": values})


def _double(calls: list[int]):
    """Double column x; raise on shard 2 while fn.crash is set, like a killed worker."""

    def fn(part: pa.Table, index: int) -> pa.Table:
        calls.append(index)
        if index == 2 and fn.crash:
            raise RuntimeError("killed")
        return pa.table([part["conversation_id"], pa.compute.multiply(part["x"], 2)], schema=SCHEMA)

    fn.crash = False
    return fn


def _run(table: pa.Table, fn, tmp_path, key: str = "k1") -> int:
    return run_sharded(
        slices(table, 3),
        fn,
        out=tmp_path / "out.parquet",
        schema=SCHEMA,
        checkpoints=tmp_path,
        stage="t",
        key=key,
    )


def test_a_killed_run_resumes_from_finished_shards(tmp_path):
    table, calls = _table(list(range(10))), []
    fn = _double(calls)
    fn.crash = True
    with pytest.raises(RuntimeError, match="killed"):
        _run(table, fn, tmp_path)
    assert sorted(p.name for p in (tmp_path / "t" / "k1").glob("*.parquet")) == [
        "00000.parquet",
        "00001.parquet",
    ]
    assert not (tmp_path / "out.parquet").exists()
    fn.crash = False
    calls.clear()
    assert _run(table, fn, tmp_path) == 10
    assert calls == [2, 3]  # shards 0 and 1 were reused
    assert pq.read_table(tmp_path / "out.parquet")["x"].to_pylist() == [2 * i for i in range(10)]
    assert (
        pq.read_table(tmp_path / "out.parquet").schema.metadata is None
    )  # no checkpoint metadata in the out


def test_a_truncated_shard_is_recomputed_with_a_warning(tmp_path, caplog):
    table, calls = _table(list(range(10))), []
    fn = _double(calls)
    _run(table, fn, tmp_path)
    shard = tmp_path / "t" / "k1" / "00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-40])  # torn by a crash or a full disk
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="stages.core.shards"):
        assert _run(table, fn, tmp_path) == 10
    assert calls == [1]
    assert "t shard 00001: checkpoint" in caplog.text and "cannot be read back" in caplog.text
    assert pq.read_table(tmp_path / "out.parquet")["x"].to_pylist() == [2 * i for i in range(10)]


def test_an_invalid_shard_is_recomputed(tmp_path, caplog):
    table, calls = _table(list(range(10))), []
    fn = _double(calls)
    _run(table, fn, tmp_path)
    shard = tmp_path / "t" / "k1" / "00002.parquet"
    kept = pq.read_table(shard)
    pq.write_table(kept.slice(0, 2), shard)  # readable, same digest, but a row short
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="stages.core.shards"):
        _run(table, fn, tmp_path)
    assert calls == [2] and "2 rows for 3 input rows" in caplog.text


def test_a_changed_input_row_recomputes_only_its_shard(tmp_path):
    calls: list[int] = []
    fn = _double(calls)
    _run(_table(list(range(10))), fn, tmp_path)
    calls.clear()
    changed = list(range(10))
    changed[7] = 70
    _run(_table(changed), fn, tmp_path)
    assert calls == [2]
    assert pq.read_table(tmp_path / "out.parquet")["x"].to_pylist()[7] == 140
    meta = pq.read_schema(tmp_path / "t" / "k1" / "00002.parquet").metadata
    assert INPUT_DIGEST in meta


def test_a_new_key_ignores_and_removes_stale_shards(tmp_path):
    table = _table([1, 2, 3])
    _run(table, lambda p, i: p, tmp_path, key="old")
    zeros = lambda p, i: pa.table([p["conversation_id"], [0] * p.num_rows], schema=SCHEMA)  # noqa: E731
    _run(table, zeros, tmp_path, key="new")
    assert pq.read_table(tmp_path / "out.parquet")["x"].to_pylist() == [0, 0, 0]
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["new"]


def test_a_stage_returning_other_rows_is_a_bug_not_a_checkpoint(tmp_path):
    wrong = lambda p, i: pa.table([p["conversation_id"][::-1], p["x"]], schema=SCHEMA)  # noqa: E731
    with pytest.raises(RuntimeError, match="t shard 00000: the stage returned an invalid shard"):
        _run(_table([1, 2, 3]), wrong, tmp_path)
    assert not (tmp_path / "t" / "k1" / "00000.parquet").exists()
