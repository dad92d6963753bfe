"""Judge modes: parse (published), structured output and the logprob-weighted expected rating, on a fake
engine that returns logprobs, on the openai engine against the local fake vLLM server, and on the
transformers engine with the tiny model."""

from __future__ import annotations

import json
import math
import re
import types
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks.fake_vllm import FakeVLLMServer
from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.config.errors import PipelineError
from stages.core.config.params import ParamsError
from stages.core.config.variant_params import ScoreParams
from stages.core.engines import FAILED as FAILED_REQUEST
from stages.core.engines import MODE_IGNORED, OK, ChatRequest, Completion, Reply, make_engine
from stages.core.engines import vllm as vllm_engine
from stages.core.engines.base import cacheable, token_logprobs
from stages.core.rows.judge import (
    FAILED,
    JUDGEMENT_SCHEMA,
    PARSED,
    TRUNCATED,
    effective_mode,
    expected_rating,
    judge_request,
    judge_rows,
    judge_status,
    parse_score,
    score_of,
    structured_score,
)
from tests.conftest import FakeEngine, run_stage, set_params

TINY = str(Path(__file__).resolve().parent.parent / "data" / "sample" / "tiny-chat")
LOG = math.log


def spec(mode: str, **fields) -> ScoreParams:
    return ScoreParams(
        llm=LLMSpec(model="fake"),
        prompt="judge-0to10",
        sampling=Sampling(temperature=0.0, max_tokens=64),
        shard_size=8,
        mode=mode,
        **fields,
    )


def judged(tokens: list[list], text: str | None = None) -> Completion:
    """A judgement whose logprobs are `tokens` ([text, alternatives] each)."""
    joined = "".join(t for t, _ in tokens)
    return Completion(joined if text is None else text, "stop", 10, len(tokens), logprobs=tokens)


# --- the expected rating over the rating tokens ---------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        # p(7) = p(8) = 0.5
        ([["Good. Rating: ", {}], ["[[", {}], ["7", {"7": LOG(0.5), "8": LOG(0.5)}], ["]]", {}]], 7.5),
        # renormalised over the rating tokens present: " **" is no rating
        ([["[[", {}], ["7", {"7": LOG(0.4), "8": LOG(0.4), " **": LOG(0.2)}], ["]]", {}]], 7.5),
        # "10" one token (Llama 3): a "1" is a 1
        ([["[[", {}], ["10", {"10": LOG(0.5), "9": LOG(0.3), "1": LOG(0.2)}], ["]]", {}]], 7.9),
        # "10" as "1" then "0" (Gemma): the sampled "1"'s next token splits its mass, 0.6 * 0.75 to 10
        (
            [["[[", {}], ["1", {"1": LOG(0.6), "9": LOG(0.4)}], ["0", {"0": LOG(0.75), "]]": LOG(0.25)}]],
            0.6 * 0.75 * 10 + 0.6 * 0.25 * 1 + 0.4 * 9,
        ),
        # a sampled "1" that the text ends after is a 1; "11" and the like are dropped
        ([["[[", {}], ["1", {"1": LOG(0.5), "2": LOG(0.5)}], ["]]", {"]]": LOG(0.8), "1": LOG(0.2)}]], 1.5),
        # an unsampled "1" without a "10" token: the nearer of 1 and 10 to the other ratings' mean
        ([["[[", {}], ["9", {"9": LOG(0.7), "1": LOG(0.3)}], ["]]", {}]], 0.7 * 9 + 0.3 * 10),
        ([["[[", {}], ["2", {"2": LOG(0.7), "1": LOG(0.3)}], ["]]", {}]], 0.7 * 2 + 0.3 * 1),
        # a token that holds the end of "[[" with the rating
        ([["Rating: ", {}], ["[[7", {"[[7": LOG(0.5), "[[8": LOG(0.5), "[[": LOG(0.1)}], ["]]", {}]], 7.5),
        # spaces around the digits read too
        ([["[[", {}], [" 6", {" 6": LOG(0.5), " 4": LOG(0.5)}], ["]]", {}]], 5.0),
        # the last "[[" with rating alternatives: the quoted format comes first
        (
            [["Format [[", {}], ["rating", {"rating": LOG(0.9)}], ["]]. Rating: [[", {}], ["3", {"3": 0.0}]],
            3.0,
        ),
    ],
)
def test_expected_rating_over_the_rating_tokens(tokens, expected):
    assert expected_rating(judged(tokens)) == pytest.approx(expected, abs=1e-12)


