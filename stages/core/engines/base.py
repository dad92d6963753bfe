"""The engine contract: chat requests in, one Reply per request out (up to n completions with exact
token counts, or the reason there are none); one bad request never fails the others."""

from __future__ import annotations

import abc
import bisect
import contextlib
import inspect
import itertools
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.config.errors import PipelineError
from stages.core.config.project import distribution_version
from stages.core.rows.requests import (
    FAILED,
    FINAL_WITHOUT_ANSWER,
    OK,
    PARTIAL,
    REFUSED,
    TOO_LONG,
    ChatRequest,
    Completion,
    Reply,
    honours,
)
from stages.core.storage.cache import ResponseCache, engine_identity, request_key
from stages.core.storage.resume import code_meaning, recipe

LOG = logging.getLogger(__name__)
PIP_EXTRA = "pip install 'lmsys-chat-1m-synth[{extra}]'"
REQUEST_COUNTS = ("requests", "from_cache", "sent", "prompt_tokens", "completion_tokens", "engine_seconds")
FLUSH_ANSWERS, FLUSH_SECONDS = 256, 2.0  # answers arrive into the response cache in batches of either
LOGPROB_SPAN = 2  # tokens that keep their alternatives after each `logprobs_after` text ("1", "0" of a 10)


class EngineDown(PipelineError):
    """The backend cannot answer any request (connection refused, the engine process died, a run of
    consecutive failures): the stage stops at once, keeping the shards it finished."""


