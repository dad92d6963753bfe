"""Interrupts stop work: SIGINT or SIGTERM aborts the requests in flight within seconds, keeps every
answer that came back (the response cache, as answers arrive) and every finished shard, exits non-zero
in one line, and the next run sends only what was not answered. Also: identity and code meaning are
computed once per engine, so request threads never parse code (CPython 3.11's parser is not safe from
two threads at once)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from stages.core.config.engine_params import Sampling
from stages.core.engines import ChatRequest, Interrupted, Reply
from stages.core.storage import resume
from stages.core.storage.cache import ResponseCache
from tests.conftest import FakeEngine, run_stage, set_params

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = Sampling(temperature=0.6, max_tokens=8)


@dataclass
class OneByOneEngine(FakeEngine):
    """Answers a call's requests one at a time, `delay` seconds each, handing each over as it comes
    (as the vLLM engine's step loop does), and stops between two when asked."""

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        replies = []
        for request in requests:
            self._stop_check()
            time.sleep(self.delay)
            [reply] = super()._chat([request], sampling)
            self.arrived(request, reply)
            replies.append(reply)
        return replies


def _requests(count: int) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": f"question {i}"}], n=2, seed=i) for i in range(count)]


def test_a_stopped_call_raises_interrupted_and_keeps_every_answer_that_came_back(tmp_path):
    engine = OneByOneEngine(delay=0.05)
    engine.cache = ResponseCache(tmp_path / "cache.sqlite")
    threading.Timer(0.5, engine.stop).start()
    began = time.monotonic()
    with pytest.raises(Interrupted, match="interrupted"):
        engine.chat(_requests(100), SAMPLING)
    assert time.monotonic() - began < 2
    answered = len(engine.requests)
    assert 0 < answered < 100
    assert engine.cache.counts()["cache_stored"] == answered  # stored as they arrived, none lost
    engine.cache.close()

    again = OneByOneEngine()
    again.cache = ResponseCache(tmp_path / "cache.sqlite")
    replies = again.chat(_requests(100), SAMPLING)
    assert len(again.requests) == 100 - answered  # only what was not answered is sent
    assert all(len(r.completions) == 2 for r in replies)


def test_answers_of_a_call_that_dies_midway_are_kept(tmp_path):
    """A backend error after some answers came back (a dead server) loses none of them."""

    @dataclass
    class DiesEngine(OneByOneEngine):
        def _chat(self, requests, sampling):
            for request in requests[:3]:
                [reply] = FakeEngine._chat(self, [request], sampling)
                self.arrived(request, reply)
            raise ConnectionError("the server went away")

    engine = DiesEngine()
    engine.cache = ResponseCache(tmp_path / "cache.sqlite")
    with pytest.raises(ConnectionError):
        engine.chat(_requests(10), SAMPLING)
    assert engine.cache.counts()["cache_stored"] == 3


def test_identity_is_computed_once_and_never_parses_in_request_threads(monkeypatch):
    engine = FakeEngine()
    parses = []
    original = resume.code_meaning
    monkeypatch.setattr(
        "stages.core.engines.base.code_meaning", lambda path: parses.append(path) or original(path)
    )
    with_threads = [threading.Thread(target=engine.cache_identity) for _ in range(8)]
    for thread in with_threads:
        thread.start()
    for thread in with_threads:
        thread.join()
    assert parses == []  # computed when the engine was built, in the thread that built it
    other = FakeEngine()
    other.llm = other.llm.model_copy(update={"revision": "b" * 40})
    assert other.cache_identity() != engine.cache_identity()  # a changed model is another identity


def test_two_engines_in_many_threads_never_crash_the_parser(tmp_path):
    """Two engines' calls from 6 threads, each with the response cache (so each call builds keys from
    the engine's identity), while 2 threads compute code digests: for 4 seconds, no error."""
    engines = [FakeEngine(), FakeEngine()]
    for k, engine in enumerate(engines):
        engine.cache = ResponseCache(tmp_path / f"cache-{k}.sqlite")
    errors: list[BaseException] = []
    deadline = time.monotonic() + 4

    def calls(engine: FakeEngine | None, offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            try:
                if engine is None:
                    resume.code_digest("stages.score")
                else:
                    engine.chat([ChatRequest([{"role": "user", "content": f"q{i}"}], seed=i)], SAMPLING)
            except BaseException as err:
                errors.append(err)
                return
            i += 1

    workers = [engines[0], engines[1]] * 3 + [None, None]
    threads = [threading.Thread(target=calls, args=(e, 10_000 * k)) for k, e in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(e.counters["requests"] for e in engines) > 100


# --- a real engine (transformers, the tiny model) stopped by a signal mid-generate ---------------


@pytest.fixture
def upstream(workspace, monkeypatch, fake_engine):
    """The sample's translated table (fetch, decrypt, translate with the fake engine), and a
    generate@gemma3 that takes long enough on the tiny model to be stopped midway."""
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)

    def slow(data: dict) -> None:
        data["engine"]["batch_size"] = 10  # one request of n 10 at a time: a stop point per request
        data["models"]["gemma3"]["generate"]["sampling"]["max_tokens"] = 24
        # one shard: none ends (and is checkpointed, its answers then reused without the cache) before the
        # stop, which comes once the first answers reach the cache (2 s, or 256 answers, after they arrive)
        data["models"]["gemma3"]["generate"]["shard_size"] = 4096

    set_params(workspace, slow)
    return workspace


def _generate(workspace: Path) -> subprocess.Popen:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-m", "stages.generate", "gemma3"],
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stored(workspace: Path) -> int:
    with sqlite3.connect(workspace / "data/.cache/responses.sqlite") as db:
        return db.execute("SELECT count(*) FROM responses").fetchone()[0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_generate_stops_it_in_seconds_and_the_rerun_sends_only_the_unanswered(upstream, signum):
    import json

    before = _stored(upstream)  # translate's answers
    proc = _generate(upstream)
    waited = time.monotonic()
    while _stored(upstream) == before:  # answers reach the cache while the run goes on
        assert proc.poll() is None and time.monotonic() - waited < 300, proc.stderr.read()
        time.sleep(0.2)
    began = time.monotonic()
    proc.send_signal(signum)
    rest = proc.stderr.read()
    code = proc.wait(timeout=60)
    took = time.monotonic() - began
    assert code == 128 + signum, rest
    assert took < 10, f"{took:.1f} s to stop"
    assert rest.strip().splitlines()[-1].startswith(f"stopped by {signum.name}:"), rest
    assert "Traceback" not in rest
    answered = _stored(upstream) - before  # what came back before the stop is kept
    assert answered > 0

    proc = _generate(upstream)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    metrics = json.loads((upstream / "data/metrics/generate-gemma3.json").read_text())["generate"]
    # what was answered before the stop comes from the cache; every other request is new to it (the
    # cache grew by exactly the requests not answered from it: none was answered twice)
    asked_anew = metrics["requests"] - metrics["from_cache"]
    assert metrics["from_cache"] == answered and asked_anew > 0
    assert _stored(upstream) == before + answered + asked_anew