def test_without_rating_alternatives_the_text_is_parsed_or_the_score_fails():
    no_ratings = [["Rating: ", {}], ["[[", {}], ["**", {"**": LOG(0.9)}], ["]]", {}]]
    assert expected_rating(judged(no_ratings, "Rating: [[6]]")) == 6.0  # the text's own rating
    assert expected_rating(judged(no_ratings)) == FAILED  # "Rating: [[**]]": none in the text either
    assert expected_rating(Completion("Rating: [[4]]", "stop", 1, 1)) == 4.0  # the engine gave no logprobs
    only_ones = [["[[", {}], ["x", {"1": LOG(0.5), "x": LOG(0.5)}], ["]]", {}]]  # "1" alone: 1 or 10?
    assert expected_rating(judged(only_ones, "Rating: [[x]]")) == FAILED


def test_the_engine_keeps_alternatives_only_after_the_mark():
    tokens = ["Good", ". [[", "1", "0", "]]", " ok [", "[", "5", "]]"]
    request = ChatRequest([], top_logprobs=5, logprobs_after="[[")
    kept = token_logprobs(tokens, lambda i: {tokens[i]: -float(i)}, request)
    assert [t for t, _ in kept] == tokens
    assert [i for i, (_, alternatives) in enumerate(kept) if alternatives] == [2, 3, 7, 8]
    everywhere = token_logprobs(tokens, lambda i: {tokens[i]: 0.0}, replace(request, logprobs_after=""))
    assert all(alternatives for _, alternatives in everywhere)


def test_structured_score_reads_the_rating_field():
    assert structured_score('{"explanation": "Rating: [[2]] is what a weak answer gets", "rating": 9}') == 9.0
    assert structured_score('{"explanation": "x", "rating": 11}') == FAILED
    assert structured_score('{"explanation": "cut at max_tokens, Rating: [[6') == FAILED
    assert structured_score('{"explanation": "Rating: [[6]]", "rati') == 6.0  # cut: the text's rating
    assert score_of(None, "structured") == FAILED


def test_each_mode_asks_for_its_own_request():
    parse, structured, logprob = (
        judge_request(spec(m), "質問", "回答", 7) for m in ("parse", "structured", "logprob")
    )
    assert parse == ChatRequest(parse.messages, seed=7) and parse.options() == {}  # the published request
    assert structured.options() == {"json_schema": JUDGEMENT_SCHEMA}
    assert logprob.options() == {"top_logprobs": 20, "logprobs_after": "[["}
    assert judge_request(spec("logprob", top_logprobs=5), "q", "a", 1).top_logprobs == 5


# --- a fake engine that returns logprobs, through the score stage --------------------------------


def fake_logprobs(text: str, request: ChatRequest) -> list[list]:
    """Tokens of a FakeEngine judgement "... Rating: [[k]]" with digits split (as Gemma writes them):
    the first digit's alternatives are it and OTHER(k) at 0.5 each, so the expected rating is
    (k + OTHER(k)) / 2; every other token is certain."""
    head, digits = re.fullmatch(r"(.*\[\[)(\d+)\]\]", text, re.S).groups()
    tokens = [head, *digits, "]]"]
    other = str(other_rating(int(digits)))

    def alternatives(i: int) -> dict[str, float]:
        return {digits[0]: LOG(0.5), other: LOG(0.5)} if i == 1 else {tokens[i]: 0.0}

    return token_logprobs(tokens, alternatives, request)


def other_rating(k: int) -> int:
    return 6 if k == 5 else 5


@dataclass
class LogprobEngine(FakeEngine):
    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        replies = super()._chat(requests, sampling)
        return [
            Reply([replace(c, logprobs=fake_logprobs(c.text, r)) for c in reply.completions])
            if r.top_logprobs
            else reply
            for r, reply in zip(requests, replies, strict=True)
        ]


@pytest.fixture
def logprob_engine(monkeypatch) -> LogprobEngine:
    engine = LogprobEngine()

    def make(llm: LLMSpec, options: EngineParams) -> LogprobEngine:
        engine.llm, engine.options = llm, options
        return engine

    monkeypatch.setattr("stages.core.runtime.executors.make_engine", make)
    return engine


def notes(workspace: Path) -> list[dict]:
    rows = pq.read_table(workspace / "data/scored/gemma3.parquet", columns=["annotations"]).to_pylist()
    return [n for r in rows for n in r["annotations"] or []]


