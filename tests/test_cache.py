"""The response cache: a changed run sends only its new requests, a killed writer leaves no torn
entry, a damaged entry or file never stops or poisons a run, and a release built through the cache
equals one built without it."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.config.engine_params import EngineParams, Sampling
from stages.core.config.errors import PipelineError
from stages.core.engines import FAILED, OK, TOO_LONG, ChatRequest, Completion
from stages.core.rows.responses import request_seed
from stages.core.runtime.executors import LocalExecutor
from stages.core.storage.cache import (
    COMPLETION_FIELDS,
    OPTIONAL_FIELDS,
    ResponseCache,
    main,
    merge,
    prune,
    request_key,
    valid_value,
)
from tests.conftest import ROOT, FakeEngine, run_stage, set_params

SAMPLING = Sampling(temperature=0.6, max_tokens=16)
RELEASE = "data/release/gemma3/gemma3-lmsys-chat-1m-synth-ja+en"


def _ask(engine: FakeEngine, *texts: str, n: int = 2) -> list:
    requests = [ChatRequest([{"role": "user", "content": t}], n=n, seed=len(t)) for t in texts]
    return engine.chat(requests, SAMPLING)


def _open_and_store(path: Path, start: float, index: int) -> str | None:
    """In a process of its own: open the cache when `start` comes, store one entry; the error if any."""
    while time.time() < start:
        pass
    try:
        cache = ResponseCache(path)
        value = [{"text": f"t{index}", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}]
        cache.put_many([(f"k{index}".encode(), value)])
        cache.close()
    except Exception as err:  # the test reports what each process met
        return repr(err)
    return None


def test_processes_opening_one_new_cache_at_once_all_get_it(tmp_path):
    """Ray replicas on one host open the same new cache file together: SQLite answers "database is
    locked" at once to one that sets up WAL while another does. Every opener must wait and succeed."""
    context = multiprocessing.get_context("fork")
    with context.Pool(8) as pool:
        for round_ in range(30):
            path, start = tmp_path / f"{round_}" / "c.sqlite", time.time() + 0.1
            errors = pool.starmap(_open_and_store, [(path, start, i) for i in range(8)])
            assert [e for e in errors if e] == [], f"round {round_}"
            found = ResponseCache(path, "read").get_many([f"k{i}".encode() for i in range(8)])
            assert sorted(v[0]["text"] for v in found.values()) == [f"t{i}" for i in range(8)]


def test_a_cached_request_is_answered_without_the_model(tmp_path):
    first = FakeEngine()
    first.cache = ResponseCache(tmp_path / "c.sqlite")
    replies = _ask(first, "a", "b")
    second = FakeEngine()
    second.cache = ResponseCache(tmp_path / "c.sqlite")
    again = _ask(second, "a", "b", "c")
    assert again[:2] == replies  # texts, finish reasons and token counts, as the engine gave them
    assert [r.messages[0]["content"] for r in second.requests] == ["c"] and second.loads == 1
    third = FakeEngine()
    third.cache = ResponseCache(tmp_path / "c.sqlite")
    _ask(third, "c", "a")
    assert (third.requests, third.loads) == ([], 0)  # all cached: the model is never loaded
    assert third.cache.counts() == {"cache_hits": 2, "cache_misses": 0, "cache_stored": 0, "cache_damaged": 0}


def test_the_key_covers_what_determines_a_response(tmp_path):
    base = request_key(b"e", [{"role": "user", "content": "q"}], {"temperature": 0.6}, 2, 1)
    assert base == request_key(b"e", [{"role": "user", "content": "q"}], {"temperature": 0.6}, 2, 1)
    others = [
        request_key(b"f", [{"role": "user", "content": "q"}], {"temperature": 0.6}, 2, 1),
        request_key(b"e", [{"role": "user", "content": "r"}], {"temperature": 0.6}, 2, 1),
        request_key(b"e", [{"role": "user", "content": "q"}], {"temperature": 0.7}, 2, 1),
        request_key(b"e", [{"role": "user", "content": "q"}], {"temperature": 0.6}, 3, 1),
        request_key(b"e", [{"role": "user", "content": "q"}], {"temperature": 0.6}, 2, 2),
    ]
    assert base not in others and len(set(others)) == len(others)
    engine, other_revision = FakeEngine(), FakeEngine()
    other_revision.llm = other_revision.llm.model_copy(update={"revision": "b" * 40})
    assert engine.cache_identity() != other_revision.cache_identity()
    tp = FakeEngine()  # a runtime knob is not part of the model's identity
    tp.llm = tp.llm.model_copy(update={"tensor_parallel_size": 8})
    assert engine.cache_identity() == tp.cache_identity()


