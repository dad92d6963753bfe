"""vLLM without vLLM: benchmarks/fake_vllm.py behaves like `vllm serve` for the real openai client,
faults included; and the vllm engine works on a fake `vllm.LLM` (the part of its offline API the engine
uses, attached through `VLLMEngine.attach`): n completions, seeds, isolation of a refused request, a dead
engine core, aborts. tests/test_vllm_api.py runs the same engine on the installed vllm's own code."""

from __future__ import annotations

import re
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from benchmarks.fake_vllm import FakeVLLMServer, Faults
from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.config.errors import PipelineError
from stages.core.engines import FAILED, OK, PARTIAL, REFUSED, TOO_LONG, ChatRequest, EngineDown
from stages.core.engines.vllm import VLLMApi, VLLMEngine, check_arguments

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


# --- VLLMEngine on a fake vllm.LLM -------------------------------------------------------------------

SAMPLING = Sampling(temperature=0.6, top_p=0.9, max_tokens=16)
PROCESSOR_TEMPLATE = "<processor template>"  # the chat template vLLM resolves; it adds 8 tokens


class EngineDead(RuntimeError):
    """Stands for vllm.v1.engine.exceptions.EngineDeadError."""


class Refused(Exception):
    """Stands for vllm.exceptions.VLLMValidationError (not a ValueError in vLLM 0.33)."""


@dataclass(frozen=True)
class Structured:
    json: dict