def set_mode(workspace: Path, mode: str) -> None:
    set_params(workspace, lambda d: d["models"]["gemma3"]["score"].update(mode=mode))


def test_a_mode_change_judges_again_and_logprob_mode_scores_the_expected_rating(
    workspace, monkeypatch, logprob_engine
):
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    run_stage(monkeypatch, "generate", "gemma3")
    run_stage(monkeypatch, "score", "gemma3")
    parsed = notes(workspace)
    assert parsed and all(n["preference_score"] == parse_score(n["judgement"]) for n in parsed)

    set_mode(workspace, "logprob")
    before = len(logprob_engine.requests)
    run_stage(monkeypatch, "score", "gemma3")
    asked = [r for r in logprob_engine.requests[before:] if "impartial judge" in r.messages[-1]["content"]]
    weighted = notes(workspace)
    # neither the parse-mode shards nor the cached parse-mode judgements answer a logprob request
    assert len(asked) == len(parsed) and all(r.top_logprobs == 20 and r.logprobs_after == "[[" for r in asked)
    assert [n["judgement"] for n in weighted] == [n["judgement"] for n in parsed]  # same greedy texts
    for n in weighted:
        k = parse_score(n["judgement"])
        assert n["preference_score"] == (k + other_rating(k)) / 2, n["judgement"]
    assert any(n["preference_score"] % 1 for n in weighted)  # the expectation, not the text's integer

    set_mode(workspace, "parse")  # back: the parse-mode shards are reused, nothing is asked
    before = len(logprob_engine.requests)
    run_stage(monkeypatch, "score", "gemma3")
    assert logprob_engine.requests[before:] == [] and notes(workspace) == parsed


def test_structured_mode_on_the_transformers_backend_is_refused_up_front(workspace, monkeypatch, fake_engine):
    set_mode(workspace, "structured")
    with pytest.raises(
        ParamsError, match=r"models\.gemma3\.score\.mode='structured'.*engine\.backend='transformers'"
    ):
        run_stage(monkeypatch, "score", "gemma3")
    assert fake_engine.requests == [] and fake_engine.loads == 0


def test_the_transformers_engine_returns_logprobs_and_refuses_a_json_schema():
    engine = make_engine(
        LLMSpec(model=TINY, dtype="float32"), EngineParams(backend="transformers", batch_size=8)
    )
    messages = [{"role": "user", "content": "こんにちは"}]
    with engine:
        asked, plain = engine.chat(
            [ChatRequest(messages, top_logprobs=3), ChatRequest(messages)],
            Sampling(temperature=0.0, max_tokens=6),
        )
        with pytest.raises(PipelineError, match="transformers engine has no structured output"):
            engine.chat(
                [ChatRequest(messages, seed=1, json_schema=JUDGEMENT_SCHEMA)],
                Sampling(temperature=0, max_tokens=4),
            )
    [completion], [unasked] = asked.completions, plain.completions
    assert unasked.logprobs is None and unasked.text == completion.text
    assert len(completion.logprobs) == completion.completion_tokens - (completion.finish_reason == "stop") > 0
    for token, alternatives in completion.logprobs:
        assert token in alternatives and 1 <= len(alternatives) <= 4
        assert (
            all(v <= 0 for v in alternatives.values())
            and sum(map(math.exp, alternatives.values())) <= 1 + 1e-5
        )
        assert alternatives[token] >= max(alternatives.values()) - 1e-6  # greedy: the most likely token


# --- a server that ignores the mode asked: the parse score, and status mode_ignored ----------------


@dataclass
class HonouringEngine(LogprobEngine):
    """Follows a json_schema: JSON whose "rating" is other_rating of the plain judgement's own (so the
    structured score is told from the parse score); returns logprobs where asked (LogprobEngine)."""

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        replies = super()._chat(requests, sampling)
        return [
            Reply([replace(c, text=as_json(c.text)) for c in reply.completions]) if r.json_schema else reply
            for r, reply in zip(requests, replies, strict=True)
        ]


def as_json(text: str) -> str:
    return json.dumps({"explanation": text, "rating": other_rating(int(parse_score(text)))})


def judged_texts(notes: list[list[dict]]) -> list[str]:
    return [n["judgement"] for row in notes for n in row]


