"""What a request to a model is and what comes back, with no engine behind it: ChatRequest,
Completion, Reply, the request statuses and which of them are not final, and `Chat`, the one method
of an engine that row logic calls. Engines (stages/core/engines) implement it; rows build requests
and read replies through it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from stages.core.config.engine_params import Sampling

OK, TOO_LONG, FAILED = "ok", "skipped_too_long", "failed"  # Reply.status
PARTIAL = "partial"  # Reply.status: fewer completions than the request's n came back
# a judgement status: the server answered but did not honour the judge mode asked (no logprobs, text
# that is not the schema's JSON); the score is read from the text and the request counts as failed
MODE_IGNORED = "mode_ignored"
# judgement statuses, final: the server honoured the mode but the judgement has no rating in it
# (PARSED), or it was cut at max_tokens without one (TRUNCATED); both are scored by parsing the text
PARSED, TRUNCATED = "parsed_from_text", "truncated"
# the engine refused the request for a reason a re-run cannot change (a validation error, a hosted
# content filter): final after the first refusal, counted, never asked again and never "ok"
REFUSED = "refused"
# statuses that are not final: the next run of the stage asks such a request again
RETRY = (FAILED, PARTIAL, MODE_IGNORED)
# statuses the response cache keeps besides OK: decided by what the request key holds
FINAL_WITHOUT_ANSWER = (TOO_LONG, REFUSED)


@dataclass(frozen=True)
class ChatRequest:
    """One chat to complete n times. The optional fields change the output, so `options()` puts the
    ones set into the response cache key (a request that sets none keeps its key)."""

    messages: list[dict[str, str]]
    n: int = 1
    seed: int = 0
    json_schema: dict | None = None  # structured output: each completion is JSON that follows it
    # each completion's tokens with up to this many alternatives (token text -> logprob) each, at the
    # LOGPROB_SPAN tokens that follow each `logprobs_after` text in it (every token where it is "")
    top_logprobs: int = 0
    logprobs_after: str = ""

    def options(self) -> dict[str, Any]:
        """The optional fields this request sets, as they enter a cache key."""
        found: dict[str, Any] = {}
        if self.json_schema is not None:
            found["json_schema"] = self.json_schema
        if self.top_logprobs:
            found |= {"top_logprobs": self.top_logprobs, "logprobs_after": self.logprobs_after}
        return found


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    # with ChatRequest.top_logprobs: [token text, {alternative text: logprob}] per generated token (see
    # `token_logprobs`); None where not asked or where the backend returned none
    logprobs: list[list] | None = None


@dataclass(frozen=True)
class Reply:
    """What came of one request: its completions (up to n), or none and why."""

    completions: list[Completion]
    status: str = OK  # OK, PARTIAL, TOO_LONG (not sent), REFUSED (final) or FAILED (after retries)
    detail: str | None = None  # the error or the token counts, for logs


def honours(completion: Completion, request: ChatRequest) -> bool:
    """The one rule of whether a completion came back in the form its request asked (the response
    cache keeps only such answers, and the judge counts the others as MODE_IGNORED): logprobs where
    top_logprobs were asked (a server may ignore them and still answer 200); JSON where a schema was
    sent, unless the completion was cut at max_tokens (`finish_reason` "length": the server honoured the
    schema and ran out of tokens; asking again with the same seed gives the same cut text)."""
    if request.top_logprobs and completion.logprobs is None:
        return False
    if request.json_schema is None or completion.finish_reason == "length":
        return True
    try:
        json.loads(completion.text)
    except ValueError:
        return False
    return True


def unfinished(status: str | None) -> bool:
    """Whether a request status recorded in a stage's out is to be asked again on the next run:
    failed or partial, also as the suffix of a compound status (`follow_up_failed`)."""
    return status is not None and (status in RETRY or status.endswith(tuple(f"_{s}" for s in RETRY)))


class Chat(Protocol):
    """What row logic needs of an engine: one Reply per request, in order."""

    def chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]: ...
