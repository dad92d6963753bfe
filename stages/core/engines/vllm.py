"""vLLM offline engine for GPU hosts; needs the `vllm` extra and a CUDA GPU.

One thread feeds the engine (`LLMEngine.add_request` / `step`, the loop `LLM.chat` runs inside):
requests from every shard in flight join the running batch, so the end of one shard does not
drain it. Prompts are rendered with the model's chat template and tokenized once, by the same
tokenizer that counted them, and sent as token ids. A request's JSON schema becomes vLLM's structured
output (`StructuredOutputsParams`, or `GuidedDecodingParams` before vLLM 0.11) and its top_logprobs
SamplingParams.logprobs (vLLM's raw logprobs, the sampled token's among them)."""

from __future__ import annotations

import gc
import inspect
import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

from stages.core.engines.base import (
    FAILED,
    ChatRequest,
    Completion,
    Engine,
    Reply,
    apply_chat_rules,
    by_text,
    missing_extra,
    token_logprobs,
)
from stages.core.errors import PipelineError
from stages.core.params import Sampling

LOG = logging.getLogger(__name__)


@dataclass
class VLLMEngine(Engine):
    LIBRARIES: ClassVar[tuple[str, ...]] = ("vllm",)
    CONCURRENT: ClassVar[bool] = True
    _llm: Any = field(default=None, init=False, repr=False)
    _feeder: _Feeder | None = field(default=None, init=False, repr=False)

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
        args = self.engine_args()
        check_arguments(args, accepted_engine_args(vllm), f"vllm {vllm.__version__} LLM()", self.llm.model)
        self._llm = vllm.LLM(**args)
        self._tokenizer = self._llm.get_tokenizer()
        self._feeder = _Feeder(self._llm.llm_engine)

    def unload(self) -> None:
        """Stop the feeder and free the GPUs the way vLLM's own tests do; a model that must give
        its memory back to another runs in its own process (stages/core/executors.py)."""
        if self._feeder is not None:
            self._feeder.close()
        engine = getattr(self._llm, "llm_engine", None)
        if engine is not None and hasattr(getattr(engine, "engine_core", None), "shutdown"):
            engine.engine_core.shutdown()
        self._llm = self._tokenizer = self._feeder = None
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:
            return
        cleanup_dist_env_and_memory()

    def context_length(self) -> int | None:
        return self._llm.llm_engine.model_config.max_model_len

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        futures = []
        for r in requests:
            ids = self._tokenizer.apply_chat_template(
                apply_chat_rules(r.messages, self.llm), tokenize=True, add_generation_prompt=True
            )
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            # all n completions at the end, as LLM.chat asks (the default streams them, and with n > 1
            # the finished output would hold only the last sample)
            params = SamplingParams(
                **sampling_arguments(r, sampling), output_kind=RequestOutputKind.FINAL_ONLY
            )
            futures.append(self._feeder.submit({"prompt_token_ids": ids}, params))
        return [_reply(f, r) for f, r in zip(futures, requests, strict=True)]


def sampling_arguments(request: ChatRequest, sampling: Sampling) -> dict[str, Any]:
    """The arguments of `vllm.SamplingParams` for one request (a request's options only where set)."""
    args = {
        "n": request.n,
        "seed": request.seed,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }
    if request.top_logprobs:
        args["logprobs"] = request.top_logprobs
    if request.json_schema is not None:
        args.update(structured_output(request.json_schema))
    return args


def structured_output(schema: dict) -> dict[str, Any]:
    """The SamplingParams argument that makes vLLM's output follow a JSON schema, in the installed
    vLLM's terms: `structured_outputs` (0.11 on; `guided_decoding` was removed in 0.12) or
    `guided_decoding` (up to 0.10)."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}
    return {"structured_outputs": StructuredOutputsParams(json=schema)}


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


def _reply(future: Future, request: ChatRequest) -> Reply:
    try:
        out = future.result()
    except _Rejected as err:  # vLLM refused the request before generating (validation)
        LOG.warning("a request failed: %s", err)
        return Reply([], FAILED, str(err))
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


FINISHED = ("stop", "length")  # vLLM's finish reasons of a completion that came back whole


class _Rejected(RuntimeError):
    """`add_request` refused one request (a bad prompt or sampling parameter)."""


class _Feeder:
    """Owns a vLLM LLMEngine: adds requests from any thread, steps it while any is unfinished and
    resolves each request's future with its final RequestOutput."""

    def __init__(self, engine: Any) -> None:
        self._engine, self._inbox = engine, queue.SimpleQueue()
        self._pending: dict[str, Future] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._gate = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vllm-feeder", daemon=True)
        self._thread.start()

    def submit(self, prompt: dict, params: Any) -> Future:
        future: Future = Future()
        with self._gate:  # never queued after the feeder stopped taking requests
            if self._dead is not None:
                raise RuntimeError(f"the vLLM engine has stopped: {self._dead!r}")
            self._inbox.put((prompt, params, future))
        return future

    def close(self) -> None:
        with self._gate:
            if self._dead is None:
                self._inbox.put(None)
        self._thread.join()

    def _take(self, item: tuple | None) -> bool:
        if item is None:
            return False
        prompt, params, future = item
        request_id = str(next(self._ids))
        try:
            self._engine.add_request(request_id, prompt, params)
        except Exception as err:
            future.set_exception(_Rejected(f"{type(err).__name__}: {err}"))
        else:
            self._pending[request_id] = future
        return True

    def _run(self) -> None:
        try:
            while True:
                if not self._pending and not self._take(self._inbox.get()):
                    self._stop(RuntimeError("closed"))
                    return  # idle and asked to stop
                while True:  # everything that arrived joins the next step
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._take(item):
                        self._drain()
                        self._stop(RuntimeError("closed"))
                        return
                if self._pending:  # an idle engine's step() blocks until a request arrives
                    self._step()
        except BaseException as err:  # the engine died: every waiting request learns why
            for future in self._pending.values():
                future.set_exception(err)
            self._pending.clear()
            self._stop(err)
            raise

    def _stop(self, why: BaseException) -> None:
        """Take no more requests; those already queued fail with `why`."""
        with self._gate:
            self._dead = why
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[2].set_exception(why)

    def _step(self) -> None:
        for out in self._engine.step():
            if out.finished:
                self._pending.pop(out.request_id).set_result(out)

    def _drain(self) -> None:
        while self._pending:
            self._step()