@pytest.mark.parametrize("mode", ["structured", "logprob"])
def test_a_mode_the_server_ignores_gives_the_parse_score_and_status_mode_ignored(mode):
    engine = FakeEngine()  # plain "... Rating: [[k]]" text, no logprobs, whatever the request asks
    found, statuses = judge_rows(engine, judge_input(3, 2), spec(mode), seed=0)
    assert statuses == [[MODE_IGNORED] * 2] * 3
    texts = judged_texts(found)
    assert all(re.fullmatch(r"The answer is relevant and fluent\. Rating: \[\[\d+\]\]", t) for t in texts)
    scores = [n["preference_score"] for row in found for n in row]
    assert scores == [float(re.search(r"\[\[(\d+)\]\]", t)[1]) for t in texts]
    asked = engine.requests  # the mode was asked for: the server is what ignored it
    assert all((r.json_schema is not None) == (mode == "structured") for r in asked)
    assert all(r.top_logprobs == (20 if mode == "logprob" else 0) for r in asked)


@pytest.mark.parametrize("mode", ["parse", "structured", "logprob"])
def test_a_mode_the_server_honours_stays_ok_and_is_scored_by_it(mode):
    found, statuses = judge_rows(HonouringEngine(), judge_input(3, 2), spec(mode), seed=0)
    assert statuses == [[OK] * 2] * 3
    for text, n in zip(judged_texts(found), (n for row in found for n in row), strict=True):
        if mode == "structured":
            plain = json.loads(text)["explanation"]
            assert n["preference_score"] == other_rating(int(parse_score(plain))) != parse_score(plain)
        elif mode == "logprob":
            k = parse_score(text)
            assert n["preference_score"] == (k + other_rating(k)) / 2 != k
        else:
            assert n["preference_score"] == parse_score(text) != FAILED


def test_only_an_ok_reply_becomes_mode_ignored():
    engine = FakeEngine(refuse=("回答 0-1",))  # the engine fails that one request
    found, statuses = judge_rows(
        engine,
        [*judge_input(1, 3), {**judge_input(1, 1)[0], "responses_ja": None}],
        spec("structured"),
        seed=0,
    )
    assert statuses == [[MODE_IGNORED, FAILED_REQUEST, MODE_IGNORED], None]
    assert [n["preference_score"] == FAILED for n in found[0]] == [False, True, False]
    assert found[1] is None
    cut = Reply([Completion('{"explanation": "Rating: [[6]]", "rati', "length", 9, 64)])
    assert judge_status(cut, "structured") == TRUNCATED  # cut at max_tokens: final, its own status
    assert score_of(cut.completions[0], "structured") == 6.0  # the text's own rating
    assert judge_status(replace(cut, status="partial"), "structured") == "partial"  # already not final
    assert judge_status(Reply([], "skipped_too_long"), "logprob") == "skipped_too_long"
    assert judge_status(Reply([Completion("no rating", "stop", 1, 1)]), "parse") == OK


RATED_TOKENS = [["Rating: ", {}], ["[[", {}], ["7", {"7": LOG(0.5), "8": LOG(0.5)}], ["]]", {}]]
NO_RATING_TOKENS = [["Rating: ", {}], ["[[", {}], ["**", {"**": LOG(0.9)}], ["]]", {}]]


TINY_TOKENS = [  # the tiny model writes "Rating: [[k]]" as one token
    ["Good. ", {}],
    ["Rating: [[7]]", {"Rating: [[7]]": LOG(0.5), "Rating: [[9]]": LOG(0.25), "Rating: [[1]]": LOG(0.25)}],
]