def test_failed_requests_are_asked_again_too_long_ones_are_not_and_modes_are_honoured(tmp_path):
    path = tmp_path / "c.sqlite"
    engine = FakeEngine(refuse=("BAD",))
    engine.cache = ResponseCache(path)
    replies = _ask(engine, "fine", "BAD one", "x" * 40_000)
    assert [r.status for r in replies] == [OK, FAILED, TOO_LONG]
    assert replies[2].detail == "10004 prompt tokens > 4096 - 16"
    assert engine.cache.counts()["cache_stored"] == 2  # the answer and the too-long verdict
    again = FakeEngine()
    again.cache = ResponseCache(path)
    assert _ask(again, "fine", "x" * 40_000) == [replies[0], replies[2]]
    assert (again.requests, again.loads) == ([], 0)  # a re-run loads no model to find it too long again
    retried = FakeEngine()
    retried.cache = ResponseCache(path)
    assert [r.status for r in _ask(retried, "BAD one")] == [OK]  # a failure is asked again
    assert retried.loads == 1
    shorter = FakeEngine()  # a longer context is another key: the prompt is sent
    shorter.llm = shorter.llm.model_copy(update={"max_model_len": 16_384})
    shorter.cache = ResponseCache(path)
    assert [r.status for r in _ask(shorter, "x" * 40_000)] == [OK]
    reader = FakeEngine()
    reader.cache = ResponseCache(path, "read")
    _ask(reader, "fine", "new")
    assert reader.cache.counts() == {
        "cache_hits": 1,
        "cache_misses": 1,
        "cache_stored": 0,
        "cache_damaged": 0,
    }
    off = FakeEngine()
    off.cache = ResponseCache(path, "off")
    _ask(off, "fine")
    assert len(off.requests) == 1
    with pytest.raises(PipelineError, match=r"engine\.cache='sometimes'"):
        ResponseCache(path, "sometimes")


def _poison(path: Path, value: bytes, digest: bytes | None = None) -> None:
    """Overwrite every entry of the cache file `path` with `value` (and its digest, unless given)."""
    db = sqlite3.connect(path)
    digest = hashlib.sha256(value).digest() if digest is None else digest
    db.execute("UPDATE responses SET value = ?, digest = ?", (value, digest))
    db.commit()
    db.close()


DAMAGED = [  # (value, digest): what a bad disk, a bad copy or an old bug can leave
    (b'[{"text": "forged"}]', b"\0" * 32),  # a value that does not match its digest
    (b"not json {", None),  # a valid digest of a value that is not JSON
    (b'[{"text": "forged"}]', None),  # JSON, but not a completion
    (b'{"text": "forged"}', None),  # a dict without a status
    (b"[]", None),  # no completions
    (b'"forged"', None),
]


@pytest.mark.parametrize(("value", "digest"), DAMAGED)
def test_a_damaged_entry_is_a_miss_asked_again_and_replaced(tmp_path, caplog, value, digest):
    path = tmp_path / "c.sqlite"
    engine = FakeEngine()
    engine.cache = ResponseCache(path)
    [first] = _ask(engine, "q")
    engine.cache.close()
    _poison(path, value, digest)
    again = FakeEngine()
    again.cache = ResponseCache(path)
    with caplog.at_level(logging.WARNING, logger="stages.core.storage.cache"):
        assert _ask(again, "q") == [first]  # asked again: the right answer, not the stored one
        again.cache.close()
        again.cache.close()
    assert len(again.requests) == 1
    assert again.cache.counts() == {"cache_hits": 0, "cache_misses": 1, "cache_stored": 1, "cache_damaged": 1}
    [warning] = [r.getMessage() for r in caplog.records]  # once per run, with the count
    assert str(path) in warning and "1 damaged entries" in warning and "replaced" in warning
    third = FakeEngine()
    third.cache = ResponseCache(path)
    assert _ask(third, "q") == [first] and third.requests == []  # the entry was replaced


