"""Sharded stages resume from finished shards and never mix in stale ones."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.shards import fingerprint, run_sharded, slices


def _double(calls):
    """Double column x; raise on shard 2 while fn.crash is set, like a killed worker."""

    def fn(part: pa.Table, index: int) -> pa.Table:
        calls.append(index)
        if index == 2 and fn.crash:
            raise RuntimeError("killed")
        return pa.table({"x": pa.compute.multiply(part["x"], 2)})

    fn.crash = True
    return fn


def test_a_killed_run_resumes_from_finished_shards(tmp_path):
    table = pa.table({"x": list(range(10))})
    calls: list[int] = []
    fn, out = _double(calls), tmp_path / "out.parquet"
    with pytest.raises(RuntimeError, match="killed"):
        run_sharded(slices(table, 3), fn, out=out, checkpoints=tmp_path, stage="t", key="k1")
    assert sorted(p.name for p in (tmp_path / "t" / "k1").glob("*.parquet")) == [
        "00000.parquet",
        "00001.parquet",
    ]
    assert not out.exists()
    fn.crash = False
    calls.clear()
    assert run_sharded(slices(table, 3), fn, out=out, checkpoints=tmp_path, stage="t", key="k1") == 10
    assert calls == [2, 3]  # shards 0 and 1 were reused
    assert pq.read_table(out)["x"].to_pylist() == [2 * i for i in range(10)]


def test_a_new_key_ignores_and_removes_stale_shards(tmp_path):
    table, out = pa.table({"x": [1, 2, 3]}), tmp_path / "out.parquet"
    run_sharded(slices(table, 2), lambda p, i: p, out=out, checkpoints=tmp_path, stage="t", key="old")
    zeros = lambda p, i: pa.table({"x": [0] * p.num_rows})  # noqa: E731
    run_sharded(slices(table, 2), zeros, out=out, checkpoints=tmp_path, stage="t", key="new")
    assert pq.read_table(out)["x"].to_pylist() == [0, 0, 0]
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["new"]


def test_fingerprint_changes_with_any_part():
    assert fingerprint("a", {"t": 0.6}) == fingerprint("a", {"t": 0.6})
    assert fingerprint("a", {"t": 0.6}) != fingerprint("a", {"t": 0.7})
    assert fingerprint("a", {"t": 0.6}) != fingerprint("b", {"t": 0.6})
