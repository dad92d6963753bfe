"""An OpenAI-compatible stand-in for `vllm serve` on 127.0.0.1: continuous-batching timing, lognormal
completion lengths, logprobs, vLLM's error bodies and injected faults, all deterministic per request.

    python benchmarks/fake_vllm.py --port 8000 [--faults transient_429=0.05,persistent_500=0.01]
                                   [--one-choice]

A request's key is a hash of its messages, its seed and the server seed: the fault it draws, its
completion lengths and texts depend on that key only, so a retry of the same request is recognised.
`stats()["failing_by_fault"]` counts the distinct requests failed for good, by fault (persistent_500,
context_400). With `one_choice` the server ignores `n` and answers one choice, as HF's
`transformers serve` does.

Judge modes: a JSON schema (OpenAI's `response_format` of type json_schema, or vLLM's extra body
`structured_outputs: {json: ...}` / `guided_json`) makes each completion JSON that follows it (an object
of string, integer, number and boolean properties; integers from their enum or minimum-maximum), and
`top_logprobs` gives every token that many alternatives: a judge's rating r is then its own token
after "Rating: [[", with alternatives r, r+1, r+2 (mod 11, "10" one token) at probabilities 0.5, 0.3, 0.2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import random
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

_LEXICON = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know"
)
_TOKENS = [w + " " for w in _LEXICON.split()]
_BASE_TEXT = "".join(_TOKENS)
_CHAR_AT = [0]
for _t in _TOKENS:
    _CHAR_AT.append(_CHAR_AT[-1] + len(_t))


def _entry(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.1, "bytes": list(token.encode()), "top_logprobs": []}


_ENTRIES = [_entry(t) for t in _TOKENS]
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
}


@dataclass
class Faults:
    """Shares of distinct requests that get each fault; consecutive intervals of one uniform draw."""

    transient_429: float = 0.0
    transient_500: float = 0.0
    persistent_500: float = 0.0
    context_400: float = 0.0

    def __post_init__(self) -> None:
        shares = [getattr(self, f.name) for f in fields(self)]
        if any(s < 0 for s in shares) or sum(shares) > 1 + 1e-9:
            raise ValueError(f"fault shares must be >= 0 and sum to at most 1: {self}")

    def draw(self, u: float) -> str | None:
        edge = 0.0
        for f in fields(self):
            edge += getattr(self, f.name)
            if u < edge:
                return f.name
        return None

    @classmethod
    def parse(cls, text: str) -> Faults:
        """`transient_429=0.05,persistent_500=0.01` → Faults."""
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return cls(**{k.strip(): float(v) for k, v in pairs})


def _words(offset: int, count: int) -> tuple[str, list[dict[str, Any]]]:
    """`count` pseudo-tokens starting at position `offset` of the word cycle, and their logprob entries."""
    period = len(_TOKENS)
    reps = (offset + count) // period + 1
    start = _CHAR_AT[offset]
    end = (offset + count) // period * len(_BASE_TEXT) + _CHAR_AT[(offset + count) % period]
    return (_BASE_TEXT * reps)[start:end], (_ENTRIES * reps)[offset : offset + count]


def _content_chars(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class FakeVLLMServer:
    """`with FakeVLLMServer(...) as server:` serves on `server.base_url` from a background thread."""

    def __init__(
        self,
        *,
        model: str = "fake",
        seed: int = 0,
        token_latency_s: float = 0.0005,
        first_token_s: float = 0.01,
        median_tokens: int = 300,
        sigma: float = 0.8,
        max_num_seqs: int = 256,
        max_model_len: int = 8192,
        faults: Faults | None = None,
        judge_marker: str = "[The Start of Assistant's Answer]",
        port: int = 0,
        keep_bodies: bool = False,
        one_choice: bool = False,
    ) -> None:
        self.model = model
        self.seed = seed
        self.token_latency_s = token_latency_s
        self.first_token_s = first_token_s
        self.median_tokens = median_tokens
        self.sigma = sigma
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.faults = faults or Faults()
        self.judge_marker = judge_marker
        self.port = port
        self.keep_bodies = keep_bodies
        self.one_choice = one_choice  # ignore n, answer one choice (HF's `transformers serve`)
        self.bodies: list[dict[str, Any]] = []  # each request body, where keep_bodies
        self.base_url = ""
        self._lock = threading.Lock()
        self._transient_keys: set[str] = set()
        self._failing_keys: dict[str, str] = {}  # request key -> its persistent fault
        self._too_long_keys: set[str] = set()
        self._stats: dict[str, Any] = {}
        self.reset_stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._slots: asyncio.Semaphore | None = None
        self._admit: asyncio.Lock | None = None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            snapshot = dict(self._stats)
            snapshot["by_status"] = dict(self._stats["by_status"])
            snapshot["transient"] = len(self._transient_keys)
            snapshot["failing_requests"] = len(self._failing_keys)
            snapshot["failing_by_fault"] = dict(Counter(self._failing_keys.values()))
            snapshot["too_long"] = len(self._too_long_keys)
            return snapshot

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = {"requests": 0, "completions": 0, "prompt_tokens": 0, "completion_tokens": 0}
            self._stats["by_status"] = {}
            self._transient_keys.clear()
            self._failing_keys.clear()
            self._too_long_keys.clear()

    def __enter__(self) -> FakeVLLMServer:
        self._ready.clear()
        self._thread = threading.Thread(target=self._serve, name="fake-vllm", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise RuntimeError("the fake vLLM server did not start") from self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop = self._thread = None

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(self._start(runner))
        except BaseException as err:
            self._error = err
            loop.run_until_complete(runner.cleanup())
            loop.close()
            self._ready.set()
            return
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def _start(self, runner: web.AppRunner) -> None:
        self._slots = asyncio.Semaphore(self.max_num_seqs)
        self._admit = asyncio.Lock()
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, _: web.Request) -> web.Response:
        model = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "max_model_len": self.max_model_len,
        }
        return _json({"object": "list", "data": [model]})

    def _error_response(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        with self._lock:
            self._count(status)
        body = {
            "object": "error",
            "message": message,
            "type": _ERROR_TYPES[status],
            "param": None,
            "code": status,
        }
        return _json(body, status=status, headers=headers)

    def _count(self, status: int) -> None:
        now = time.monotonic()  # the busy window: from the first reply to the last
        self._stats.setdefault("first_at", now)
        self._stats["last_at"] = now
        self._stats["requests"] += 1
        self._stats["by_status"][status] = self._stats["by_status"].get(status, 0) + 1

    def _context_message(self, prompt_tokens: int, completion_tokens: int) -> str:
        return (
            f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
            f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, "
            f"{completion_tokens} in the completion). Please reduce the length of the messages or completion."
        )

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as err:
            return self._error_response(400, f"invalid JSON body: {err}")
        if not isinstance(body, dict):
            return self._error_response(400, "the body must be a JSON object")
        if self.keep_bodies:
            with self._lock:
                self.bodies.append(body)
        if body.get("model") != self.model:
            return self._error_response(404, f"The model `{body.get('model')}` does not exist.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return self._error_response(400, "messages: a non-empty list of messages is required")
        if body.get("stream"):
            return self._error_response(400, "stream: this fake server does not stream")
        n = body.get("n") or 1
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if (
            not isinstance(n, int)
            or n < 1
            or (max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1))
        ):
            return self._error_response(400, "n and max_tokens must be positive integers")

        key = hashlib.sha256(orjson.dumps([messages, body.get("seed"), self.seed])).hexdigest()
        prompt_tokens = sum(len(_content_chars(m.get("content"))) for m in messages) // 4 + 4 * len(messages)
        budget = self.max_model_len - prompt_tokens if max_tokens is None else max_tokens
        if budget < 1 or prompt_tokens + budget > self.max_model_len:
            with self._lock:
                self._too_long_keys.add(key)
            return self._error_response(400, self._context_message(prompt_tokens, max(budget, 0)))

        schema = _schema(body)
        if schema is not None and (problem := _unsupported(schema)):
            return self._error_response(400, f"json schema: {problem}")
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= 20:
            return self._error_response(400, "top_logprobs must be an integer from 0 to 20")
        failed = self._fault(key, prompt_tokens, budget)
        if failed is not None:
            return failed
        n = 1 if self.one_choice else n
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        judge = self.judge_marker in _content_chars(last_user.get("content"))
        drawn = [
            self._choice(key, i, budget, judge)
            if schema is None and not top
            else self._guided_choice(key, i, budget, judge, schema, top)
            for i in range(n)
        ]
        lengths = [len(entries) for _, _, entries in drawn]
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": {"content": entries} if body.get("logprobs") else None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            for i, (finish, text, entries) in enumerate(drawn)
        ]
        await self._generate(n, max(lengths))
        total = sum(lengths)
        with self._lock:
            self._count(200)
            self._stats["completions"] += n
            self._stats["prompt_tokens"] += prompt_tokens
            self._stats["completion_tokens"] += total
        return _json(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": total,
                    "total_tokens": prompt_tokens + total,
                },
            }
        )

    def _fault(self, key: str, prompt_tokens: int, budget: int) -> web.Response | None:
        """The injected fault this attempt gets, from a uniform draw on the request key."""
        fault = self.faults.draw(int(key, 16) / 2**256)
        if fault in ("transient_429", "transient_500"):
            with self._lock:
                first = key not in self._transient_keys
                self._transient_keys.add(key)
            if not first:
                return None
            if fault == "transient_429":
                headers = {"retry-after-ms": "0", "retry-after": "0"}
                return self._error_response(429, "rate limited: too many requests", headers)
            return self._error_response(500, "internal server error (transient)")
        if fault is None:
            return None
        with self._lock:
            self._failing_keys[key] = fault
        if fault == "persistent_500":
            return self._error_response(500, "internal server error")
        over = max(prompt_tokens, self.max_model_len + 1 - budget)
        return self._error_response(400, self._context_message(over, budget))

    def _choice(
        self, key: str, index: int, budget: int, judge: bool
    ) -> tuple[str, str, list[dict[str, Any]]]:
        """(finish_reason, text, one logprob entry per token) of one choice."""
        rng = random.Random(f"{self.seed}:{key}:{index}")
        drawn = max(1, round(rng.lognormvariate(math.log(self.median_tokens), self.sigma)))
        finish, tokens = ("length", budget) if drawn >= budget else ("stop", drawn)
        offset = rng.randrange(len(_TOKENS))
        if not judge:
            text, entries = _words(offset, tokens)
            return finish, text.rstrip(), entries
        rating = f"Rating: [[{rng.randint(0, 10)}]]"
        text, entries = _words(offset, tokens - 1)
        return finish, text + rating, [*entries, _entry(rating)]

    def _guided_choice(
        self, key: str, index: int, budget: int, judge: bool, schema: dict | None, top: int
    ) -> tuple[str, str, list[dict[str, Any]]]:
        """A choice under a JSON schema (JSON that follows it) and/or with `top` alternatives a token."""
        rng = random.Random(f"{self.seed}:{key}:{index}:guided")
        tokens = max(1, round(rng.lognormvariate(math.log(self.median_tokens), self.sigma)))
        offset = rng.randrange(len(_TOKENS))
        if schema is not None:
            entries = _json_entries(schema, rng, offset, tokens)
        elif judge:
            words = _words(offset, max(0, tokens - 3))[1]
            entries = [*words, _entry("Rating: [["), _rating_entry(rng.randint(0, 10)), _entry("]]")]
        else:
            entries = _words(offset, tokens)[1]
        finish = "length" if tokens >= budget or len(entries) > budget else "stop"
        entries = [_with_top(e, top) for e in entries[:budget]]
        return finish, "".join(e["token"] for e in entries), entries

    async def _generate(self, n: int, longest: int) -> None:
        """Hold one batch slot per choice for the time the longest choice takes to decode."""
        assert self._slots is not None and self._admit is not None
        held = min(n, self.max_num_seqs)
        async with self._admit:  # one request gathers its slots at a time: no two wait on each other
            for _ in range(held):
                await self._slots.acquire()
        try:
            await asyncio.sleep(self.first_token_s + self.token_latency_s * longest)
        finally:
            for _ in range(held):
                self._slots.release()


SCHEMA_TYPES = ("string", "integer", "number", "boolean")  # property types a JSON schema may use here


def _schema(body: dict[str, Any]) -> dict | None:
    """The JSON schema a request's output must follow: OpenAI's response_format or vLLM's extra body."""
    form = body.get("response_format")
    if isinstance(form, dict) and form.get("type") == "json_schema":
        return (form.get("json_schema") or {}).get("schema") or {}
    structured = body.get("structured_outputs")
    if isinstance(structured, dict) and structured.get("json") is not None:
        return structured["json"]
    return body.get("guided_json")