@pytest.mark.parametrize(
    ("completion", "mode", "honoured", "score", "status"),
    [
        (Completion('{"explanation": "ok", "rating": 7}', "stop", 1, 1), "structured", "structured", 7.0, OK),
        (
            Completion('{"explanation": "ok", "rating": 7.5}', "stop", 1, 1),
            "structured",
            "structured",
            7.5,
            OK,
        ),
        (
            Completion('{"explanation": "Rating: [[2]]", "rating": 0}', "stop", 1, 1),
            "structured",
            "structured",
            0.0,
            OK,
        ),
        # plain text for a schema: the server ignored the mode (asked again, never cached)
        (Completion("Good. Rating: [[7]]", "stop", 1, 1), "structured", "parse", 7.0, MODE_IGNORED),
        # JSON cut at max_tokens: the schema was honoured, the tokens ran out (final, its own status)
        (
            Completion('{"explanation": "Rating: [[6]]", "rati', "length", 1, 1),
            "structured",
            "parse",
            6.0,
            TRUNCATED,
        ),
        (
            Completion('{"explanation": "x", "rating": 11}', "stop", 1, 1),
            "structured",
            "parse",
            FAILED,
            PARSED,
        ),
        (  # a string is not the schema's rating, but the text's JSON_FIELD rating
            Completion('{"explanation": "x", "rating": "7"}', "stop", 1, 1),
            "structured",
            "parse",
            7.0,
            PARSED,
        ),
        (
            Completion('{"explanation": "x", "rating": true}', "stop", 1, 1),
            "structured",
            "parse",
            FAILED,
            PARSED,
        ),
        (
            Completion('{"explanation": "x", "rating": NaN}', "stop", 1, 1),
            "structured",
            "parse",
            FAILED,
            PARSED,
        ),
        (Completion("Rating [7", "stop", 1, 1), "structured", "parse", FAILED, MODE_IGNORED),
        (judged(RATED_TOKENS), "logprob", "logprob", 7.5, OK),
        (
            judged(RATED_TOKENS, "Rating: [[9]]"),
            "logprob",
            "logprob",
            7.5,
            OK,
        ),  # the alternatives, not the text
        (judged(TINY_TOKENS), "logprob", "logprob", 0.5 * 7 + 0.25 * 9 + 0.25 * 1, OK),
        (Completion("Rating: [[4]]", "stop", 1, 1), "logprob", "parse", 4.0, MODE_IGNORED),  # logprobs None
        (judged([], "Rating: [[4]]"), "logprob", "parse", 4.0, PARSED),  # logprobs [], honoured
        (judged(NO_RATING_TOKENS, "Rating: [[6]]"), "logprob", "parse", 6.0, PARSED),
        (judged(NO_RATING_TOKENS), "logprob", "parse", FAILED, PARSED),
        (
            replace(judged(NO_RATING_TOKENS), finish_reason="length"),
            "logprob",
            "parse",
            FAILED,
            TRUNCATED,
        ),
        (judged(RATED_TOKENS), "parse", "parse", 7.0, OK),
        (Completion('{"rating": 3}', "stop", 1, 1), "parse", "parse", 3.0, OK),
        (Completion("No rating here", "stop", 1, 1), "parse", "parse", FAILED, OK),
        (Completion("The answer is cut", "length", 1, 1), "parse", "parse", FAILED, TRUNCATED),
    ],
)
def test_the_score_and_status_follow_the_mode_the_judgement_honours(
    completion, mode, honoured, score, status
):
    assert effective_mode(completion, mode) == honoured
    assert score_of(completion, mode) == pytest.approx(score)
    assert judge_status(Reply([completion]), mode) == status


def test_a_judgement_is_cached_exactly_when_it_is_not_mode_ignored():
    """One rule (requests.honours) decides for the response cache and the judge: a reply the cache
    keeps is never MODE_IGNORED (which would loop: answered from the cache, asked again, forever)."""
    cases = [
        (Completion("Good. Rating: [[7]]", "stop", 1, 1), "structured"),
        (Completion('{"explanation": "x", "rati', "length", 1, 1), "structured"),
        (Completion('{"explanation": "x", "rating": 4}', "stop", 1, 1), "structured"),
        (Completion("Rating: [[4]]", "stop", 1, 1), "logprob"),
        (judged(NO_RATING_TOKENS), "logprob"),
        (judged(TINY_TOKENS), "logprob"),
    ]
    for completion, mode in cases:
        request = judge_request(spec(mode), "q", "a", seed=1)
        status = judge_status(Reply([completion]), mode)
        assert cacheable(Reply([completion]), request) == (status != MODE_IGNORED), (completion, mode)


# --- the openai engine against the local fake vLLM server ----------------------------------------


def judge_input(conversations: int, responses: int) -> list[dict]:
    """Rows to judge: `conversations` questions with `responses` answers each ("回答 i-j")."""
    return [
        {
            "conversation_id": f"c{i}",
            "instruction_ja": f"質問 {i}",
            "responses_ja": [{"content": f"回答 {i}-{j}", "completion_tokens": 5} for j in range(responses)],
        }
        for i in range(conversations)
    ]


