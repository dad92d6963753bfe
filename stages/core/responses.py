"""Arrow types of the generate/score tables, and the conversion from engine completions."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from stages.core.engines import Completion

RESPONSE = pa.struct(
    [
        ("content", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
)
RESPONSES = pa.list_(RESPONSE)
ANNOTATION = pa.struct(
    [
        ("response_token_length", pa.int64()),
        ("judgement", pa.string()),
        ("repetition_flag", pa.bool_()),
        ("preference_score", pa.float64()),
    ]
)
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def as_rows(completions: list[Completion]) -> list[dict]:
    return [
        {
            "content": c.text,
            "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
        }
        for c in completions
    ]


def request_seed(seed: int, conversation_id: str, purpose: str) -> int:
    """A per-request seed that depends only on the run seed, the conversation and the purpose."""
    digest = hashlib.sha256(f"{seed}:{conversation_id}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
