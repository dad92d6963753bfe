"""Engines under load, without a GPU: the vLLM feeder that keeps one batch running across calls (on a
fake LLMEngine and a stub `vllm` module), the openai engine over several local fake vLLM servers, and
the one-call-at-a-time rule of engines that do not batch across calls."""

from __future__ import annotations

import dataclasses
import itertools
import sys
import threading
import time
import types
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from benchmarks.fake_vllm import FakeVLLMServer, Faults
from stages.core.engines import FAILED, OK, TOO_LONG, ChatRequest, make_engine
from stages.core.engines.vllm import VLLMEngine, _Feeder, _Rejected, accepted_engine_args, check_arguments
from stages.core.errors import PipelineError
from stages.core.params import EngineParams, LLMSpec, Sampling
from tests.conftest import FakeEngine

SAMPLING = Sampling(temperature=0.7, max_tokens=16)
MARKER = ord("☠")  # a token id the fake engine refuses, as vLLM refuses one outside its vocabulary
WAIT = 10.0  # seconds any future may take before the test fails instead of hanging


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


class FakeLLMEngine:
    """What `_Feeder` uses of vLLM's LLMEngine. `add_request` queues a request, or refuses (ValueError)
    one whose prompt holds MARKER; each `step` finishes up to `per_step` requests, oldest first, and
    reports the others as unfinished partial outputs, as vLLM's cumulative outputs do. Only the feeder
    thread calls it. A step while nothing is running is counted: vLLM's multiprocess engine client
    would block in it forever, waiting for an output that no request will produce."""

    def __init__(
        self,
        per_step: int = 1,
        step_s: float = 0.0,
        fail_on_step: int | None = None,
        max_model_len: int = 4096,
    ) -> None:
        self.per_step, self.step_s, self.fail_on_step = per_step, step_s, fail_on_step
        self.running: dict[str, tuple[list[int], Any]] = {}
        self.added: list[tuple[str, set[str]]] = []  # each prompt added, and the prompts unfinished then
        self.request_ids: list[str] = []
        self.params: list[Any] = []  # the sampling parameters of each request added
        self.steps = self.idle_steps = 0
        self.gate = threading.Event()  # cleared: step() waits, so requests pile up in the feeder's inbox
        self.gate.set()
        self.model_config = types.SimpleNamespace(max_model_len=max_model_len)
        self.shutdowns = 0
        self.engine_core = types.SimpleNamespace(shutdown=self._shutdown)

    def _shutdown(self) -> None:
        self.shutdowns += 1

    def add_request(self, request_id: str, prompt: dict, params: Any) -> str:
        assert isinstance(request_id, str) and request_id not in self.request_ids
        ids = list(prompt["prompt_token_ids"])
        if MARKER in ids:
            raise ValueError(f"token id {MARKER} is out of vocabulary")
        self.added.append((decode(ids), {decode(p) for p, _ in self.running.values()}))
        self.request_ids.append(request_id)
        self.params.append(params)
        self.running[request_id] = (ids, params)
        return request_id

    def step(self) -> list[types.SimpleNamespace]:
        assert self.gate.wait(WAIT)
        self.steps += 1
        self.idle_steps += not self.running
        if self.steps == self.fail_on_step:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        time.sleep(self.step_s)
        done = list(self.running)[: self.per_step]
        outputs = [self._output(rid, rid in done) for rid in self.running]
        for rid in done:
            del self.running[rid]
        return outputs

    def _output(self, request_id: str, finished: bool) -> types.SimpleNamespace:
        ids, params = self.running[request_id]
        completions = [
            types.SimpleNamespace(
                text=f"{decode(ids)}#{j}" if finished else "partial",
                finish_reason=("length" if j % 2 else "stop") if finished else None,
                token_ids=list(range(j + 1)),
            )
            for j in range(getattr(params, "n", 1))
        ]
        return types.SimpleNamespace(
            request_id=request_id, finished=finished, prompt_token_ids=ids, outputs=completions
        )


@pytest.fixture
def feeders():
    """Feeders made by the test, each closed at the end (its thread joined)."""
    made: list[_Feeder] = []

    def make(engine: FakeLLMEngine) -> _Feeder:
        made.append(_Feeder(engine))
        return made[-1]

    yield make
    for feeder in made:
        feeder.close()
        assert not feeder._thread.is_alive()


def submit(feeder: _Feeder, text: str, n: int = 1) -> Future:
    return feeder.submit({"prompt_token_ids": encode(text)}, types.SimpleNamespace(n=n))


