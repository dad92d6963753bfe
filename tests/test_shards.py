"""Sharded stages resume from finished shards, recompute the ones they cannot trust, and never mix
in stale ones."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.config.errors import PipelineError
from stages.core.runtime.shards import (
    INPUT_DIGEST,
    ROWS_DIGEST,
    CheckpointStore,
    key_dirs,
    main,
    prunable,
    rows_digest,
    run_checkpointed,
    slices,
)

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
    return run_checkpointed(
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
    with caplog.at_level(logging.WARNING, logger="stages.core.runtime.shards"):
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
    short = kept.slice(0, 2).replace_schema_metadata(None)
    meta = {INPUT_DIGEST: kept.schema.metadata[INPUT_DIGEST], ROWS_DIGEST: rows_digest(short)}
    pq.write_table(short.replace_schema_metadata(meta), shard)  # readable, both digests hold, a row short
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="stages.core.runtime.shards"):
        _run(table, fn, tmp_path)
    assert calls == [2] and "2 rows for 3 input rows" in caplog.text


def test_a_checkpoint_rewritten_with_intact_metadata_is_recomputed(tmp_path, caplog):
    table, calls = _table(list(range(10))), []
    fn = _double(calls)
    _run(table, fn, tmp_path)
    shard = tmp_path / "t" / "k1" / "00001.parquet"
    kept = pq.read_table(shard)
    forged = pa.table([kept["conversation_id"], [0, 0, 0]], schema=SCHEMA)
    pq.write_table(forged.replace_schema_metadata(kept.schema.metadata), shard)
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="stages.core.runtime.shards"):
        _run(table, fn, tmp_path)
    assert calls == [1] and "does not match its digest" in caplog.text
    assert pq.read_table(tmp_path / "out.parquet")["x"].to_pylist() == [2 * i for i in range(10)]


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


def test_a_new_key_ignores_stale_shards_and_keeps_them_for_the_run_that_owns_them(tmp_path):
    table = _table([1, 2, 3])
    _run(table, lambda p, i: p, tmp_path, key="old")
    zeros = lambda p, i: pa.table([p["conversation_id"], [0] * p.num_rows], schema=SCHEMA)  # noqa: E731
    _run(table, zeros, tmp_path, key="new")
    assert pq.read_table(tmp_path / "out.parquet")["x"].to_pylist() == [0, 0, 0]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["new", "old", "progress.json"]
    calls: list[int] = []
    assert _run(table, _double(calls), tmp_path, key="old") == 3  # the other run resumes: nothing asked
    assert calls == []


def test_prune_keeps_each_stage_latest_completed_key_and_recent_runs(tmp_path, capsys):
    table = _table([1, 2, 3])
    for key in ("a", "b"):
        _run(table, lambda p, i: p, tmp_path, key=key)
    (tmp_path / "t" / "c").mkdir()  # a run in progress: written to just now, never completed
    (tmp_path / "t" / "c" / "00000.parquet").write_bytes(b"x")
    store = CheckpointStore(tmp_path)
    dirs = {d["key"]: d for d in key_dirs(store)}
    assert dirs["a"]["shards"] == 1 and dirs["c"]["completed"] is None
    dirs["a"]["completed"] -= 10  # a completed before b
    assert [d["key"] for d in prunable(list(dirs.values()), 0, now=dirs["b"]["touched"] + 1)] == ["a", "c"]
    assert [d["key"] for d in prunable(list(dirs.values()), 30, now=dirs["b"]["touched"] + 1)] == []
    main(["prune", str(tmp_path), "--dry-run"])  # the default age (7 days) keeps what was just written
    assert capsys.readouterr().out == ""
    main(["prune", str(tmp_path), "--older-than", "0", "--dry-run"])
    assert (tmp_path / "t" / "a").is_dir() and "would remove" in capsys.readouterr().out
    main(["prune", str(tmp_path), "--older-than", "0"])
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["b", "progress.json"]


def _store_with_old_keys(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    for key in ("a", "b"):
        _run(_table([1, 2, 3]), lambda p, i: p, store, key=key)
    return store


@pytest.mark.parametrize("target", [".", "data", "repo"])
def test_prune_refuses_a_path_that_is_not_a_checkpoint_store(tmp_path, monkeypatch, target, capsys):
    """`prune .` in a repository (or `prune data`) deletes nothing: the store's marker is missing."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "data" / "x" / "y").mkdir(parents=True)
    (repo / "data" / "x" / "y" / "00000.parquet").write_bytes(b"precious")
    monkeypatch.chdir(repo)
    path = {"repo": str(repo)}.get(target, target)
    with pytest.raises(PipelineError, match="is not a checkpoint store"):
        main(["prune", path, "--older-than", "0"])
    assert (repo / ".git").is_dir() and (repo / "data" / "x" / "y" / "00000.parquet").exists()


