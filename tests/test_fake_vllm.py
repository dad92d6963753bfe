"""benchmarks/fake_vllm.py behaves like `vllm serve` for the real openai client, faults included."""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from benchmarks.fake_vllm import FakeVLLMServer, Faults

MARKER = "[The Start of Assistant's Answer]"


def client(server: FakeVLLMServer, max_retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=max_retries)


def ask(c: openai.OpenAI, text: str, **kwargs) -> openai.types.chat.ChatCompletion:
    args = {"model": "fake", "n": 1, "seed": 0, "temperature": 0.7, "max_tokens": 1000, "logprobs": True}
    return c.chat.completions.create(messages=[{"role": "user", "content": text}], **(args | kwargs))


def test_choices_logprobs_usage_and_determinism():
    with FakeVLLMServer(median_tokens=50, max_num_seqs=4) as server:
        c = client(server)
        first = ask(c, "Hello there", n=10, max_tokens=60, seed=3)
        again = ask(c, "Hello there", n=10, max_tokens=60, seed=3)
        other = ask(c, "Hello there", n=10, max_tokens=60, seed=4)
        stats = server.stats()
    assert [ch.index for ch in first.choices] == list(range(10))
    counts = [len(ch.logprobs.content) for ch in first.choices]
    assert first.usage.completion_tokens == sum(counts)
    assert first.usage.prompt_tokens == len("Hello there") // 4 + 4
    for ch, count in zip(first.choices, counts, strict=True):
        assert len(ch.message.content.split()) == count
        assert ch.finish_reason == ("length" if count == 60 else "stop")
        assert 1 <= count <= 60
    assert len({ch.message.content for ch in first.choices}) > 1
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in first.choices]
    assert [ch.message.content for ch in other.choices] != [ch.message.content for ch in first.choices]
    assert stats["requests"] == 3 and stats["by_status"] == {200: 3} and stats["completions"] == 30
    assert stats["completion_tokens"] == 2 * first.usage.completion_tokens + other.usage.completion_tokens


def test_no_logprobs_models_health_and_unknown_model():
    with FakeVLLMServer(model="m", max_model_len=4096) as server:
        c = client(server)
        reply = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        models = c.models.list()
        with urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/health") as health:
            assert health.status == 200
        with pytest.raises(openai.NotFoundError):
            ask(c, "hi")
    assert reply.choices[0].logprobs is None and reply.choices[0].message.content
    assert [(m.id, m.max_model_len) for m in models.data] == [("m", 4096)]


def test_persistent_500_fails_after_the_client_retries():
    with FakeVLLMServer(faults=Faults(persistent_500=1.0)) as server:
        with pytest.raises(openai.InternalServerError):
            ask(client(server, max_retries=2), "hi")
        stats = server.stats()
    assert stats["requests"] == 3 and stats["by_status"] == {500: 3}
    assert stats["failing_requests"] == 1 and stats["transient"] == 0


def test_transient_429_succeeds_on_retry():
    with FakeVLLMServer(faults=Faults(transient_429=1.0)) as server:
        reply = ask(client(server), "hi")
        stats = server.stats()
    assert reply.choices[0].message.content
    assert stats["by_status"] == {429: 1, 200: 1}
    assert stats["transient"] == 1 and stats["failing_requests"] == 0


def test_context_errors_injected_and_real():
    with FakeVLLMServer(faults=Faults(context_400=1.0)) as server:
        with pytest.raises(openai.BadRequestError, match="maximum context length is 8192 tokens"):
            ask(client(server), "hi")
        assert server.stats()["by_status"] == {400: 1}
    with FakeVLLMServer(max_model_len=256) as server:
        c = client(server)
        with pytest.raises(openai.BadRequestError, match="maximum context length") as err:
            ask(c, "x" * 2000, max_tokens=10)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            ask(c, "short", max_tokens=300)
        assert ask(c, "short", max_tokens=200).choices
        stats = server.stats()
    assert err.value.body["type"] == "BadRequestError" and err.value.body["code"] == 400
    assert stats["by_status"] == {400: 2, 200: 1} and stats["failing_requests"] == 0


def test_judge_marker_ends_with_a_rating():
    prompt = f"[Question]\nWhy?\n\n{MARKER}\nBecause.\n[The End of Assistant's Answer]"
    with FakeVLLMServer(median_tokens=20) as server:
        reply = ask(client(server), prompt, n=5)
    for ch in reply.choices:
        assert re.search(r"Rating: \[\[(10|[0-9])\]\]$", ch.message.content)
        assert ch.logprobs.content[-1].token.startswith("Rating: [[")


def test_batch_slots_bound_concurrency():
    with FakeVLLMServer(max_num_seqs=2, first_token_s=0.2, token_latency_s=0.0) as server:
        c = client(server)
        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: ask(c, f"q{i}", max_tokens=5), range(4)))
        elapsed = time.perf_counter() - start
    assert 0.38 < elapsed < 0.75


def test_fault_shares_over_many_requests():
    faults = Faults(transient_429=0.1, transient_500=0.1, persistent_500=0.1, context_400=0.05)
    with FakeVLLMServer(token_latency_s=0.0, first_token_s=0.0, faults=faults) as server:
        c = client(server)

        def one(i: int) -> str:
            try:
                ask(c, f"request {i}", max_tokens=8)
            except openai.InternalServerError:
                return "500"
            except openai.BadRequestError:
                return "400"
            return "ok"

        with ThreadPoolExecutor(64) as pool:
            outcomes = list(pool.map(one, range(400)))
        stats = server.stats()
    failed_500, failed_400 = outcomes.count("500"), outcomes.count("400")
    assert 0.5 * 40 <= failed_500 <= 1.5 * 40 and 0.5 * 20 <= failed_400 <= 1.5 * 20
    assert stats["failing_requests"] == failed_500 + failed_400
    assert 0.5 * 80 <= stats["transient"] <= 1.5 * 80
    assert stats["by_status"][400] == failed_400
    assert stats["by_status"][429] + stats["by_status"][500] - 3 * failed_500 == stats["transient"]
    assert stats["by_status"][200] == outcomes.count("ok") == stats["completions"]
    assert stats["requests"] == sum(stats["by_status"].values())