class RequestError(RuntimeError):
    """The backend refused or could not answer the requests of one call; `chat` then isolates the
    request at fault by splitting the call. `final`: the backend refuses the request itself (a
    validation error), which a re-run cannot change: its status is REFUSED, not FAILED."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


class Interrupted(PipelineError):
    """SIGINT or SIGTERM stopped the stage: requests in flight were aborted, answers that came back
    and finished shards are kept; the next run sends only what was not answered."""


@dataclass
class Engine(abc.ABC):
    """One model behind one backend. `load()` imports the heavy library and loads the model; it
    runs on the first `chat()` that has requests, so a resumed stage whose shards are all done
    never loads a model. Subclasses implement `load` (setting `_tokenizer`) and `_chat`.

    `chat` may be called from several threads (one per shard in flight): an engine whose backend
    batches across calls (CONCURRENT) takes them at once, any other runs them one at a time."""

    llm: LLMSpec
    options: EngineParams
    LIBRARIES: ClassVar[tuple[str, ...]] = ()  # distributions that generate: their versions key results
    # the engine's own version, in every response-cache key: raise it with any change to the engine's
    # code (or to this module's request handling) that changes what it returns for the same request;
    # tests/test_engines.py fails when an engine's code changes until its entry there is updated
    VERSION: ClassVar[int] = 1
    CONCURRENT: ClassVar[bool] = False  # whether `_chat` may run in several threads at once
    _tokenizer: Any = field(default=None, init=False, repr=False)  # set by load(); counts prompts
    _loaded: bool = field(default=False, init=False, repr=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _call_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # failed requests by their error text (the ceiling's message names the most common one), and the
    # length of the current run of failures (the circuit breaker), guarded by _health_lock
    failures: Counter = field(default_factory=Counter, init=False, repr=False)
    _failing: int = field(default=0, init=False, repr=False)
    _health_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    cache: ResponseCache | None = field(default=None, init=False, repr=False)  # set by the executor
    # what this engine did so far (request_counts), guarded by _health_lock
    counters: Counter = field(default_factory=Counter, init=False, repr=False)
    _identity: dict = field(default_factory=dict, init=False, repr=False)
    _identity_for: tuple | None = field(default=None, init=False, repr=False)  # (llm, options) it is of
    _identity_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _arrivals: Arrivals | None = field(default=None, init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @property
    def model_name(self) -> str:
        return self.llm.model

    def identity(self) -> dict:
        """What of the engine determines its output: backend, library and version, engine code, model.
        Computed once per engine and params (under a lock), never again from request threads."""
        with self._identity_lock:
            made_for = self._identity_for
            if made_for is None or made_for[0] is not self.llm or made_for[1] is not self.options:
                code = code_meaning(Path(inspect.getfile(type(self))))  # a comment edit keeps every key
                versions = {name: distribution_version(name) for name in self.libraries()}
                backend, llm = self.options.backend, recipe(self.llm)
                self._identity = {"backend": backend, "libraries": versions, "code": code, "llm": llm}
                self._identity_for = (self.llm, self.options)
            return dict(self._identity)

    def libraries(self) -> tuple[str, ...]:
        """The distributions whose versions key this engine's results (LIBRARIES by default)."""
        return self.LIBRARIES

    @abc.abstractmethod
    def load(self) -> None: ...

    def unload(self) -> None:  # noqa: B027 - engines without resources need no clean-up
        """Free the model (GPU memory, sessions)."""

    def context_length(self) -> int | None:
        """Tokens of prompt plus completion the model takes (None: unknown, nothing is checked)."""
        return self.llm.max_model_len

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens of `messages` (chat rules applied), rendered with the chat template of the
        tokenizer that `load()` set."""
        ids = self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: a BatchEncoding

    def chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        """One Reply per request, in order. A request the response cache holds is answered from it;
        the others are sent: a prompt that cannot fit `context_length - max_tokens` is not
        (TOO_LONG), and a request the backend fails loses only its own completions. Each answer the
        cache keeps (`cacheable`) is stored as it arrives, so an interrupt or a dead server loses none
        that came back. After `stop()` a call ends within seconds, raising Interrupted."""
        if not requests:
            return []
        replies: list[Reply | None] = [None] * len(requests)
        keys = self._keys(requests, sampling)
        if keys:
            hits = self.cache.get_many(keys)
            for i, key in enumerate(keys):
                if key in hits:
                    replies[i] = cached_reply(hits[key])
        todo = [i for i, reply in enumerate(replies) if reply is None]
        self._count(requests=len(requests), from_cache=len(requests) - len(todo))
        if not todo:
            return replies  # every answer was cached: the model is never loaded
        self._stop_check()
        with self._load_lock:
            if not self._loaded:
                LOG.info("loading %s (%s) in process %d", self.model_name, self.options.backend, os.getpid())
                self.load()
                self._loaded = True
        asked = [requests[i] for i in todo]
        if keys:
            self.arrivals.expect((r, keys[i]) for r, i in zip(asked, todo, strict=True))
        try:
            with contextlib.nullcontext() if self.CONCURRENT else self._call_lock:
                self._stop_check()
                began = time.perf_counter()
                sent = self._chat_loaded(asked, sampling)
                seconds = time.perf_counter() - began
            for request, reply in zip(asked, sent, strict=True):  # those no engine handed over yet
                self.arrivals.arrived(request, reply)
        finally:
            self.arrivals.settle(asked)  # what came back is stored, an interrupted call's too
        self._count(
            sent=sum(r.status != TOO_LONG for r in sent),
            prompt_tokens=sum(c.prompt_tokens for r in sent for c in r.completions[:1]),
            completion_tokens=sum(c.completion_tokens for r in sent for c in r.completions),
            engine_seconds=seconds,
        )
        for i, reply in zip(todo, sent, strict=True):
            replies[i] = reply
        self._watch(sent)
        return replies

    def _keys(self, requests: list[ChatRequest], sampling: Sampling) -> list[bytes]:
        """Each request's response-cache key ([] without a cache)."""
        if self.cache is None or not self.cache.enabled:
            return []
        identity, settings = self.cache_identity(), recipe(sampling)
        return [
            request_key(identity, apply_chat_rules(r.messages, self.llm), settings | r.options(), r.n, r.seed)
            for r in requests
        ]

    @property
    def arrivals(self) -> Arrivals:
        """Where answers go as they arrive (the response cache, in batches)."""
        with self._health_lock:
            if self._arrivals is None:
                self._arrivals = Arrivals(self.cache)
            return self._arrivals

    def arrived(self, request: ChatRequest, reply: Reply) -> None:
        """An engine hands each answer over as soon as it has it (a request of the current call; any
        other, such as a single-choice request completing one, is ignored)."""
        self.arrivals.arrived(request, self._checked(reply, request))

    def stop(self) -> None:
        """Interrupt: calls in flight abort their requests (each engine as its backend allows) and
        raise Interrupted; what came back before is stored. Safe from any thread, and more than once."""
        self._stopping.set()

    def _stop_check(self) -> None:
        if self._stopping.is_set():
            raise Interrupted(f"{self.model_name}: interrupted; finished shards and answers are kept")

    def _count(self, **counts: float) -> None:
        with self._health_lock:
            self.counters.update(counts)

    def request_counts(self) -> dict[str, float]:
        """What the engine did so far: requests asked, answered from the cache, sent (not too long),
        prompt tokens (once per request) and completion tokens of the answers sent, and the seconds
        spent in the backend; with the response cache's own counts."""
        with self._health_lock:
            counts = {name: self.counters[name] for name in REQUEST_COUNTS}
        counts["engine_seconds"] = round(counts["engine_seconds"], 3)
        return counts | (self.cache.counts() if self.cache else {})

    def _watch(self, replies: list[Reply]) -> None:
        """Count failures by error text; raise EngineDown once `engine.max_consecutive_failures`
        requests in a row have failed (a dead server, a crashed engine): the stage stops instead of
        failing every request left one by one."""
        with self._health_lock:
            for reply in replies:
                if reply.status == FAILED:
                    self.failures[(reply.detail or "no detail")[:300]] += 1
                    self._failing += 1
                elif reply.status in (OK, PARTIAL, REFUSED):  # the engine answers
                    self._failing = 0
            failing, limit = self._failing, self.options.max_consecutive_failures
        if failing >= limit:
            last = next((r.detail for r in reversed(replies) if r.status == FAILED), None)
            raise EngineDown(
                f"{self.model_name} ({self.options.backend}): {failing} requests in a row failed "
                f"(engine.max_consecutive_failures={limit}), the engine looks down; last error: {last}. "
                "Finished shards are kept: fix the engine and re-run"
            )

    def cache_identity(self) -> bytes:
        """The part of a cache key that names the engine: `identity()` without the engine's source."""
        ours = self.identity()
        return engine_identity(ours["backend"], ours["libraries"], ours["llm"], self.VERSION)

    def __post_init__(self) -> None:
        self.identity()  # in the thread that builds the engine, before any shard thread calls chat

    def _chat_loaded(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(requests)
        limit, send = self.context_length(), []
        budget = None if limit is None else limit - sampling.max_tokens
        for i, request in enumerate(requests):
            tokens = (
                None if budget is None else self.count_tokens(apply_chat_rules(request.messages, self.llm))
            )
            if tokens is not None and tokens > budget:
                replies[i] = Reply([], TOO_LONG, f"{tokens} prompt tokens > {limit} - {sampling.max_tokens}")
            else:
                send.append(i)
        for i, reply in zip(send, self._isolated([requests[i] for i in send], sampling), strict=True):
            replies[i] = self._checked(reply, requests[i])
        return replies

    def _isolated(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        """`_chat`, splitting a call the backend refused until the request at fault is alone."""
        if not requests:
            return []
        try:
            replies = self._chat(requests, sampling)
        except RequestError as err:
            if len(requests) == 1:
                what = "refused" if err.final else "failed"
                LOG.warning("%s: a request %s: %s", self.model_name, what, err)
                return [Reply([], REFUSED if err.final else FAILED, str(err))]
            half = len(requests) // 2
            return self._isolated(requests[:half], sampling) + self._isolated(requests[half:], sampling)
        if len(replies) != len(requests):
            raise RuntimeError(f"{type(self).__name__} returned {len(replies)} replies to {len(requests)}")
        return replies

    @staticmethod
    def _checked(reply: Reply, request: ChatRequest) -> Reply:
        """`reply` as the contract has it: never more than n completions; "ok" only with all n (fewer
        is PARTIAL, asked again on the next run)."""
        got = len(reply.completions)
        if got > request.n:
            raise RuntimeError(f"{got} completions for a request of n={request.n}")
        if reply.status == OK and got < request.n:
            return Reply(reply.completions, PARTIAL, f"{got} of n={request.n} completions came back")
        return reply

    @abc.abstractmethod
    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]: ...

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loaded:
            self.unload()
            self._loaded = False
        self._stopping.clear()  # a stop belongs to the run it stopped: a closed engine may serve again


def cacheable(reply: Reply, request: ChatRequest) -> bool:
    """Whether the response cache keeps `reply`: a complete answer (n completions, each in the form the
    request asked: `honours`), or a final status without one (a prompt too long for the context, a
    refusal). Those are decided by what the key holds (messages, max_tokens, the model's revision and
    context, the library versions), so a re-run that finds them loads no model to learn them again; a
    failed or partial answer, or one that ignored the form asked, is asked again next time."""
    if reply.status in FINAL_WITHOUT_ANSWER:
        return True
    return (
        reply.status == OK
        and len(reply.completions) == request.n
        and all(honours(c, request) for c in reply.completions)
    )


class Arrivals:
    """Answers on their way into the response cache: an engine hands each one over as it arrives
    (`Engine.arrived`); the `cacheable` ones are written in batches of FLUSH_ANSWERS, or after
    FLUSH_SECONDS, and the rest of a call when it ends (`settle`), interrupted or not. A `kill -9`
    loses at most the last FLUSH_SECONDS of answers; each batch is one SQLite transaction."""

    def __init__(self, cache: ResponseCache | None) -> None:
        self.cache = cache if cache is not None and cache.enabled else None
        self._lock = threading.Lock()
        self._expected: dict[int, tuple[ChatRequest, bytes]] = {}  # id(request) -> (request, key)
        self._ready: list[tuple[bytes, list | dict]] = []
        self._flushed = time.monotonic()

    def expect(self, asked: Iterable[tuple[ChatRequest, bytes]]) -> None:
        with self._lock:
            self._expected.update((id(request), (request, key)) for request, key in asked)

    def arrived(self, request: ChatRequest, reply: Reply) -> None:
        with self._lock:
            found = self._expected.pop(id(request), None)
            if found is None or found[0] is not request or not cacheable(reply, request):
                return
            self._ready.append((found[1], cache_value(reply)))
            due = len(self._ready) >= FLUSH_ANSWERS or time.monotonic() - self._flushed > FLUSH_SECONDS
        if due:
            self.flush()

    def settle(self, asked: list[ChatRequest]) -> None:
        """The end of a call: its requests are no longer expected; what arrived is written."""
        with self._lock:
            for request in asked:
                self._expected.pop(id(request), None)
        self.flush()

    def flush(self) -> None:
        with self._lock:
            ready, self._ready, self._flushed = self._ready, [], time.monotonic()
        if ready and self.cache is not None:
            self.cache.put_many(ready)


def cache_value(reply: Reply) -> list | dict:
    """What the cache stores for a `cacheable` reply: its completions, or {status, detail}."""
    if reply.status == OK:
        return [asdict(c) for c in reply.completions]
    return {"status": reply.status, "detail": reply.detail}


def cached_reply(value: list | dict) -> Reply:
    """The Reply a `cache_value` stands for."""
    if isinstance(value, dict):
        return Reply([], value["status"], value["detail"])
    return Reply([Completion(**c) for c in value])


def apply_chat_rules(messages: list[dict[str, str]], llm: LLMSpec) -> list[dict[str, str]]:
    """Adapt messages to the model: without a system role, the system text opens the first user turn."""
    if llm.system_role or not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def token_logprobs(
    tokens: list[str], alternatives: Callable[[int], dict[str, float]], request: ChatRequest
) -> list[list]:
    """`Completion.logprobs` of one completion: [token, alternatives] per token in `tokens` (the text of
    each generated token), where `alternatives(i)` gives token i's (its own included), asked only at
    the LOGPROB_SPAN tokens from the one holding the first character after each `request.logprobs_after`
    in the tokens' joined text (every token when it is ""); the others get {}."""
    wanted = set(range(len(tokens)))
    if request.logprobs_after:
        starts = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0))
        joined, mark, wanted = "".join(tokens), request.logprobs_after, set()
        end = joined.find(mark)
        while end != -1:
            end += len(mark)
            holder = bisect.bisect_right(starts, end) - 1  # the last token starting at or before `end`
            if holder >= 0 and end < starts[holder] + len(tokens[holder]):
                wanted.update(range(holder, min(holder + LOGPROB_SPAN, len(tokens))))
            end = joined.find(mark, end)
    return [[token, alternatives(i) if i in wanted else {}] for i, token in enumerate(tokens)]


def by_text(alternatives: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Alternatives (text, logprob) of distinct tokens by their text: tokens that read the same add up."""
    found: dict[str, float] = {}
    for text, value in alternatives:
        if text in found:  # log(exp(a) + exp(b))
            high, low = max(found[text], value), min(found[text], value)
            value = high + math.log1p(math.exp(low - high))
        found[text] = value
    return found


def missing_extra(library: str, extra: str) -> ImportError:
    return ImportError(f"the {library} engine needs {library}: {PIP_EXTRA.format(extra=extra)}")
