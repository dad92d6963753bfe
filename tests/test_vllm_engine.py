"""The vllm engine on the real vLLM (its CPU build, `make check-vllm`; skipped where vllm is not
importable), in this process: one VLLMEngine serving the bundled tiny model, loaded once for the module
(a load takes 1-2 minutes here). n completions per request with vLLM's own token counts, per-request
seeds (completion j of a request is the single reply to seed + j), a prompt over the context not sent,
a request vLLM refuses failing alone, structured output and logprobs honoured (the judge's modes)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

vllm = pytest.importorskip("vllm")

from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling  # noqa: E402
from stages.core.config.variant_params import ScoreParams  # noqa: E402
from stages.core.engines import OK, TOO_LONG, ChatRequest, make_engine  # noqa: E402
from stages.core.engines.vllm import VLLMEngine  # noqa: E402
from stages.core.rows.judge import JUDGEMENT_SCHEMA, judge_rows  # noqa: E402
from stages.core.storage.cache import ResponseCache  # noqa: E402
from tests.vllm_cpu import EAGER, TINY, VLLM_ENV  # noqa: E402

CONTEXT = 256
SAMPLING = Sampling(temperature=1.0, max_tokens=16)
QUESTION = [{"role": "user", "content": "猫について教えてください。"}]
LONG = [{"role": "user", "content": "猫について教えてください。" * 200}]
REFUSED = 25  # top_logprobs over vLLM's max_logprobs (20): vLLM refuses the request


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[VLLMEngine]:
    """The engine as a stage has it: with a response cache (each test asks with seeds of its own)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in VLLM_ENV.items():
            patch.setenv(name, value)
        llm = LLMSpec(model=TINY, max_model_len=CONTEXT, dtype="float32", engine_kwargs=EAGER)
        with make_engine(llm, EngineParams(backend="vllm", batch_size=64)) as engine:
            engine.cache = ResponseCache(tmp_path_factory.mktemp("cache") / "responses.sqlite")
            yield engine
            engine.cache.close()


def _sent(engine, requests, sampling=SAMPLING):
    """The replies to `requests` and how many of them the engine sent to vLLM."""
    before = engine.request_counts()["sent"]
    replies = engine.chat(requests, sampling)
    return replies, engine.request_counts()["sent"] - before


def test_each_request_gets_n_completions_with_vllms_token_counts(engine):
    requests = [ChatRequest(QUESTION, n=n, seed=s) for s, n in enumerate((1, 3, 2))]
    replies = engine.chat(requests, SAMPLING)
    assert [(r.status, len(r.completions)) for r in replies] == [(OK, 1), (OK, 3), (OK, 2)]
    counted = engine.count_tokens(QUESTION)  # the chat template vLLM renders with, and its tokenizer
    for reply in replies:
        for c in reply.completions:
            assert c.prompt_tokens == counted and 1 <= c.completion_tokens <= SAMPLING.max_tokens
            assert c.finish_reason in ("stop", "length") and c.logprobs is None


def test_completion_j_of_a_request_is_the_single_reply_to_its_seed_plus_j(engine):
    [three] = engine.chat([ChatRequest(QUESTION, n=3, seed=7)], SAMPLING)
    [again] = engine.chat([ChatRequest(QUESTION, n=3, seed=7)], SAMPLING)
    singles = engine.chat([ChatRequest(QUESTION, seed=s) for s in (7, 8, 9)], SAMPLING)
    texts = [c.text for c in three.completions]
    assert texts == [c.text for c in again.completions]
    assert texts == [r.completions[0].text for r in singles]
    other = engine.chat([ChatRequest(QUESTION, n=3, seed=s) for s in range(20, 25)], SAMPLING)
    assert len({c.text for r in other for c in r.completions}) > 1  # temperature 1: seeds differ


def test_a_prompt_over_the_context_is_not_sent(engine):
    (short, long), sent = _sent(engine, [ChatRequest(QUESTION, seed=30), ChatRequest(LONG, seed=30)])
    assert (short.status, long.status, long.completions, sent) == (OK, TOO_LONG, [], 1)
    assert f"> {CONTEXT} - {SAMPLING.max_tokens}" in long.detail


def test_a_request_vllm_refuses_fails_alone(engine):
    requests = [
        ChatRequest(QUESTION, seed=40),
        ChatRequest(QUESTION, seed=41, top_logprobs=REFUSED),
        ChatRequest(QUESTION, seed=42),
    ]
    replies = engine.chat(requests, SAMPLING)
    assert [r.status == OK for r in replies] == [True, False, True]
    assert replies[1].completions == [] and "logprobs" in replies[1].detail


def test_structured_output_follows_the_judges_schema(engine):
    """Each completion is the schema's JSON, or its start cut at max_tokens (the tiny model writes "{"
    and newlines, which JSON allows, until then)."""
    request = ChatRequest(QUESTION, n=4, seed=3, json_schema=JUDGEMENT_SCHEMA)
    [reply] = engine.chat([request], Sampling(temperature=1.0, max_tokens=128))
    assert reply.status == OK and len(reply.completions) == 4
    for c in reply.completions:
        assert c.text.startswith("{"), c.text
        if c.finish_reason == "stop":
            judgement = json.loads(c.text)
            assert set(judgement) == {"explanation", "rating"} and 0 <= judgement["rating"] <= 10


def test_logprobs_come_with_every_generated_token(engine):
    [reply] = engine.chat([ChatRequest(QUESTION, n=2, seed=5, top_logprobs=5)], SAMPLING)
    for c in reply.completions:
        assert len(c.logprobs) == c.completion_tokens
        assert all(1 <= len(alternatives) <= 6 for _, alternatives in c.logprobs)  # top 5 and its own
        assert all(value <= 0 for _, alternatives in c.logprobs for value in alternatives.values())


@pytest.mark.parametrize("mode", ["parse", "structured", "logprob"])
def test_vllm_honours_each_judge_mode(engine, mode):
    spec = ScoreParams(
        llm=LLMSpec(model=TINY),
        prompt="judge-0to10",
        sampling=Sampling(temperature=0.0, max_tokens=64),
        shard_size=8,
        mode=mode,
    )
    rows = [
        {
            "conversation_id": f"c{i}",
            "instruction_ja": f"猫について教えてください。{i}",
            "responses_ja": [{"content": f"猫は動物です。{i}-{j}", "completion_tokens": 5} for j in range(2)],
        }
        for i in range(3)
    ]
    notes, statuses = judge_rows(engine, rows, spec, seed=0)
    flat = [s for row in statuses for s in row]
    assert len(flat) == 6 and not {"mode_ignored", "failed", "partial"} & set(flat), flat
    assert all(n["judgement"] for row in notes for n in row)


# --- what the engine work in progress promises (issue 27): separate, so it reports on its own --------


def test_a_refused_request_is_final_after_its_first_answer(engine):
    request = ChatRequest(QUESTION, seed=50, top_logprobs=REFUSED)
    [first], sent = _sent(engine, [request])
    assert (first.status, sent) == ("refused", 1), first
    [second], sent = _sent(engine, [request])
    assert (second.status, sent) == ("refused", 0)  # answered from the response cache: never asked again


def test_the_engine_identity_names_the_vllm_that_generates(engine):
    """Resume keys, cache keys and the release record the vLLM version, whichever distribution
    (vllm or the CPU build vllm-cpu) installed it."""
    assert vllm.__version__ in engine.identity()["libraries"].values(), engine.identity()["libraries"]