def test_prune_never_follows_a_symlink_out_of_the_store(tmp_path):
    store = _store_with_old_keys(tmp_path)
    outside = tmp_path / "outside" / "k"
    outside.mkdir(parents=True)
    (outside / "00000.parquet").write_bytes(b"not the store's")
    (store / "linked").symlink_to(tmp_path / "outside")  # a stage directory that is a link
    (store / "t" / "linkkey").symlink_to(outside)  # a key directory that is a link
    main(["prune", str(store), "--older-than", "0"])
    assert (outside / "00000.parquet").read_bytes() == b"not the store's"
    with pytest.raises(PipelineError, match="symbolic link"):
        (tmp_path / "store-link").symlink_to(store)
        main(["prune", str(tmp_path / "store-link"), "--older-than", "0"])


def test_prune_keeps_the_key_of_a_running_run_and_a_directory_with_foreign_files(tmp_path, monkeypatch):
    store = _store_with_old_keys(tmp_path)
    (store / "t" / "c").mkdir()
    (store / "t" / "c" / "00000.parquet").write_bytes(b"x")
    (store / "t" / "d").mkdir()
    (store / "t" / "d" / "notes.txt").write_text("someone's file")
    record = json.loads((store / "t" / "progress.json").read_text())
    record.update(key="c", state="running", pid=os.getpid())  # this process: alive
    (store / "t" / "progress.json").write_text(json.dumps(record))
    main(["prune", str(store), "--older-than", "0"])
    left = sorted(p.name for p in (store / "t").iterdir())
    assert left == ["b", "c", "d", "progress.json"]  # a: old; c: running; d: not a run's


STATUS = pa.schema([("conversation_id", pa.string()), ("status", pa.string()), ("x", pa.int64())])


def _flaky(calls: list[list[str]], failing: set[str]):
    """Answer each row; rows whose id is in `failing` fail (the set may change between runs)."""

    def fn(part: pa.Table, index: int) -> pa.Table:
        ids = part["conversation_id"].to_pylist()
        calls.append(ids)
        status = ["failed" if c in failing else "ok" for c in ids]
        x = [None if c in failing else int(c[1:]) * 10 for c in ids]
        return pa.table([part["conversation_id"], status, x], schema=STATUS)

    return fn


def _run_status(table: pa.Table, fn, tmp_path, tally: Counter | None = None) -> int:
    return run_checkpointed(
        slices(table, 3),
        fn,
        out=tmp_path / "out.parquet",
        schema=STATUS,
        checkpoints=tmp_path,
        stage="t",
        key="k",
        statuses=("status",),
        tally=tally,
    )


def test_a_failed_request_is_asked_again_next_run_and_only_it(tmp_path):
    table = pa.table({"conversation_id": [f"c{i}" for i in range(8)]})
    calls: list[list[str]] = []
    failing = {"c1", "c4", "c5"}
    tally: Counter = Counter()
    _run_status(table, _flaky(calls, failing), tmp_path, tally)
    assert tally == Counter(ok=5, failed=3)
    calls.clear()
    failing.clear()  # the engine is fixed
    tally = Counter()
    assert _run_status(table, _flaky(calls, failing), tmp_path, tally) == 8
    assert calls == [["c1"], ["c4", "c5"]]  # exactly the failed rows, shard by shard
    assert tally == Counter(ok=8)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out["x"].to_pylist() == [i * 10 for i in range(8)]  # equal to an uninterrupted run
    calls.clear()
    _run_status(table, _flaky(calls, failing), tmp_path)
    assert calls == []  # now final: nothing is asked again


def test_a_decided_skip_is_final(tmp_path):
    table = pa.table({"conversation_id": ["c0", "c1"]})

    def fn(part: pa.Table, index: int) -> pa.Table:
        calls.append(index)
        n = part.num_rows
        return pa.table([part["conversation_id"], ["skipped_too_long"] * n, [None] * n], schema=STATUS)

    calls: list[int] = []
    _run_status(table, fn, tmp_path)
    _run_status(table, fn, tmp_path)
    assert calls == [0]


def test_a_stage_returning_other_rows_is_a_bug_not_a_checkpoint(tmp_path):
    wrong = lambda p, i: pa.table([p["conversation_id"][::-1], p["x"]], schema=SCHEMA)  # noqa: E731
    with pytest.raises(RuntimeError, match="t shard 00000: the stage returned an invalid shard"):
        _run(_table([1, 2, 3]), wrong, tmp_path)
    assert not (tmp_path / "t" / "k1" / "00000.parquet").exists()
