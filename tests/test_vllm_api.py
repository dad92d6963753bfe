"""API drift check against the installed vllm (`make check-vllm`; skipped where vllm is not importable):
every argument the vllm engine passes exists there, and every attribute it reads. Needs no GPU, loads
no model and reaches no network; only importing vllm takes time."""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
from typing import Any

import pytest
import yaml

vllm = pytest.importorskip("vllm")

from vllm.config import ModelConfig  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.entrypoints import llm as llm_module  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402

from stages.compose import compose_params  # noqa: E402
from stages.core.engines import FAILED, OK, ChatRequest, Completion  # noqa: E402
from stages.core.engines.vllm import (  # noqa: E402
    VLLMEngine,
    _Feeder,
    accepted_engine_args,
    check_arguments,
    sampling_arguments,
)
from stages.core.params import EngineParams, LLMSpec, Sampling, validate  # noqa: E402

PRODUCTION = validate(yaml.safe_load(compose_params([])))
REJECTED = ord("☠")  # a token id the recording engine refuses, as vLLM refuses one outside its vocabulary


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


def test_sampling_arguments_are_sampling_params_fields_and_valid_values():
    fields = set(vllm.SamplingParams.__struct_fields__)  # a msgspec Struct in vllm 0.33
    init = parameters(vllm.SamplingParams)
    for where, n, sampling in production_calls():
        args = sampling_arguments(ChatRequest([{"role": "user", "content": "hi"}], n=n, seed=7), sampling)
        assert set(args) <= fields and set(args) <= set(init), where
        params = vllm.SamplingParams(**args)  # vLLM validates the values (greedy with n > 1, ...)
        assert {name: getattr(params, name) for name in args} == args, where


def test_judge_mode_arguments_are_valid_sampling_params():
    """Structured output (the judge's JSON schema) and logprobs, as judge modes structured and logprob ask."""
    from stages.core.judge import JUDGEMENT_SCHEMA

    fields = set(vllm.SamplingParams.__struct_fields__)
    sampling = Sampling(temperature=0.0, max_tokens=64)
    request = ChatRequest([{"role": "user", "content": "hi"}], json_schema=JUDGEMENT_SCHEMA, top_logprobs=20)
    args = sampling_arguments(request, sampling)
    assert set(args) <= fields and "logprobs" in args
    assert {"structured_outputs", "guided_decoding"} & set(args)  # vllm >= 0.11, or before
    params = vllm.SamplingParams(**args)
    guide = getattr(params, "structured_outputs", None) or getattr(params, "guided_decoding", None)
    assert params.logprobs == 20 and guide is not None and guide.json == JUDGEMENT_SCHEMA


def test_logprobs_of_a_completion_output_give_the_expected_rating():
    try:
        from vllm.logprobs import Logprob
    except ImportError:  # vllm before the logprobs module
        from vllm.sequence import Logprob
    from stages.core.engines.vllm import _logprobs
    from stages.core.judge import expected_rating

    steps = [
        {5: Logprob(0.0, 1, "Rating: [[")},
        {7: Logprob(-0.6931471805599453, 1, "7"), 8: Logprob(-0.6931471805599453, 2, "8")},
        {9: Logprob(0.0, 1, "]]")},
    ]
    out = CompletionOutput(0, "Rating: [[7]]", [5, 7, 9], None, steps, finish_reason="stop")
    request = ChatRequest([{"role": "user", "content": "hi"}], top_logprobs=2, logprobs_after="[[")
    tokens = _logprobs(out, request)
    assert [t for t, _ in tokens] == ["Rating: [[", "7", "]]"]
    assert expected_rating(Completion(out.text, "stop", 3, 3, logprobs=tokens)) == pytest.approx(7.5)


def test_llm_has_a_tokenizer_and_an_llm_engine():
    assert callable(vllm.LLM.get_tokenizer)
    assert re.search(r"self\.llm_engine\s*=\s*LLMEngine\b", inspect.getsource(vllm.LLM.__init__))
    source = inspect.getsource(llm_module.LLMEngine.__init__)
    assert re.search(r"self\.model_config\s*=", source) and re.search(r"self\.engine_core\s*=", source)
    assert "max_model_len" in {f.name for f in dataclasses.fields(ModelConfig)}


def test_llm_engine_takes_requests_by_position_and_steps():
    engine = llm_module.LLMEngine
    add = list(parameters(engine.add_request).values())
    assert [p.name for p in add[:4]] == ["self", "request_id", "prompt", "params"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in add[:4])
    assert all(p.default is not inspect.Parameter.empty for p in add[4:] if p.kind is not p.VAR_KEYWORD)
    assert list(parameters(engine.step)) == ["self"]
    assert "prompt_token_ids" in TokensPrompt.__required_keys__  # the prompt the feeder sends
    from vllm.v1.engine.core_client import EngineCoreClient

    assert callable(EngineCoreClient.shutdown)  # unload() shuts the engine core down


