"""Engine for any OpenAI-compatible server (`vllm serve`, `transformers serve`, hosted APIs): the async
client on one event loop, at most `engine.max_concurrency` requests in flight, each sent to the least busy
of the servers `engine.base_url` lists.

`load()` checks that every server answers and serves `llm.model`. A request that cannot reach its server
after the client's retries stops the stage (EngineDown); a request the server refuses for what it is
(400, 422, or every choice withheld by a content filter) is REFUSED, final; any other error (other
HTTP statuses, a timeout, a malformed body) fails only that request. Each answer is handed to the
response cache as it arrives; `stop()` cancels the calls in flight (their HTTP requests close).

A server may ignore `n`, logprobs and `response_format` with
HTTP 200 (`transformers serve` does): a reply with k < n choices is completed with one single-choice
request per missing choice j (seed + j), and what still cannot be had stays missing (PARTIAL). Per-choice
token counts come from the returned logprobs (one entry per generated token); a server that returns
several choices without them gets n single-choice requests, whose usage is exact. A request's JSON schema
is sent as `response_format` (type json_schema, strict) and its top_logprobs as `top_logprobs`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from stages.core.config.engine_params import Sampling
from stages.core.config.errors import PipelineError
from stages.core.engines.base import (
    Engine,
    EngineDown,
    apply_chat_rules,
    by_text,
    missing_extra,
    token_logprobs,
)
from stages.core.rows.requests import FAILED, PARTIAL, REFUSED, ChatRequest, Completion, Reply

LOG = logging.getLogger(__name__)
CHECK_TIMEOUT = 5.0  # seconds per attempt (two in all) of load()'s look at a server's model list
PROBE = [{"role": "user", "content": "ping"}]  # one-token request for a model the server does not list


def refusals(openai: Any) -> tuple[type[BaseException], ...]:
    """The errors of a request the server refuses for what it is (400 validation, context length, a
    hosted content filter; 422 unprocessable): a re-run asks the same and is refused again."""
    return (openai.BadRequestError, openai.UnprocessableEntityError)


@dataclass
class OpenAIEngine(Engine):
    LIBRARIES: ClassVar[tuple[str, ...]] = ()  # the server generates: its model id and revision key results
    # 2: a reply with fewer choices than n is completed by single-choice requests; 3: refusals (400, 422,
    # content_filter) are final (REFUSED), a filtered choice is never a completion
    VERSION: ClassVar[int] = 3
    CONCURRENT: ClassVar[bool] = True  # every shard in flight shares the servers and the concurrency bound
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _servers: list[_Server] = field(default_factory=list, init=False, repr=False)
    _slots: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _openai: Any = field(default=None, init=False, repr=False)  # the library, for its error classes
    _calls: set = field(default_factory=set, init=False, repr=False)  # calls in flight, for stop()
    _calls_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def load(self) -> None:
        try:
            import openai
        except ImportError as err:
            raise missing_extra("openai", "openai") from err
        self._openai = openai
        env = self.options.api_key_env
        key = os.environ.get(env)
        if not key:
            raise PipelineError(
                f"the openai engine needs an API key in ${env} (engine.api_key_env names the variable); "
                f"a local server without keys takes any value: export {env}=none"
            )
        for url in self.options.base_urls:
            self._check(url, key)
        if self.llm.max_model_len is not None:  # prompts are counted before sending
            self._tokenizer = _tokenizer(self.llm.tokenizer or self.llm.model, self.llm.revision)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-engine", daemon=True)
        self._thread.start()

        async def clients() -> None:
            self._slots = asyncio.Semaphore(self.options.max_concurrency)
            self._servers = [
                _Server(
                    openai.AsyncOpenAI(
                        base_url=url,
                        api_key=key,
                        max_retries=self.options.max_retries,
                        timeout=self.options.request_timeout,
                    )
                )
                for url in self.options.base_urls
            ]

        asyncio.run_coroutine_threadsafe(clients(), self._loop).result()

    def _check(self, url: str | None, key: str) -> None:
        """Raise unless the server at `url` answers and serves `llm.model`: its model list names it, or a
        one-token request for it is answered (a server that loads models on demand, as `transformers serve`
        started without a model does, lists only the ones it holds)."""
        openai, model = self._openai, self.llm.model
        with openai.OpenAI(base_url=url, api_key=key, max_retries=1, timeout=CHECK_TIMEOUT) as client:
            where = f"{client.base_url} (engine.base_url)"
            try:
                served = [m.id for m in client.models.list()]
            except openai.APIConnectionError as err:  # refused, unknown host, or no answer in time
                raise EngineDown(f"no OpenAI-compatible server answers at {where}: {err}") from err
            except openai.AuthenticationError as err:
                raise PipelineError(
                    f"the server at {where} refuses the key in ${self.options.api_key_env}: {err.message}"
                ) from err
            except openai.APIStatusError:  # no model list on this server
                served = []
            if model in served:
                return
            try:
                client.with_options(timeout=self.options.request_timeout).chat.completions.create(
                    model=model, messages=PROBE, max_tokens=1
                )
            except openai.APIStatusError as err:
                raise PipelineError(
                    f"the server at {where} does not serve {model!r} (llm.model); it lists {served}: "
                    f"{err.message}"
                ) from err
            except openai.APIConnectionError as err:
                raise EngineDown(f"the server at {where} did not answer a request: {err}") from err
        LOG.warning(  # a server that loads models on demand lists only those it holds
            "%s is not among the models %s lists (%s) but is answered", model, where, served
        )

    def unload(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            for server in self._servers:
                await server.client.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = self._tokenizer = None
        self._servers = []

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        every = _gathered(self._answered(r, sampling) for r in requests)
        call = asyncio.run_coroutine_threadsafe(every, self._loop)
        with self._calls_lock:
            self._calls.add(call)
        try:
            return call.result()
        except concurrent.futures.CancelledError:
            self._stop_check()  # stop() cancelled the call: Interrupted
            raise
        finally:
            with self._calls_lock:
                self._calls.discard(call)

    def stop(self) -> None:
        """Cancel every call in flight: the client closes its HTTP requests (the server aborts them);
        answers that came back were handed over as they arrived."""
        super().stop()
        with self._calls_lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    async def _answered(self, request: ChatRequest, sampling: Sampling) -> Reply:
        reply = await self._one(request, sampling)
        self.arrived(request, reply)
        return reply

    async def _one(self, request: ChatRequest, sampling: Sampling) -> Reply:
        response = await self._send(request, sampling)
        if isinstance(response, Reply):
            return response
        choices = sorted(getattr(response, "choices", None) or [], key=lambda c: c.index)
        usage = getattr(response, "usage", None)
        if not choices or usage is None or any(c.message is None for c in choices):
            return Reply([], FAILED, "malformed response: no choices, message or usage")
        if filtered := [c for c in choices if c.finish_reason == "content_filter"]:
            choices = [c for c in choices if c.finish_reason != "content_filter"]
            if not choices:  # a filtered reply is never a response; asking again is filtered again
                return Reply([], REFUSED, f"content_filter: the server withheld {len(filtered)} choices")
        counted = [
            len(c.logprobs.content) if c.logprobs and c.logprobs.content is not None else None
            for c in choices
        ]
        if None in counted and len(choices) > 1:  # no per-choice counts: ask one choice at a time
            return await self._completed(request, sampling, [])
        have = [
            Completion(
                text=c.message.content or "",
                finish_reason="length" if c.finish_reason == "length" else "stop",
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens if tokens is None else tokens,
                logprobs=_logprobs(c.logprobs, request) if request.top_logprobs and tokens else None,
            )
            for c, tokens in zip(choices, counted, strict=True)
        ]
        return await self._completed(request, sampling, have)

    async def _send(self, request: ChatRequest, sampling: Sampling) -> Any:
        """The server's response to `request`, or the FAILED Reply of an error after the client's retries;
        a server that cannot be reached raises EngineDown."""
        async with self._slots:
            server = min(self._servers, key=lambda s: s.in_flight)  # the least busy server
            server.in_flight += 1
            try:
                return await server.client.chat.completions.create(
                    model=self.llm.model,
                    messages=apply_chat_rules(request.messages, self.llm),
                    n=request.n,
                    seed=request.seed,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                    logprobs=True,
                    **sampling_options(sampling),
                    **request_options(request),
                )
            except (self._openai.APIError, json.JSONDecodeError) as err:  # or a body that is not JSON
                retries, openai = self.options.max_retries, self._openai
                if isinstance(err, openai.APIConnectionError) and not isinstance(err, openai.APITimeoutError):
                    where = f"{server.client.base_url} (engine.base_url)"
                    raise EngineDown(
                        f"the server at {where} cannot be reached after {retries} retries: {err}"
                    ) from err
                if isinstance(err, refusals(openai)):  # the request itself is at fault: final
                    LOG.warning("%s: the server refused a request: %s", self.model_name, err)
                    return Reply([], REFUSED, f"{type(err).__name__}: {err}")
                LOG.warning("%s: a request failed after %d retries: %s", self.model_name, retries, err)
                return Reply([], FAILED, f"{type(err).__name__}: {err}")
            finally:
                server.in_flight -= 1

    async def _completed(self, request: ChatRequest, sampling: Sampling, have: list[Completion]) -> Reply:
        """`have` (choices 0..k-1 of `request`) with one single-choice request (seed + j) for each missing
        choice j < n; PARTIAL (or FAILED, with none) where some still did not come back."""
        if len(have) >= request.n:
            return Reply(have)
        singles = await _gathered(
            self._one(replace(request, n=1, seed=request.seed + j), sampling)
            for j in range(len(have), request.n)
        )
        got = have + [c for s in singles for c in s.completions]
        failed = [s for s in singles if not s.completions]
        if not failed:
            return Reply(got)
        if not got:
            return Reply([], failed[0].status, failed[0].detail)
        return Reply(got, PARTIAL, f"{len(got)} of n={request.n} completions came back; {failed[0].detail}")


async def _gathered(replies: Iterable[Awaitable[Reply]]) -> list[Reply]:
    """The replies, in order; the first EngineDown cancels the others and is raised."""
    tasks = [asyncio.ensure_future(r) for r in replies]
    try:
        return list(await asyncio.gather(*tasks))
    except EngineDown:
        for task in tasks:
            task.cancel()
        raise


def sampling_options(sampling: Sampling) -> dict[str, Any]:
    """The arguments of `chat.completions.create` for top_k and the penalties, only where set: OpenAI's
    own frequency_penalty; top_k and repetition_penalty in `extra_body`, as vLLM's server takes them
    (a hosted API that does not know them may refuse the request)."""
    args = sampling.options()
    extra = {name: args.pop(name) for name in ("top_k", "repetition_penalty") if name in args}
    return args | ({"extra_body": extra} if extra else {})


def request_options(request: ChatRequest) -> dict[str, Any]:
    """The arguments of `chat.completions.create` for a request's options (none where it sets none)."""
    args: dict[str, Any] = {}
    if request.top_logprobs:
        args["top_logprobs"] = request.top_logprobs
    if request.json_schema is not None:
        name = request.json_schema.get("title", "output")
        args["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": request.json_schema, "strict": True},
        }
    return args


def _logprobs(logprobs: Any, request: ChatRequest) -> list[list]:
    """`Completion.logprobs` of a choice: `logprobs.content` holds each generated token with its logprob
    and its `top_logprobs` (which may leave the token itself out)."""
    content = logprobs.content

    def alternatives(k: int) -> dict[str, float]:
        entry = content[k]
        return by_text(
            [(top.token, top.logprob) for top in entry.top_logprobs or [] if top.token != entry.token]
            + [(entry.token, entry.logprob)]
        )

    return token_logprobs([entry.token for entry in content], alternatives, request)


@dataclass
class _Server:
    client: Any
    in_flight: int = 0


def _tokenizer(name: str, revision: str | None) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise missing_extra("transformers (to count prompt tokens)", "cpu") from err
    return AutoTokenizer.from_pretrained(name, revision=revision)