def _unsupported(schema: Any) -> str | None:
    """Why this fake cannot follow `schema` (None: it can)."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return "only an object schema is supported"
    kinds = {name: (spec or {}).get("type") for name, spec in (schema.get("properties") or {}).items()}
    odd = sorted(name for name, kind in kinds.items() if kind not in SCHEMA_TYPES)
    return f"unsupported property types of {odd}" if odd else None


def _json_entries(schema: dict, rng: random.Random, offset: int, tokens: int) -> list[dict[str, Any]]:
    """Tokens of a JSON object that follows `schema`: strings are words, numbers from enum or range."""
    entries, first = [_entry("{")], True
    for name, spec in schema.get("properties", {}).items():
        entries.append(_entry(("" if first else ", ") + orjson.dumps(name).decode() + ": "))
        first = False
        if spec["type"] == "string":
            entries += [_entry('"'), *_words(offset, max(1, tokens))[1], _entry('"')]
        elif spec["type"] == "boolean":
            entries.append(_entry(rng.choice(["true", "false"])))
        else:
            low, high = spec.get("minimum", 0), spec.get("maximum", 10)
            value = rng.choice(spec["enum"]) if spec.get("enum") else rng.randint(int(low), int(high))
            entries.append(_entry(str(value)))
    return [*entries, _entry("}")]


def _rating_entry(rating: int) -> dict[str, Any]:
    """The rating token, with alternatives r, r+1, r+2 (mod 11) at 0.5, 0.3, 0.2."""
    alternatives = [
        _entry(str((rating + k) % 11)) | {"logprob": math.log(p)} for k, p in enumerate((0.5, 0.3, 0.2))
    ]
    for alternative in alternatives:
        del alternative["top_logprobs"]
    return alternatives[0] | {"top_logprobs": alternatives}


def _with_top(entry: dict[str, Any], top: int) -> dict[str, Any]:
    """`entry` with its first `top` alternatives (the token itself where it has none)."""
    alternatives = entry["top_logprobs"] or [{k: entry[k] for k in ("token", "logprob", "bytes")}]
    return entry | {"top_logprobs": alternatives[:top]}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--median-tokens", type=int, default=300)
    parser.add_argument("--token-latency-s", type=float, default=0.0005)
    parser.add_argument("--first-token-s", type=float, default=0.01)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument(
        "--faults", type=Faults.parse, default=Faults(), help="e.g. transient_429=0.05,context_400=0.01"
    )
    parser.add_argument("--one-choice", action="store_true", help="ignore n, answer one choice")
    args = parser.parse_args()
    server = FakeVLLMServer(
        model=args.model,
        seed=args.seed,
        token_latency_s=args.token_latency_s,
        first_token_s=args.first_token_s,
        median_tokens=args.median_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        faults=args.faults,
        port=args.port,
        one_choice=args.one_choice,
    )
    # Ctrl-C (SIGINT) stops it even when started from a shell's background job, which runs its
    # commands with SIGINT ignored (and Python keeps a signal that was ignored at start ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with server:
        print(f"serving {args.model} on {server.base_url} (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
        print(server.stats(), flush=True)


if __name__ == "__main__":
    main()
