"""Engines under load, without a GPU: the openai engine over several local fake vLLM servers, and the
one-call-at-a-time rule of engines that do not batch across calls (the vLLM engine's own tests are in
tests/test_fake_vllm.py and, where vllm imports, tests/test_vllm_api.py)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from benchmarks.fake_vllm import FakeVLLMServer, Faults
from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.engines import FAILED, OK, ChatRequest, make_engine
from tests.conftest import FakeEngine

SAMPLING = Sampling(temperature=0.7, max_tokens=16)
MARKER = ord("☠")  # a token id the fake engine refuses, as vLLM refuses one outside its vocabulary
WAIT = 10.0  # seconds any future may take before the test fails instead of hanging


def openai_options(monkeypatch, servers: list[FakeVLLMServer], **options: Any) -> EngineParams:
    pytest.importorskip("openai")
    monkeypatch.setenv("SCALEOUT_KEY", "sk-local")
    urls = [s.base_url for s in servers]
    return EngineParams(backend="openai", batch_size=8, base_url=urls, api_key_env="SCALEOUT_KEY", **options)


def questions(count: int, n: int) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": f"question {i}"}], n=n, seed=i) for i in range(count)]


def test_openai_engine_spreads_requests_over_servers_with_exact_token_counts(monkeypatch):
    timing = {"median_tokens": 8, "first_token_s": 0.01, "token_latency_s": 0.001}
    with FakeVLLMServer(**timing) as one, FakeVLLMServer(**timing) as two:
        options = openai_options(monkeypatch, [one, two], max_concurrency=8)
        with make_engine(LLMSpec(model="fake"), options) as engine:
            replies = engine.chat(questions(40, n=2), SAMPLING)
        stats = [one.stats(), two.stats()]
    assert all(s["requests"] >= 10 for s in stats), stats  # each at least a quarter
    assert sum(s["requests"] for s in stats) == 40 and all(
        s["by_status"] == {200: s["requests"]} for s in stats
    )
    assert all(r.status == OK and len(r.completions) == 2 for r in replies)
    completions = [c for r in replies for c in r.completions]
    for c in completions:  # per choice, from its logprobs: one pseudo-token per word
        assert 1 <= c.completion_tokens <= 16 and c.completion_tokens == len(c.text.split())
        assert c.finish_reason == ("length" if c.completion_tokens == 16 else "stop")
    assert sum(c.completion_tokens for c in completions) == sum(s["completion_tokens"] for s in stats)
    assert sum(r.completions[0].prompt_tokens for r in replies) == sum(s["prompt_tokens"] for s in stats)


def test_openai_engine_fails_exactly_the_requests_a_failing_server_failed(monkeypatch):
    with FakeVLLMServer(faults=Faults(persistent_500=1.0)) as bad, FakeVLLMServer(median_tokens=8) as good:
        options = openai_options(monkeypatch, [bad, good], max_concurrency=8, max_retries=0)
        with make_engine(LLMSpec(model="fake"), options) as engine:
            replies = engine.chat(questions(40, n=1), SAMPLING)
        failed, served = bad.stats(), good.stats()
    statuses = Counter(r.status for r in replies)
    assert statuses[FAILED] > 0 and statuses[OK] > 0
    assert statuses[FAILED] == failed["failing_requests"] == failed["requests"]  # no retries
    assert statuses[OK] == served["by_status"][200] == served["requests"]
    assert all("InternalServerError" in r.detail for r in replies if r.status == FAILED)


class PeakServer(FakeVLLMServer):
    """Records the most requests it generated for at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.now = self.peak = 0

    async def _generate(self, n: int, longest: int) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await super()._generate(n, longest)
        finally:
            self.now -= 1


def test_openai_engine_keeps_at_most_max_concurrency_requests_in_flight(monkeypatch):
    with PeakServer(max_num_seqs=256, first_token_s=0.2, median_tokens=4, token_latency_s=0.0) as server:
        options = openai_options(monkeypatch, [server], max_concurrency=4)
        with make_engine(LLMSpec(model="fake"), options) as engine:
            began = time.monotonic()
            replies = engine.chat(questions(8, n=1), SAMPLING)
            elapsed = time.monotonic() - began
    assert all(r.status == OK for r in replies)
    assert server.peak == 4 and elapsed >= 0.4  # two waves of four


# --- engines that take one call at a time --------------------------------------------------------


@dataclass
class TimedEngine(FakeEngine):
    """Records when each `_chat` ran; loading takes a while, so two first calls race for it."""

    spans: list[tuple[float, float]] = field(default_factory=list)

    def load(self) -> None:
        time.sleep(0.1)
        super().load()

    def _chat(self, requests, sampling):
        began = time.monotonic()
        try:
            return super()._chat(requests, sampling)
        finally:
            self.spans.append((began, time.monotonic()))


@dataclass
class ConcurrentTimedEngine(TimedEngine):
    CONCURRENT: ClassVar[bool] = True


def chat_from_two_threads(engine: TimedEngine, calls: int = 3) -> None:
    start = threading.Barrier(2)

    def client(name: str) -> None:
        start.wait()
        for i in range(calls):
            [reply] = engine.chat([ChatRequest([{"role": "user", "content": f"{name}{i}"}])], SAMPLING)
            assert reply.status == OK

    threads = [threading.Thread(target=client, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(engine.spans) == 2 * calls


def test_a_non_concurrent_engine_runs_one_call_at_a_time_and_loads_once():
    engine = TimedEngine(delay=0.03)
    chat_from_two_threads(engine)
    spans = sorted(engine.spans)
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))
    assert engine.loads == 1


def test_a_concurrent_engine_takes_calls_at_once_and_loads_once():
    """The check above can see overlap: a CONCURRENT engine's calls do overlap."""
    engine = ConcurrentTimedEngine(delay=0.05)
    chat_from_two_threads(engine)
    spans = sorted(engine.spans)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
    assert engine.loads == 1