def test_feeder_answers_each_of_two_threads_with_its_own_outputs(feeders):
    feeder = feeders(FakeLLMEngine(per_step=3, step_s=0.001))
    start, answers = threading.Barrier(2), {}

    def client(name: str) -> None:
        start.wait()
        texts = [f"{name}{i}" for i in range(15)]
        futures = [submit(feeder, t, n=2) for t in texts]
        answers[name] = [(t, f.result(WAIT)) for t, f in zip(texts, futures, strict=True)]

    threads = [threading.Thread(target=client, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert sorted(answers) == ["a", "b"]
    for text, out in answers["a"] + answers["b"]:
        assert out.finished and decode(out.prompt_token_ids) == text
        assert [o.text for o in out.outputs] == [f"{text}#0", f"{text}#1"]  # final, not partial outputs


def test_feeder_adds_a_second_threads_requests_to_the_running_batch(feeders):
    """The engine never drains between calls: requests of a second caller join the batch while the
    first caller's requests are still generating."""
    engine = FakeLLMEngine(per_step=1, step_s=0.01)
    feeder = feeders(engine)
    first_done, results = threading.Event(), {}

    def first() -> None:
        futures = [submit(feeder, f"a{i}") for i in range(8)]
        futures[0].result(WAIT)
        first_done.set()
        results["a"] = [f.result(WAIT) for f in futures]

    def second() -> None:
        assert first_done.wait(WAIT)
        results["b"] = [f.result(WAIT) for f in [submit(feeder, f"b{i}") for i in range(4)]]

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert [o.outputs[0].text for o in results["a"]] == [f"a{i}#0" for i in range(8)]
    assert [o.outputs[0].text for o in results["b"]] == [f"b{i}#0" for i in range(4)]
    unfinished_a = [
        {p for p in running if p.startswith("a")} for prompt, running in engine.added if prompt == "b0"
    ]
    assert unfinished_a and unfinished_a[0], "b0 was added only after every request of the first caller"
    assert engine.idle_steps == 0


def test_feeder_fails_only_the_request_the_engine_rejects(feeders):
    engine = FakeLLMEngine(per_step=2)
    feeder = feeders(engine)
    texts = ["good 0", "bad ☠", "good 1", "good 2"]
    futures = [submit(feeder, t) for t in texts]
    error = futures[1].exception(WAIT)
    assert isinstance(error, _Rejected) and "out of vocabulary" in str(error)
    assert [futures[i].result(WAIT).outputs[0].text for i in (0, 2, 3)] == [
        "good 0#0",
        "good 1#0",
        "good 2#0",
    ]
    assert submit(feeder, "later").result(WAIT).outputs[0].text == "later#0"  # the feeder lives on
    assert [prompt for prompt, _ in engine.added] == ["good 0", "good 1", "good 2", "later"]


def test_feeder_never_steps_an_idle_engine(feeders):
    engine = FakeLLMEngine()
    feeder = feeders(engine)
    assert isinstance(submit(feeder, "alone ☠").exception(WAIT), _Rejected)
    assert submit(feeder, "next").result(WAIT).outputs[0].text == "next#0"  # after any step of the first
    assert engine.idle_steps == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_feeder_fails_every_waiting_request_when_the_engine_dies(feeders):
    engine = FakeLLMEngine(fail_on_step=1)
    engine.gate.clear()  # the first step waits: the other requests stay in the feeder's inbox
    feeder = feeders(engine)
    futures = [submit(feeder, f"q{i}") for i in range(5)]
    engine.gate.set()
    errors = [f.exception(WAIT) for f in futures]
    assert all(isinstance(e, RuntimeError) and "illegal memory access" in str(e) for e in errors)
    feeder._thread.join(WAIT)
    with pytest.raises(RuntimeError, match="stopped"):
        submit(feeder, "after")


def test_feeder_close_finishes_pending_work_then_returns():
    engine = FakeLLMEngine(per_step=1, step_s=0.005)
    feeder = _Feeder(engine)
    futures = [submit(feeder, f"q{i}") for i in range(10)]
    feeder.close()
    assert not feeder._thread.is_alive()
    assert [f.result(0).outputs[0].text for f in futures] == [f"q{i}#0" for i in range(10)]
    idle = _Feeder(FakeLLMEngine())
    began = time.monotonic()
    idle.close()
    assert not idle._thread.is_alive() and time.monotonic() - began < 1.0


# --- VLLMEngine on a stub vllm module -----------------------------------------------------------


class FakeTokenizer:
    """A chat template that writes `role: content` lines and one token per character."""

    def __init__(self, batch_encoding: bool) -> None:
        self.batch_encoding = batch_encoding  # transformers 5 returns a BatchEncoding, not a list

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool):
        assert tokenize and add_generation_prompt
        ids = encode("\n".join(f"{m['role']}: {m['content']}" for m in messages))
        return {"input_ids": ids} if self.batch_encoding else ids


@dataclass
class StubVLLM:
    """What the stub `vllm` module recorded."""

    batch_encoding: bool = False
    built: list[dict] = field(default_factory=list)  # the arguments of each vllm.LLM(...)
    engines: list[FakeLLMEngine] = field(default_factory=list)
    cleanups: int = 0


@pytest.fixture
def stub_vllm(monkeypatch) -> StubVLLM:
    """`vllm`, `vllm.engine.arg_utils` and `vllm.distributed.parallel_state` as the engine imports them:
    LLM takes some arguments by name and EngineArgs' fields through **kwargs, like vllm's."""
    stub = StubVLLM()

    class SamplingParams:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(
            self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto", **kwargs: Any
        ) -> None:
            stub.built.append({"model": model, "tensor_parallel_size": tensor_parallel_size, "dtype": dtype})
            stub.built[-1].update(kwargs)
            self.llm_engine = FakeLLMEngine(per_step=2, max_model_len=kwargs["max_model_len"])
            stub.engines.append(self.llm_engine)

        def get_tokenizer(self) -> FakeTokenizer:
            return FakeTokenizer(stub.batch_encoding)

    @dataclass
    class EngineArgs:
        revision: str | None = None
        tokenizer_revision: str | None = None
        pipeline_parallel_size: int = 1
        max_model_len: int | None = None
        quantization: str | None = None
        gpu_memory_utilization: float = 0.9
        kv_cache_dtype: str = "auto"

    def cleanup_dist_env_and_memory() -> None:
        stub.cleanups += 1

    modules = {
        "vllm": {"__version__": "0.0.stub", "LLM": LLM, "SamplingParams": SamplingParams},
        "vllm.engine": {},
        "vllm.engine.arg_utils": {"EngineArgs": EngineArgs},
        "vllm.distributed": {},
        "vllm.distributed.parallel_state": {"cleanup_dist_env_and_memory": cleanup_dist_env_and_memory},
        "vllm.sampling_params": {"RequestOutputKind": types.SimpleNamespace(FINAL_ONLY="final_only")},
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    return stub


def vllm_engine(**llm: Any) -> VLLMEngine:
    options = EngineParams(backend="vllm", batch_size=8, gpu_memory_utilization=0.5)
    return make_engine(LLMSpec(**({"model": "m", "max_model_len": 256} | llm)), options)


@pytest.mark.parametrize("batch_encoding", [False, True], ids=["ids", "batch_encoding"])
def test_vllm_engine_routes_replies_skips_too_long_and_fails_rejected(stub_vllm, batch_encoding):
    stub_vllm.batch_encoding = batch_encoding
    gemma = vllm_engine(system_role=False, engine_kwargs={"kv_cache_dtype": "fp8"})
    texts = ["first", "x" * 300, "bad ☠", "second"]
    requests = [ChatRequest([{"role": "user", "content": t}], n=3, seed=i) for i, t in enumerate(texts)]
    requests.append(
        ChatRequest(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], n=1, seed=9
        )
    )
    with gemma as engine:
        replies = engine.chat(requests, Sampling(temperature=0.6, top_p=0.9, max_tokens=16))
        feeder = engine._feeder
    assert [r.status for r in replies] == [OK, TOO_LONG, FAILED, OK, OK]
    assert "> 256 - 16" in replies[1].detail and "out of vocabulary" in replies[2].detail
    for reply, prompt in [(replies[0], "user: first"), (replies[3], "user: second")]:
        assert [c.text for c in reply.completions] == [f"{prompt}#{j}" for j in range(3)]
        assert [c.finish_reason for c in reply.completions] == ["stop", "length", "stop"]
        assert [(c.prompt_tokens, c.completion_tokens) for c in reply.completions] == [
            (len(prompt), j + 1) for j in range(3)
        ]
    assert [c.text for c in replies[4].completions] == ["user: Be brief.\n\nHi#0"]  # no system role
    [fake] = stub_vllm.engines
    assert [prompt for prompt, _ in fake.added] == ["user: first", "user: second", "user: Be brief.\n\nHi"]
    assert [p.kwargs for p in fake.params] == [
        {
            "n": n,
            "seed": seed,
            "temperature": 0.6,
            "top_p": 0.9,
            "max_tokens": 16,
            "output_kind": "final_only",
        }
        for n, seed in [(3, 0), (3, 3), (1, 9)]
    ]
    assert stub_vllm.built == [
        {
            "model": "m",
            "revision": None,
            "tokenizer_revision": None,
            "tensor_parallel_size": 1,
            "pipeline_parallel_size": 1,
            "max_model_len": 256,
            "dtype": "auto",
            "quantization": None,
            "gpu_memory_utilization": 0.5,
            "kv_cache_dtype": "fp8",
        }
    ]
    # unload: the feeder's thread ended, the engine core shut down, vLLM's clean-up ran
    assert not feeder._thread.is_alive() and fake.shutdowns == 1 and stub_vllm.cleanups == 1
    assert engine._feeder is None and engine._llm is None


def test_vllm_engine_checks_engine_kwargs_before_building_the_model(stub_vllm):
    engine = vllm_engine(engine_kwargs={"no_such_argument": 1})
    with pytest.raises(PipelineError, match="no_such_argument"):
        engine.chat([ChatRequest([{"role": "user", "content": "hi"}])], SAMPLING)
    assert stub_vllm.built == [] and not engine._loaded


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


def test_accepted_engine_args_are_llm_parameters_and_engine_args_fields(stub_vllm):
    names = accepted_engine_args(sys.modules["vllm"])
    engine_args = sys.modules["vllm.engine.arg_utils"].EngineArgs
    assert names == {"model", "tensor_parallel_size", "dtype"} | {
        f.name for f in dataclasses.fields(engine_args)
    }


# --- the openai engine over several servers ------------------------------------------------------


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
