"""Progress records and the run status: what a team watching a week-long `dvc repro` reads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from stages.core.runtime.progress import ProgressRecord, rate, time_left
from stages.core.runtime.shards import run_checkpointed, slices
from stages.core.runtime.status import dag_state, render, summarize

SCHEMA = pa.schema([("conversation_id", pa.string()), ("status", pa.string())])


def _table(n: int) -> pa.Table:
    return pa.table({"conversation_id": [f"c{i:03d}" for i in range(n)]})


def _answer(statuses: list[str]):
    def fn(shard: pa.Table, index: int) -> pa.Table:
        return pa.table([shard["conversation_id"], [statuses[index]] * shard.num_rows], schema=SCHEMA)

    return fn


def _record(tmp_path: Path, stage: str = "generate@v") -> dict:
    return json.loads((tmp_path / "ckpt" / stage / "progress.json").read_text(encoding="utf-8"))


def _run(tmp_path: Path, fn, rows: int = 6, stage: str = "generate@v", **kwargs) -> dict:
    """run_checkpointed over `rows` rows in shards of 2; the progress record it leaves."""
    run_checkpointed(
        slices(_table(rows), 2),
        fn,
        out=tmp_path / f"{stage}.parquet",
        schema=SCHEMA,
        checkpoints=tmp_path / "ckpt",
        stage=stage,
        key="k",
        **kwargs,
    )
    return _record(tmp_path, stage)


def test_a_finished_run_leaves_a_done_record_with_its_shards_statuses_and_counters(tmp_path):
    counters = {"requests": 12, "from_cache": 3, "sent": 9, "completion_tokens": 900}
    record = _run(
        tmp_path, _answer(["ok", "failed", "ok"]), total=3, statuses=("status",), counters=lambda: counters
    )
    assert (record["state"], record["shards_total"], record["shards_done"], record["rows_done"]) == (
        "done",
        3,
        3,
        6,
    )
    assert record["statuses"] == {"ok": 4, "failed": 2}
    assert record["requests"] == counters and record["pid"] == os.getpid()
    # a second run reuses two shards and asks the failed rows again: the record says so
    record = _run(tmp_path, _answer(["ok", "ok", "ok"]), total=3, statuses=("status",))
    assert (record["shards_reused"], record["shards_redone"], record["statuses"]) == (2, 1, {"ok": 6})


def test_a_run_that_fails_or_is_interrupted_says_so_with_its_error(tmp_path):
    def boom(shard, index):
        if index == 1:
            raise RuntimeError("the server went away")
        return _answer(["ok"] * 3)(shard, index)

    with pytest.raises(RuntimeError):
        _run(tmp_path, boom, total=3)
    record = _record(tmp_path)
    assert (record["state"], record["shards_done"]) == ("failed", 1)
    assert record["error"] == "RuntimeError: the server went away"

    def interrupted(shard, index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, interrupted, rows=2, stage="score@v")
    assert _record(tmp_path, "score@v")["state"] == "interrupted"


def test_the_heartbeat_rewrites_the_record_while_a_shard_computes():
    written: list[dict] = []
    ticks = iter(range(100))
    record = ProgressRecord(
        "generate@v",
        "k",
        4,
        lambda data: written.append(json.loads(data)),
        counters=lambda: {"completion_tokens": 100 * next(ticks)},
        heartbeat=0.05,
    )
    with record:
        time.sleep(0.4)
    assert len(written) >= 5  # the start, several beats, the end
    tokens = [w["requests"]["completion_tokens"] for w in written]
    assert tokens == sorted(tokens) and tokens[-1] > 0
    assert written[-1]["state"] == "done" and len(written[-1]["samples"]) == len(written)


def test_tokens_per_second_and_time_left_come_from_the_recent_samples():
    now = 10_000.0
    samples = [
        [now - 1200, {"completion_tokens": 0}],  # older than the window: not counted
        [now - 600, {"completion_tokens": 60_000}],
        [now - 300, {"completion_tokens": 90_000}],
        [now, {"completion_tokens": 120_000}],
    ]
    assert rate(samples, "completion_tokens", now) == pytest.approx(100.0)
    # 10 of 40 shards done, 2 of them reused: 8 computed in 800 s, 30 left at 100 s each
    data = {"shards_total": 40, "shards_done": 10, "shards_reused": 2, "computed_seconds": 800.0}
    assert time_left(data) == pytest.approx(3000.0)
    assert time_left({**data, "shards_total": None}) is None


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_record_left_running_by_a_dead_process_reads_as_stopped():
    base = {
        "stage": "generate@v",
        "host": socket.gethostname(),
        "state": "running",
        "updated": time.time(),
        "shards_total": 4,
        "shards_done": 1,
        "shards_reused": 0,
        "computed_seconds": 60.0,
        "requests": {"requests": 30, "from_cache": 10},
        "samples": [],
    }
    assert summarize({**base, "pid": os.getpid()}, time.time())["state"] == "running"
    summary = summarize({**base, "pid": _dead_pid()}, time.time())
    assert (summary["state"], summary["seconds_left"]) == ("stopped", None)
    other_host = {**base, "host": "elsewhere", "pid": 1, "updated": time.time() - 3600}
    assert summarize(other_host, time.time())["state"] == "stopped"  # no rewrite for an hour


def test_stage_states_from_dvc_status_locks_and_records(tmp_path):
    shards = tmp_path / "ckpt"
    for label, state, pid in (
        ("generate@a", "running", os.getpid()),
        ("score@b", "failed", os.getpid()),
        ("second-turn@c", "running", _dead_pid()),
    ):
        (shards / label).mkdir(parents=True)
        record = {
            "stage": label,
            "host": socket.gethostname(),
            "pid": pid,
            "state": state,
            "updated": time.time(),
            "shards_total": 10,
            "shards_done": 4,
            "shards_reused": 1,
            "rows_done": 400,
            "computed_seconds": 30.0,
            "statuses": {"ok": 390, "failed": 10},
            "requests": {"requests": 300, "from_cache": 75},
            "samples": [],
            **(
                {"error": "PipelineError: score@b: 10 of 400 requests did not finish"}
                if state == "failed"
                else {}
            ),
        }
        (shards / label / "progress.json").write_text(json.dumps(record), encoding="utf-8")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/fetched").write_text("x")
    stages = [
        ("fetch", ["data/fetched"]),
        ("generate@a", ["data/gen-a"]),
        ("score@b", ["data/score-b"]),
        ("score@c", ["data/score-c"]),
        ("package@a", ["data/release-a"]),
        ("compare@a", ["data/fetched"]),
    ]
    changed = {
        "score@b": [{"changed deps": {"data/gen-b": "modified"}}],
        "score@c": [{"changed outs": {"data/score-c": "deleted"}}],
        "package@a": [{"changed outs": {"data/release-a": "deleted"}}],
        "compare@a": [{"changed params": {"params.yaml": {"compare": "modified"}}}],
    }
    states = {s.name: s for s in dag_state(stages, changed, str(shards), tmp_path)}
    assert {n: s.state for n, s in states.items()} == {
        "fetch": "done",
        "generate@a": "running",
        "score@b": "failed",
        "score@c": "stopped",
        "package@a": "not started",
        "compare@a": "stale",
    }
    assert states["score@b"].why == "PipelineError: score@b: 10 of 400 requests did not finish"
    assert states["compare@a"].why == "changed params: params.yaml"
    running = states["generate@a"].passes[0]
    assert (running["shards_left"], running["requests_left"], running["cache_hit_rate"]) == (6, 600, 0.25)
    assert running["seconds_left"] == pytest.approx(60.0)  # 6 left at 30 s / 3 computed shards
    screen = render(list(states.values()))
    assert "generate@a               running" in screen
    assert "shards 4/10 (reused 1)  requests 300 done, ~600 left" in screen
    assert "cache hits 25%  left 1m 00s" in screen and "statuses: failed 10, ok 390" in screen


def test_counters_count_cache_hits_tokens_and_engine_time(fake_engine, tmp_path):
    from stages.core.config.engine_params import Sampling
    from stages.core.rows.requests import ChatRequest
    from stages.core.storage.cache import ResponseCache

    fake_engine.cache = ResponseCache(tmp_path / "cache.sqlite", "read-write")
    requests = [ChatRequest([{"role": "user", "content": f"q{i}"}], n=2, seed=i) for i in range(3)]
    fake_engine.chat(requests, Sampling(temperature=0.0, max_tokens=16))
    fake_engine.chat(requests, Sampling(temperature=0.0, max_tokens=16))  # all from the cache now
    counts = fake_engine.request_counts()
    assert Counter({k: counts[k] for k in ("requests", "from_cache", "sent")}) == Counter(
        requests=6, from_cache=3, sent=3
    )
    assert counts["completion_tokens"] > 0 and counts["prompt_tokens"] > 0 and counts["engine_seconds"] >= 0
    assert (counts["cache_hits"], counts["cache_misses"]) == (3, 3)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[]", "a progress record is a JSON object, found list"),
        ('{"stage": "generate@a", "state": "running", "pid": "x", "shards_done": 1, "rows_done": 1}', "pid"),
        (
            '{"stage": "generate@a", "state": "running", "pid": 1, "shards_done": null, "rows_done": 1}',
            "shards_done",
        ),
        ("{not json", "is not JSON"),
    ],
)
def test_a_damaged_progress_record_is_that_stage_s_problem_and_the_rest_reads_as_usual(
    tmp_path, content, problem
):
    shards = tmp_path / "ckpt"
    (shards / "generate@a").mkdir(parents=True)
    (shards / "generate@a" / "progress.json").write_text(content, encoding="utf-8")
    _run(tmp_path, _answer(["ok", "ok", "ok"]), stage="generate@b", total=3, statuses=("status",))
    stages = [("generate@a", ["data/gen-a"]), ("generate@b", ["data/gen-b"])]
    changed = {"generate@a": [{"changed outs": {"data/gen-a": "deleted"}}]}
    states = {s.name: s for s in dag_state(stages, changed, str(shards), tmp_path)}
    assert states["generate@a"].state == "damaged" and problem in states["generate@a"].why
    assert states["generate@b"].state == "done" and states["generate@b"].passes[0]["shards_done"] == 3
    screen = render(list(states.values()))
    assert "generate@a               damaged" in screen and "shards 3/3" in screen


def test_dvc_s_write_locks_match_with_the_absolute_paths_dvc_records(tmp_path):
    from stages.core.runtime.status import written_outs

    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    lock = {"write": {str(tmp_path / "data" / "raw"): {"pid": os.getpid(), "cmd": "dvc repro fetch"}}}
    (tmp_path / ".dvc" / "tmp" / "rwlock").write_text(json.dumps(lock), encoding="utf-8")
    assert written_outs(tmp_path) == {"data/raw"}
    states = dag_state(
        [("fetch", ["data/raw"])], {"fetch": ["changed outs"]}, str(tmp_path / "ckpt"), tmp_path
    )
    assert states[0].state == "running"
