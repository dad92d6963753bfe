"""Sharded stages resume from finished shards and never mix in stale ones."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stages.core.shards import fingerprint, run_sharded


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
    fn = _double(calls)
    with pytest.raises(RuntimeError, match="killed"):
        run_sharded(table, fn, shard_size=3, checkpoints=tmp_path, stage="t", key="k1")
    assert sorted(p.name for p in (tmp_path / "t" / "k1").glob("*.parquet")) == [
        "00000.parquet",
        "00001.parquet",
    ]
    fn.crash = False
    calls.clear()
    out = run_sharded(table, fn, shard_size=3, checkpoints=tmp_path, stage="t", key="k1")
    assert calls == [2, 3]  # shards 0 and 1 were reused
    assert out["x"].to_pylist() == [2 * i for i in range(10)]


def test_a_new_key_ignores_and_removes_stale_shards(tmp_path):
    table = pa.table({"x": [1, 2, 3]})
    run_sharded(table, lambda p, i: p, shard_size=2, checkpoints=tmp_path, stage="t", key="old")
    out = run_sharded(
        table,
        lambda p, i: pa.table({"x": [0] * p.num_rows}),
        shard_size=2,
        checkpoints=tmp_path,
        stage="t",
        key="new",
    )
    assert out["x"].to_pylist() == [0, 0, 0]
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["new"]


def test_fingerprint_changes_with_any_part():
    assert fingerprint("a", {"t": 0.6}) == fingerprint("a", {"t": 0.6})
    assert fingerprint("a", {"t": 0.6}) != fingerprint("a", {"t": 0.7})
    assert fingerprint("a", {"t": 0.6}) != fingerprint("b", {"t": 0.6})
