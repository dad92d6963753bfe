"""What a request to a model is and what comes back, with no engine behind it: ChatRequest,
Completion, Reply, the request statuses and which of them are not final, and `Chat`, the one method
of an engine that row logic calls. Engines (stages/core/engines) implement it; rows build requests
and read replies through it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from stages.core.config.params import Sampling

OK, TOO_LONG, FAILED = "ok", "skipped_too_long", "failed"  # Reply.status
PARTIAL = "partial"  # Reply.status: fewer completions than the request's n came back
# a judgement status: the server answered but did not honour the judge mode asked (no logprobs, text
# that is not the schema's JSON); the score is read from the text and the request counts as failed
MODE_IGNORED = "mode_ignored"
# statuses that are not final: the next run of the stage asks such a request again
RETRY = (FAILED, PARTIAL, MODE_IGNORED)


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
    status: str = OK  # OK, TOO_LONG (not sent) or FAILED (after the engine's retries)
    detail: str | None = None  # the error or the token counts, for logs


def unfinished(status: str | None) -> bool:
    """Whether a request status recorded in a stage's out is to be asked again on the next run:
    failed or partial, also as the suffix of a compound status (`follow_up_failed`)."""
    return status is not None and (status in RETRY or status.endswith(tuple(f"_{s}" for s in RETRY)))


class Chat(Protocol):
    """What row logic needs of an engine: one Reply per request, in order."""

    def chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]: ...