def test_valid_value_knows_the_shape_of_every_stored_value():
    completion = dataclasses.asdict(Completion("a", "stop", 3, 4))
    assert {f.name for f in dataclasses.fields(Completion)} == COMPLETION_FIELDS.keys() | OPTIONAL_FIELDS
    assert valid_value([completion, {**completion, "logprobs": [["a", {"a": -0.1}]]}])
    assert valid_value({"status": TOO_LONG, "detail": "10004 prompt tokens > 4096 - 16"})
    assert valid_value(["翻訳", 12])  # a DeepL translation and its billed characters
    for bad in (
        [],
        [completion, {}],
        [{**completion, "extra": 1}],
        [{**completion, "prompt_tokens": "3"}],
        [{**completion, "completion_tokens": True}],
        {"status": TOO_LONG},
        {"detail": None},
        ["翻訳", "12"],
        "text",
        None,
    ):
        assert not valid_value(bad), bad


def test_a_cache_file_that_cannot_be_opened_stops_before_any_request(tmp_path, fake_engine):
    path = tmp_path / "c.sqlite"
    engine = FakeEngine()
    engine.cache = ResponseCache(path)
    _ask(engine, "q")
    engine.cache.close()
    with path.open("r+b") as handle:
        handle.write(b"\0" * 16)  # a damaged header
    options = EngineParams(backend="transformers", batch_size=8)
    with pytest.raises(PipelineError, match="file is not a database") as err:
        LocalExecutor(fake_engine.llm, options, cache=path)  # a stage's first step
    assert str(path) in str(err.value) and "engine.cache=off" in str(err.value)
    assert (fake_engine.requests, fake_engine.loads) == ([], 0)
    off = LocalExecutor(fake_engine.llm, options.model_copy(update={"cache": "off"}), cache=path)
    off.close()  # the way round it


def test_a_full_disk_under_the_cache_turns_writes_off_and_the_run_goes_on(tmp_path, caplog):
    path = tmp_path / "c.sqlite"
    engine = FakeEngine()
    engine.cache = ResponseCache(path)
    db = engine.cache._connect()
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")  # full
    with caplog.at_level(logging.WARNING, logger="stages.core.storage.cache"):
        replies = _ask(engine, *(f"question {i} " + "x" * 4000 for i in range(20)))
        more = _ask(engine, "another")
    assert [r.status for r in replies + more] == [OK] * 21  # the answers, for the stage's outs
    assert engine.cache.counts()["cache_stored"] == 0
    [warning] = [r.getMessage() for r in caplog.records]  # once, not on every later store
    assert str(path) in warning and "database or disk is full" in warning


WRITER = """
import sys
from stages.core.storage.cache import ResponseCache
cache = ResponseCache(sys.argv[1])
value = [{"text": "x" * 2000, "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}]
i = 0
while True:
    cache.put_many(((i * 1000 + j).to_bytes(32, "little"), value) for j in range(1000))
    i += 1
    print(i, flush=True)
"""


def test_kill_9_during_cache_writes_leaves_no_torn_entry(tmp_path):
    path = tmp_path / "c.sqlite"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    for _ in range(5):  # let it commit a few transactions, then kill it in the middle of others
        writer.stdout.readline()
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    entries = db.execute("SELECT count(*) FROM responses").fetchone()[0]
    db.close()
    assert entries >= 5000 and entries % 1000 == 0  # whole transactions only
    cache = ResponseCache(path)
    found = cache.get_many([i.to_bytes(32, "little") for i in range(entries + 1000)])
    assert len(found) == entries and all(v[0]["text"] == "x" * 2000 for v in found.values())


def test_merge_and_prune(tmp_path):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    for path, texts in ((a, ("p", "q")), (b, ("q", "r"))):
        engine = FakeEngine()
        engine.cache = ResponseCache(path)
        _ask(engine, *texts)
        engine.cache.close()
    assert merge(a, b) == {"added": 1, "replaced": 0, "kept": 1, "skipped": 0}  # "r"; "q" was there
    assert prune(a, unused_days=1) == 0
    assert prune(a, unused_days=-1) == 3  # everything is older than tomorrow


def _stored_keys(path: Path) -> list[bytes]:
    db = sqlite3.connect(path)
    keys = [k for (k,) in db.execute("SELECT key FROM responses")]
    db.close()
    return keys