def test_outputs_carry_what_the_engine_reads():
    assert {"request_id", "finished", "prompt_token_ids", "outputs"} <= set(
        parameters(RequestOutput.__init__)
    )
    assert {"text", "finish_reason", "token_ids"} <= {f.name for f in dataclasses.fields(CompletionOutput)}


def test_cleanup_dist_env_and_memory_exists():
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    assert callable(cleanup_dist_env_and_memory)


# --- the engine on real vllm types, with a recording LLMEngine in place of the model ---------------


class RecordingEngine:
    """Keeps the SamplingParams of each request and answers it at the next step with a RequestOutput
    of n CompletionOutputs; refuses a prompt holding REJECTED the way vLLM 0.33 refuses one."""

    def __init__(self) -> None:
        self.params: list[Any] = []
        self.running: dict[str, tuple[list[int], Any]] = {}

    def add_request(self, request_id: str, prompt: dict, params: Any) -> str:
        if REJECTED in prompt["prompt_token_ids"]:
            raise VLLMValidationError("Token id 9760 is out of vocabulary", parameter="prompt_token_ids")
        self.params.append(params)
        self.running[request_id] = (prompt["prompt_token_ids"], params)
        return request_id

    def step(self) -> list[RequestOutput]:
        outputs = [
            RequestOutput(
                request_id=rid,
                prompt=None,
                prompt_token_ids=ids,
                prompt_logprobs=None,
                outputs=[
                    CompletionOutput(
                        index=j,
                        text=f"completion {j}",
                        token_ids=list(range(j + 2)),
                        cumulative_logprob=None,
                        logprobs=None,
                        finish_reason="length" if j else "stop",
                    )
                    for j in range(params.n)
                ],
                finished=True,
            )
            for rid, (ids, params) in self.running.items()
        ]
        self.running.clear()
        return outputs


class Tokenizer:
    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> list[int]:
        return [ord(c) for m in messages for c in m["content"]]


@pytest.fixture
def recorder() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture
def engine(recorder):
    """A loaded VLLMEngine on `recorder` instead of a model; its feeder is closed at the end."""
    engine = VLLMEngine(llm=LLMSpec(model="m"), options=EngineParams(backend="vllm", batch_size=8))
    model_config = types.SimpleNamespace(max_model_len=256)
    engine._llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(model_config=model_config))
    engine._tokenizer, engine._feeder, engine._loaded = Tokenizer(), _Feeder(recorder), True
    yield engine
    engine._feeder.close()


def test_the_engine_builds_sampling_params_and_reads_request_outputs(engine, recorder):
    requests = [
        ChatRequest([{"role": "user", "content": f"q{i}"}], n=n, seed=i) for i, n in enumerate((1, 3))
    ]
    replies = engine.chat(requests, Sampling(temperature=0.6, top_p=0.9, max_tokens=16))
    assert [r.status for r in replies] == [OK, OK]
    assert [
        [(c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in r.completions]
        for r in replies
    ] == [
        [("completion 0", "stop", 2, 2)],
        [("completion 0", "stop", 2, 2), ("completion 1", "length", 2, 3), ("completion 2", "length", 2, 4)],
    ]
    assert all(isinstance(p, vllm.SamplingParams) for p in recorder.params)


def test_the_feeder_asks_for_final_outputs_with_all_n_completions(engine, recorder):
    from vllm.v1.engine.parallel_sampling import ParentRequest

    engine.chat(
        [ChatRequest([{"role": "user", "content": "q"}], n=3, seed=1)],
        Sampling(temperature=0.6, max_tokens=8),
    )
    [params] = recorder.params
    # what vLLM's output processor returns for a request of n = 3 when its three samples finish
    parent = ParentRequest(types.SimpleNamespace(request_id="0-abcdefgh", external_req_id="0", params=params))
    children = [parent.get_child_info(j)[0] for j in range(params.n)]
    for j, child in enumerate(children):
        done = CompletionOutput(j, f"c{j}", [j], None, None, finish_reason="stop")
        outputs, finished = parent.get_outputs(child, done)
    assert finished and [o.text for o in outputs] == ["c0", "c1", "c2"]
    assert params.output_kind == RequestOutputKind.FINAL_ONLY


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_request_vllm_refuses_fails_alone(engine):
    requests = [
        ChatRequest([{"role": "user", "content": t}], seed=i) for i, t in enumerate(["a", "b ☠", "c"])
    ]
    try:
        replies = engine.chat(requests, Sampling(temperature=0.6, max_tokens=8))
    except VLLMValidationError as err:
        replies = err
    assert not isinstance(replies, Exception), f"one refused request failed the whole call: {replies!r}"
    assert [r.status for r in replies] == [OK, FAILED, OK] and "out of vocabulary" in replies[1].detail