def judge_on_server(monkeypatch, server: FakeVLLMServer, mode: str) -> list[dict]:
    pytest.importorskip("openai")
    monkeypatch.setenv("JUDGE_MODES_KEY", "sk-local")
    options = EngineParams(
        backend="openai", batch_size=8, base_url=server.base_url, api_key_env="JUDGE_MODES_KEY"
    )
    rows = judge_input(4, 3)
    with make_engine(LLMSpec(model="fake"), options) as engine:
        found, statuses = judge_rows(engine, rows, spec(mode), seed=0)
    assert statuses == [["ok"] * 3] * 4
    return [n for row in found for n in row]


def test_structured_mode_sends_the_schema_and_scores_the_constrained_rating(monkeypatch):
    with FakeVLLMServer(median_tokens=12, keep_bodies=True) as server:
        scored = judge_on_server(monkeypatch, server, "structured")
        bodies = server.bodies
    assert len(bodies) == 12
    assert all(
        b["response_format"]
        == {
            "type": "json_schema",
            "json_schema": {"name": "judgement", "schema": JUDGEMENT_SCHEMA, "strict": True},
        }
        for b in bodies
    )
    assert all("top_logprobs" not in b for b in bodies)
    for n in scored:
        judgement = json.loads(n["judgement"])  # the server followed the schema
        assert list(judgement) == ["explanation", "rating"] and judgement["rating"] in range(11)
        assert n["preference_score"] == judgement["rating"]
    assert len({n["preference_score"] for n in scored}) > 1


def test_logprob_mode_asks_the_server_for_top_logprobs_and_weighs_the_ratings(monkeypatch):
    with FakeVLLMServer(median_tokens=12, keep_bodies=True) as server:
        scored = judge_on_server(monkeypatch, server, "logprob")
        bodies = server.bodies
    assert all(
        b["logprobs"] is True and b["top_logprobs"] == 20 and "response_format" not in b for b in bodies
    )
    for n in scored:  # the fake's rating r has alternatives r, r+1, r+2 (mod 11) at 0.5, 0.3, 0.2
        r = int(parse_score(n["judgement"]))
        expected = 0.5 * r + 0.3 * ((r + 1) % 11) + 0.2 * ((r + 2) % 11)
        assert n["preference_score"] == pytest.approx(expected, abs=1e-9), n["judgement"]


def test_parse_mode_asks_the_server_for_neither(monkeypatch):
    with FakeVLLMServer(median_tokens=12, keep_bodies=True) as server:
        scored = judge_on_server(monkeypatch, server, "parse")
        bodies = server.bodies
    assert all("top_logprobs" not in b and "response_format" not in b for b in bodies)
    assert all(n["preference_score"] == parse_score(n["judgement"]) != FAILED for n in scored)


# --- the vllm engine's side, on stand-ins for vllm's types (tests/test_vllm_api.py: on real vllm) ---


def test_vllm_logprobs_become_the_expected_rating():
    def step(*alternatives: tuple[int, str, float]) -> dict:
        return {i: types.SimpleNamespace(logprob=lp, decoded_token=t) for i, t, lp in alternatives}

    output = types.SimpleNamespace(
        token_ids=[11, 12, 13, 14],
        logprobs=[
            step((11, "Rating: ", 0.0)),
            step((12, "[[", 0.0)),
            step(
                (13, "7", LOG(0.5)), (15, "8", LOG(0.3)), (16, "8", LOG(0.2))
            ),  # two ids that read "8" add up
            step((14, "]]", 0.0)),
        ],
    )
    request = ChatRequest([], top_logprobs=3, logprobs_after="[[")
    tokens = vllm_engine._logprobs(output, request)
    assert tokens == [
        ["Rating: ", {}],
        ["[[", {}],
        ["7", {"7": LOG(0.5), "8": pytest.approx(LOG(0.5))}],
        ["]]", {"]]": 0.0}],
    ]
    assert expected_rating(judged(tokens)) == pytest.approx(7.5)


def test_vllm_sampling_params_carry_the_schema_or_the_logprobs():
    @dataclass
    class Params:  # stands in for vllm's StructuredOutputsParams
        json: dict

    api = vllm_engine.VLLMApi(dict, Params, RuntimeError, (), lambda: None)  # SamplingParams(**args): args
    sampling = Sampling(temperature=0.0, max_tokens=9)
    structured = api.params(judge_request(spec("structured"), "q", "a", 3), sampling)
    assert structured == {
        "n": 1,
        "seed": 3,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 9,
        "structured_outputs": Params(JUDGEMENT_SCHEMA),
    }
    logprob = api.params(judge_request(spec("logprob"), "q", "a", 3), sampling)
    assert logprob["logprobs"] == 20 and "structured_outputs" not in logprob