def test_merge_imports_only_sound_entries_and_repairs_damaged_ones(tmp_path, capsys):
    ours, theirs = tmp_path / "ours.sqlite", tmp_path / "theirs.sqlite"
    for path, texts in ((ours, ("p", "q")), (theirs, ("q", "r"))):
        engine = FakeEngine()
        engine.cache = ResponseCache(path)
        _ask(engine, *texts)
        engine.cache.close()
    completion = orjson.dumps([dataclasses.asdict(Completion("forged", "stop", 1, 1))])
    db = sqlite3.connect(theirs)
    forged = [  # a teammate's bad entries: served, they would be responses
        (b"1" * 32, completion, b"\0" * 32, 0),  # the digest does not match
        (b"2" * 32, b"not json", hashlib.sha256(b"not json").digest(), 0),
        (b"3" * 32, b'{"text": "x"}', hashlib.sha256(b'{"text": "x"}').digest(), 0),
        (b"short", completion, hashlib.sha256(completion).digest(), 0),  # not a request key
    ]
    db.executemany("INSERT INTO responses VALUES (?, ?, ?, ?)", forged)
    db.commit()
    db.close()
    _poison(ours, b"[]")  # our "p" and "q" are damaged: their sound "q" replaces ours
    main(["--path", str(ours), "merge", str(theirs)])
    printed = capsys.readouterr().out
    assert "1 entries added" in printed and "1 damaged ones replaced" in printed
    assert "0 already there" in printed and f"4 damaged entries of {theirs} skipped" in printed
    assert not {k for k, *_ in forged} & set(_stored_keys(ours))
    engine = FakeEngine()
    engine.cache = ResponseCache(ours)
    served = _ask(engine, "q", "r")
    assert engine.requests == [] and all(r.status == OK and len(r.completions) == 2 for r in served)
    [reply] = _ask(engine, "p")  # ours is damaged and theirs lacks it: asked again
    assert len(engine.requests) == 1 and reply.status == OK
    assert merge(ours, theirs) == {"added": 0, "replaced": 0, "kept": 2, "skipped": 4}


def test_merge_refuses_a_file_that_is_not_a_cache(tmp_path):
    (tmp_path / "notes.txt").write_text("hello " * 1000)
    with pytest.raises(PipelineError, match=r"notes\.txt"):
        merge(tmp_path / "c.sqlite", tmp_path / "notes.txt")
    with pytest.raises(PipelineError, match="no such cache file"):
        merge(tmp_path / "c.sqlite", tmp_path / "missing.sqlite")


def _rows(path: Path, columns: list[str]) -> list[dict]:
    return pq.read_table(path, columns=columns).to_pylist()


def _stages(monkeypatch) -> None:
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "gemma3")


def _new_source_shard(workspace: Path, count: int) -> list[str]:
    """A third source file with `count` kept conversations under new ids and new first turns."""
    source = workspace / "data/sample/lmsys-chat-1m/data"
    kept = set(
        _rows(workspace / "data/interim/first-turn.parquet", ["conversation_id"])[i]["conversation_id"]
        for i in range(40)
    )
    raw = pq.read_table(sorted(source.glob("*.parquet"))[0])
    rows = [r for r in raw.to_pylist() if r["conversation_id"] in kept and not r["redacted"]][:count]
    assert len(rows) == count
    for i, row in enumerate(rows):
        row["conversation_id"] = f"new-{i:03d}"
        row["conversation"][0]["content"] += f" (new question {i})"
    pq.write_table(pa.Table.from_pylist(rows, schema=raw.schema), source / "train-00002-of-00002-new.parquet")
    return [r["conversation_id"] for r in rows]


def test_a_changed_run_sends_only_the_requests_of_its_new_rows(workspace, monkeypatch, fake_engine, tmp_path):
    pristine = tmp_path / "pristine"
    shutil.copytree(workspace, pristine)
    _stages(monkeypatch)
    first = len(fake_engine.requests)
    assert first > 0
    before = len(_rows(workspace / f"{RELEASE}.parquet", ["conversation_id"]))

    # a filter now drops the redacted conversations (~4% of the sample): nothing new to ask
    set_params(workspace, lambda d: d["fetch"]["filter"].update(redacted="drop"))
    _stages(monkeypatch)
    assert len(fake_engine.requests) == first
    released = _rows(workspace / f"{RELEASE}.parquet", ["conversation_id"])
    assert len(released) == before - 12  # the 12 redacted conversations are gone

    # a new source shard with 10 new conversations: exactly their requests are sent
    new = _new_source_shard(workspace, 10)
    _stages(monkeypatch)
    sent = fake_engine.requests[first:]
    seed = 20241024
    purposes = ["translate:0", "ja", *(f"judge:{j}" for j in range(10))]
    expected = {request_seed(seed, cid, p) for cid in new for p in purposes}
    assert {r.seed for r in sent} == expected and len(sent) == len(expected) == 10 * 12

    # the release equals a from-scratch run with the cache off
    shutil.copy(
        workspace / "data/sample/lmsys-chat-1m/data/train-00002-of-00002-new.parquet",
        pristine / "data/sample/lmsys-chat-1m/data/",
    )
    monkeypatch.chdir(pristine)
    set_params(
        pristine, lambda d: (d["fetch"]["filter"].update(redacted="drop"), d["engine"].update(cache="off"))
    )
    _stages(monkeypatch)
    assert not (pristine / "data/.cache/responses.sqlite").exists()  # (fetch keeps its pinned files there)
    for suffix in (".parquet", ".jsonl.gz"):
        assert (pristine / f"{RELEASE}{suffix}").read_bytes() == (
            workspace / f"{RELEASE}{suffix}"
        ).read_bytes()
    ids = set(
        pq.read_table(workspace / f"{RELEASE}.parquet", columns=["conversation_id"])[
            "conversation_id"
        ].to_pylist()
    )
    assert set(new) <= ids


