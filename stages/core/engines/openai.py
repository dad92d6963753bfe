"""Engine for any OpenAI-compatible server (`vllm serve`, hosted APIs): the async client on one
event loop, at most `engine.max_concurrency` requests in flight, each sent to the least busy of the
servers `engine.base_url` lists.

Each request runs on its own: an error after the client's retries (HTTP 4xx/5xx, timeout,
connection, a malformed body) fails only that request. Per-choice token counts come from the
returned logprobs (one entry per generated token); a server that returns none gets n single-choice
requests, whose usage is exact. A request's JSON schema is sent as `response_format` (type json_schema,
strict), which OpenAI and `vllm serve` both take, and its top_logprobs as `top_logprobs`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass, field, replace
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
class OpenAIEngine(Engine):
    LIBRARIES: ClassVar[tuple[str, ...]] = ()  # the server generates: its model id and revision key results
    CONCURRENT: ClassVar[bool] = True  # every shard in flight shares the servers and the concurrency bound
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _servers: list[_Server] = field(default_factory=list, init=False, repr=False)
    _slots: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _errors: tuple = field(default=(), init=False, repr=False)

    def load(self) -> None:
        try:
            import openai
        except ImportError as err:
            raise missing_extra("openai", "openai") from err
        key = os.environ.get(self.options.api_key_env)
        if not key:
            raise PipelineError(
                f"the openai engine needs an API key in ${self.options.api_key_env} "
                "(engine.api_key_env names the variable)"
            )
        # after the client's own retries; a body that is not JSON fails the request too
        self._errors = (openai.APIError, json.JSONDecodeError)
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
        async def every() -> list[Reply]:
            return list(await asyncio.gather(*(self._one(r, sampling) for r in requests)))

        return asyncio.run_coroutine_threadsafe(every(), self._loop).result()

    async def _one(self, request: ChatRequest, sampling: Sampling) -> Reply:
        async with self._slots:
            server = min(self._servers, key=lambda s: s.in_flight)  # the least busy server
            server.in_flight += 1
            try:
                response = await server.client.chat.completions.create(
                    model=self.llm.model,
                    messages=apply_chat_rules(request.messages, self.llm),
                    n=request.n,
                    seed=request.seed,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                    logprobs=True,
                    **request_options(request),
                )
            except self._errors as err:
                LOG.warning(
                    "%s: a request failed after %d retries: %s",
                    self.model_name,
                    self.options.max_retries,
                    err,
                )
                return Reply([], FAILED, f"{type(err).__name__}: {err}")
            finally:
                server.in_flight -= 1
        choices = sorted(getattr(response, "choices", None) or [], key=lambda c: c.index)
        usage = getattr(response, "usage", None)
        if not choices or usage is None or any(c.message is None for c in choices):
            return Reply([], FAILED, "malformed response: no choices, message or usage")
        counted = [
            len(c.logprobs.content) if c.logprobs and c.logprobs.content is not None else None
            for c in choices
        ]
        if None in counted and len(choices) > 1:  # no per-choice counts: ask one choice at a time
            singles = await asyncio.gather(
                *(self._one(replace(request, n=1, seed=request.seed + j), sampling) for j in range(request.n))
            )
            return Reply([c for s in singles for c in s.completions], *_combined(list(singles)))
        return Reply(
            [
                Completion(
                    text=c.message.content or "",
                    finish_reason="length" if c.finish_reason == "length" else "stop",
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens if tokens is None else tokens,
                    logprobs=_logprobs(c.logprobs, request) if request.top_logprobs and tokens else None,
                )
                for c, tokens in zip(choices, counted, strict=True)
            ]
        )


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


def _combined(replies: list[Reply]) -> tuple[str, str | None]:
    """The status of n single-choice replies taken together: ok (up to n) unless every one failed."""
    ok = [r for r in replies if r.completions]
    return (replies[0].status, replies[0].detail) if not ok else (ok[0].status, None)


def _tokenizer(name: str, revision: str | None) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise missing_extra("transformers (to count prompt tokens)", "cpu") from err
    return AutoTokenizer.from_pretrained(name, revision=revision)