class Params:
    """Stands for vllm.SamplingParams: keeps its arguments, refuses n < 1 as vLLM does."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs["n"] < 1:
            raise ValueError(f"n must be at least 1, got {kwargs['n']}.")
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


def render(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class Tokenizer:
    """One token per character of `role: content` lines, plus 8 under PROCESSOR_TEMPLATE."""

    def apply_chat_template(self, messages, chat_template, tokenize: bool, add_generation_prompt: bool):
        assert tokenize and add_generation_prompt
        return [0] * (len(render(messages)) + (8 if chat_template == PROCESSOR_TEMPLATE else 0))


class FakeLLM:
    """The offline API of vllm.LLM that the engine uses. `enqueue_chat` renders each chat, refuses one
    holding "☠" (removing what it had added, as vLLM does) and returns request ids; each `llm_engine.step`
    finishes the oldest request enqueued with n completions (j: `{prompt}#{j}`, j + 1 tokens, "stop" or
    "length"; `finish` overrides), the first one also returning `stale` outputs of requests this call
    did not send, or raises `fail` and leaves them running."""

    def __init__(self, max_model_len: int = 256) -> None:
        self.model_config = types.SimpleNamespace(max_model_len=max_model_len)
        self.llm_engine = types.SimpleNamespace(
            abort_request=self._abort,
            engine_core=self,
            has_unfinished_requests=lambda: bool(self.running),
            step=self._step,
        )
        self.running: dict[str, tuple[str, Any]] = {}
        self.calls: list[list[str]] = []  # the prompts of each enqueue_chat
        self.answered: list[str] = []
        self.aborted: list[str] = []
        self.params: list[Any] = []
        self.fail: BaseException | None = None
        self.fail_enqueue: BaseException | None = None
        self.finish: list[str] | None = None
        self.stale = 0  # outputs of requests this call did not send
        self.waits = self.shutdowns = self.cleanups = 0
        self._ids = iter(range(10**6))

    def get_tokenizer(self) -> Tokenizer:
        return Tokenizer()

    def enqueue_chat(self, messages, sampling_params, use_tqdm: bool = True) -> list[str]:
        assert use_tqdm is False and len(messages) == len(sampling_params)
        prompts = [render(chat) for chat in messages]
        self.calls.append(prompts)
        if self.fail_enqueue is not None:
            raise self.fail_enqueue
        added = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            if "☠" in prompt:
                for request_id in added:
                    del self.running[request_id]
                raise Refused("Token id 9760 is out of vocabulary (parameter=prompt_token_ids)")
            added.append(f"{next(self._ids)}-internal")
            self.running[added[-1]] = (prompt, params)
            self.params.append(params)
        return added

    def _step(self) -> list[Any]:
        self.waits += 1
        if self.fail is not None:
            raise self.fail
        request_id, (prompt, params) = next(iter(self.running.items()))
        del self.running[request_id]
        self.answered.append(prompt)
        stale = [self._output("stale", Params(n=1), f"stale-{k}") for k in range(self.stale)]
        self.stale = 0
        external = request_id.rsplit("-", 1)[0]  # outputs carry the id given to add_request, as vLLM's do
        return [*stale, self._output(prompt, params, external)]

    def _output(self, prompt: str, params: Any, request_id: str) -> Any:
        finish = self.finish or ["stop" if j % 2 == 0 else "length" for j in range(params.n)]
        completions = [
            types.SimpleNamespace(
                text=f"{prompt}#{j}", finish_reason=f, token_ids=[0] * (j + 1), logprobs=None
            )
            for j, f in enumerate(finish)
        ]
        return types.SimpleNamespace(
            request_id=request_id, finished=True, prompt_token_ids=[0] * len(prompt), outputs=completions
        )

    def _abort(self, request_ids: list[str], internal: bool = False) -> None:
        assert internal  # the ids enqueue_chat returns are vLLM's internal ones
        self.aborted += request_ids
        for request_id in request_ids:
            del self.running[request_id]

    def shutdown(self) -> None:  # llm_engine.engine_core.shutdown
        self.shutdowns += 1


def fake_api(fake: FakeLLM) -> VLLMApi:
    def cleanup() -> None:
        fake.cleanups += 1

    return VLLMApi(Params, Structured, EngineDead, (Refused, ValueError, TypeError), cleanup)


def on_fake(fake: FakeLLM, template: str | None = PROCESSOR_TEMPLATE, **llm: Any) -> VLLMEngine:
    engine = VLLMEngine(llm=LLMSpec(model="m", **llm), options=EngineParams(backend="vllm", batch_size=8))
    engine.attach(fake, fake_api(fake), template)
    return engine


def chats(*texts: str, n: int = 1) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": t}], n=n, seed=i) for i, t in enumerate(texts)]


def test_vllm_engine_gets_n_completions_with_each_requests_seed():
    fake = FakeLLM()
    gemma = on_fake(fake, system_role=False)
    system = ChatRequest(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], seed=9
    )
    replies = gemma.chat([*chats("first", "second", n=3), system], SAMPLING)
    assert [r.status for r in replies] == [OK, OK, OK]
    for reply, prompt in [(replies[0], "user: first"), (replies[1], "user: second")]:
        assert [c.text for c in reply.completions] == [f"{prompt}#{j}" for j in range(3)]
        assert [c.finish_reason for c in reply.completions] == ["stop", "length", "stop"]
        assert [(c.prompt_tokens, c.completion_tokens) for c in reply.completions] == [
            (len(prompt), j + 1) for j in range(3)
        ]
    assert [c.text for c in replies[2].completions] == ["user: Be brief.\n\nHi#0"]  # no system role
    assert fake.calls == [["user: first", "user: second", "user: Be brief.\n\nHi"]]  # one call, one batch
    expected = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 16}
    assert [p.kwargs for p in fake.params] == [
        {"n": n, "seed": seed, **expected} for n, seed in [(3, 0), (3, 1), (1, 9)]
    ]


def test_vllm_engine_sends_top_k_and_penalties_where_set():
    fake = FakeLLM()
    knobs = {"top_k": 20, "frequency_penalty": 0.4, "repetition_penalty": 1.05}
    on_fake(fake).chat(chats("a"), Sampling(temperature=0.6, max_tokens=16, **knobs))
    on_fake(fake).chat(chats("b"), Sampling(temperature=0.6, max_tokens=16, top_k=-1))  # -1: off
    first, second = (p.kwargs for p in fake.params)
    assert first == {"n": 1, "seed": 0, "temperature": 0.6, "top_p": 1.0, "max_tokens": 16, **knobs}
    assert not set(knobs) & set(second)  # unset: vLLM's own defaults, the same


def test_vllm_engine_counts_prompts_with_the_template_vllm_renders():
    fake = FakeLLM(max_model_len=256)
    fits = "x" * (256 - 16 - len("user: "))  # fits the tokenizer's own template, not the processor's
    assert [r.status for r in on_fake(fake, template=None).chat(chats(fits), SAMPLING)] == [OK]
    [reply] = on_fake(fake).chat(chats(fits), SAMPLING)
    assert reply.status == TOO_LONG and "248 prompt tokens > 256 - 16" in reply.detail
    assert len(fake.calls) == 1  # the one too long was not sent


def test_vllm_engine_fails_a_refused_request_alone():
    fake = FakeLLM()
    replies = on_fake(fake).chat([*chats("first", "bad ☠", "second"), *chats("zero", n=0)], SAMPLING)
    assert [r.status for r in replies] == [OK, REFUSED, OK, REFUSED]  # final: never asked again
    assert replies[1].detail == "Refused: Token id 9760 is out of vocabulary (parameter=prompt_token_ids)"
    assert replies[3].detail == "ValueError: n must be at least 1, got 0."
    assert sorted(fake.answered) == ["user: first", "user: second"] and not fake.running


@pytest.mark.parametrize("where", ["enqueue", "generation"])
def test_a_dead_vllm_engine_stops_the_stage(where):
    fake = FakeLLM()
    if where == "enqueue":
        fake.fail_enqueue = EngineDead("EngineCore encountered an issue")
    else:
        fake.fail = EngineDead("EngineCore encountered an issue")
    engine, replies = on_fake(fake), None
    with pytest.raises(EngineDown, match=r"^m: the vLLM engine died \(EngineDead: EngineCore") as down:
        replies = engine.chat(chats("a", "b", "c"), SAMPLING)
    assert replies is None and isinstance(down.value, PipelineError)
    assert len(fake.calls) == 1 and fake.aborted == []  # not split, nothing aborted in a dead engine


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), RuntimeError("CUDA error")], ids=["interrupt", "error"]
)
def test_vllm_engine_aborts_an_interrupted_call_and_closes_without_waiting(error):
    fake = FakeLLM()
    fake.fail = error
    with pytest.raises(type(error)), on_fake(fake) as engine:
        engine.chat(chats("a", "b", n=2), SAMPLING)
    assert fake.aborted == ["0-internal", "1-internal"] and not fake.running
    assert len(fake.calls) == 1 and fake.waits == 1  # not split, and close waited for nothing
    assert (fake.shutdowns, fake.cleanups) == (1, 1) and engine._llm is None


def test_vllm_engine_reads_what_vllm_ended_otherwise():
    fake = FakeLLM()
    engine = on_fake(fake)
    fake.finish = ["abort", "abort"]
    [reply] = engine.chat(chats("a", n=2), SAMPLING)
    assert reply.status == FAILED and reply.detail == "vLLM ended every completion with abort"
    fake.finish = ["stop", "abort"]
    [reply] = engine.chat(chats("a", n=2), SAMPLING)
    assert reply.status == PARTIAL and [c.text for c in reply.completions] == ["user: a#0"]
    fake.finish, fake.stale = None, 1  # an output of a request this call did not send is not its answer
    [reply] = engine.chat(chats("a"), SAMPLING)
    assert reply.status == OK and [c.text for c in reply.completions] == ["user: a#0"]


def test_vllm_engine_asks_judge_modes_for_a_schema_and_logprobs():
    from stages.core.rows.judge import JUDGEMENT_SCHEMA

    fake = FakeLLM()
    structured = ChatRequest([{"role": "user", "content": "q"}], json_schema=JUDGEMENT_SCHEMA)
    logprob = ChatRequest([{"role": "user", "content": "q"}], top_logprobs=20, logprobs_after="[[")
    on_fake(fake).chat([structured, logprob], Sampling(temperature=0.0, max_tokens=9))
    first, second = (p.kwargs for p in fake.params)
    assert first["structured_outputs"] == Structured(JUDGEMENT_SCHEMA) and "logprobs" not in first
    assert second["logprobs"] == 20 and "structured_outputs" not in second


def test_vllm_engine_args_place_the_model_and_pass_engine_kwargs():
    llm = LLMSpec(
        model="org/model",
        revision="a" * 40,
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        max_model_len=8192,
        dtype="bfloat16",
        quantization="fp8",
        engine_kwargs={"kv_cache_dtype": "fp8", "limit_mm_per_prompt": {"image": 0}},
    )
    options = EngineParams(backend="vllm", batch_size=1, gpu_memory_utilization=0.85)
    assert VLLMEngine(llm=llm, options=options).engine_args() == {
        "model": "org/model",
        "revision": "a" * 40,
        "tokenizer_revision": "a" * 40,
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "max_model_len": 8192,
        "dtype": "bfloat16",
        "quantization": "fp8",
        "gpu_memory_utilization": 0.85,
        "kv_cache_dtype": "fp8",
        "limit_mm_per_prompt": {"image": 0},
    }


@pytest.mark.parametrize("name", ["tensor_parallel_size", "gpu_memory_utilization", "revision"])
def test_engine_kwargs_may_not_override_a_first_class_field(name):
    llm = LLMSpec(model="m", engine_kwargs={name: 2, "kv_cache_dtype": "fp8"})
    with pytest.raises(PipelineError, match=name):
        VLLMEngine(llm=llm, options=EngineParams(backend="vllm", batch_size=1)).engine_args()


def test_check_arguments_names_every_unknown_argument():
    check_arguments({"model": "m", "dtype": "auto"}, {"model", "dtype", "seed"}, "vllm X LLM()", "m")
    with pytest.raises(PipelineError, match=r"m: vllm X LLM\(\) takes no argument bogus, nope"):
        check_arguments({"model": "m", "nope": 1, "bogus": 2}, {"model"}, "vllm X LLM()", "m")


def test_vllm_engine_stops_at_the_next_step_keeping_the_answers_that_finished(tmp_path):
    """stop() (SIGINT, SIGTERM) is seen at the next engine step: the call's unfinished requests are
    aborted and it raises Interrupted; each request that finished went into the response cache as it
    ended, so a re-run sends only the others."""
    from stages.core.engines import Interrupted
    from stages.core.storage.cache import ResponseCache

    fake = FakeLLM()
    engine = on_fake(fake)
    engine.cache = ResponseCache(tmp_path / "cache.sqlite")
    steps = fake._step

    def step_then_stop() -> list:
        out = steps()
        if len(fake.answered) == 2:
            engine.stop()
        return out

    fake.llm_engine.step = step_then_stop
    with pytest.raises(Interrupted, match="interrupted"):
        engine.chat(chats("a", "b", "c", "d"), SAMPLING)
    assert fake.answered == ["user: a", "user: b"] and fake.aborted == ["2-internal", "3-internal"]
    assert engine.cache.counts()["cache_stored"] == 2
    again = on_fake(FakeLLM())
    again.cache = engine.cache
    replies = again.chat(chats("a", "b", "c", "d"), SAMPLING)
    assert again._llm.answered == ["user: c", "user: d"] and all(r.status == OK for r in replies)