def test_a_local_openai_compatible_server_gets_only_the_misses(tmp_path, monkeypatch):
    pytest.importorskip("openai")
    from benchmarks.fake_vllm import FakeVLLMServer
    from stages.core.config.engine_params import EngineParams, LLMSpec
    from stages.core.engines import make_engine

    monkeypatch.setenv("CACHE_TEST_KEY", "sk-local")
    requests = [ChatRequest([{"role": "user", "content": f"question {i}"}], n=3, seed=i) for i in range(12)]
    with FakeVLLMServer(first_token_s=0.0, token_latency_s=0.0, median_tokens=8) as server:
        options = EngineParams(
            backend="openai", batch_size=8, base_url=server.base_url, api_key_env="CACHE_TEST_KEY"
        )
        sent = []
        for asked in (requests[:8], requests):  # a first run, then a run with 4 new requests
            with make_engine(LLMSpec(model="fake"), options) as engine:
                engine.cache = ResponseCache(tmp_path / "c.sqlite")
                replies = engine.chat(asked, SAMPLING)
                engine.cache.close()
            sent.append(server.stats()["requests"])
    assert sent == [8, 12]  # the second run sent only its 4 new requests
    assert all(r.status == OK and len(r.completions) == 3 for r in replies)


def _crafted(path: Path, schema: str) -> Path:
    with sqlite3.connect(path) as db:
        db.executescript(schema)
    return path


def test_merge_refuses_a_view_or_a_table_of_another_shape(tmp_path):
    """A teammate's file is read only as a plain table of the cache's schema: a view (which could run
    any query when read) or a table with generated or other columns is refused by name."""
    into = tmp_path / "ours.sqlite"
    view = _crafted(
        tmp_path / "view.sqlite",
        "CREATE VIEW responses AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
        "SELECT randomblob(32) AS key, x'00' AS value, x'00' AS digest, i AS used_at FROM n;",
    )
    with pytest.raises(PipelineError, match="is not a response cache file: `responses` is a view"):
        merge(into, view)
    generated = _crafted(
        tmp_path / "generated.sqlite",
        "CREATE TABLE responses (key BLOB PRIMARY KEY, value BLOB NOT NULL, digest BLOB NOT NULL, "
        "used_at INTEGER NOT NULL, extra BLOB GENERATED ALWAYS AS (zeroblob(1 << 20)) VIRTUAL);",
    )
    with pytest.raises(PipelineError, match="is not a response cache file"):
        merge(into, generated)


def test_merge_of_a_file_that_never_ends_stops_in_time_and_leaves_the_cache_writable(tmp_path):
    """A table whose read takes long (here: a million rows, with a time limit of 0.2 s) stops with one
    line, and leaves the cache writable (the write lock is taken per batch already read)."""
    into, other = tmp_path / "ours.sqlite", tmp_path / "big.sqlite"
    with sqlite3.connect(other) as db:
        db.execute(
            "CREATE TABLE responses (key BLOB PRIMARY KEY, value BLOB NOT NULL, digest BLOB NOT NULL, "
            "used_at INTEGER NOT NULL) WITHOUT ROWID"
        )
        db.execute(
            "INSERT INTO responses WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "LIMIT 1000000) SELECT randomblob(32), x'00', x'00', i FROM n"
        )
    ResponseCache(into).close()
    began = time.monotonic()
    with pytest.raises(PipelineError, match=r"cannot merge .* it took over 0\.2 s"):
        merge(into, other, seconds=0.2)
    assert time.monotonic() - began < 10
    writer = ResponseCache(into)
    writer.put_many(
        [(b"k" * 32, [{"text": "t", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}])]
    )
    assert writer.counts()["cache_stored"] == 1
    writer.close()
