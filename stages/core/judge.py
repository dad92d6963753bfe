"""Row logic of score: judge messages, the rating parser, and best-response selection."""

from __future__ import annotations

import re

from stages.core.prompts import user_turn

FAILED = -1.0
MAX_SCORE = 10.0
# "[[7]]", "Rating: [[7.5]]", "[7]", "Score: 7/10", "rating: 7", in order of trust.
PATTERNS = [
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),
    re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]"),
    re.compile(r"(\d+(?:\.\d+)?)\s*/\s*10\b"),
    re.compile(r"(?i)\b(?:rating|score)\s*[:：]\s*(\d+(?:\.\d+)?)"),
]


def judge_messages(prompt: str, question: str, answer: str) -> list[dict[str, str]]:
    return user_turn(prompt, question=question, answer=answer)


def parse_score(text: str | None) -> float:
    """The 0-10 rating in a judge's output; FAILED (-1) if there is none or it is out of range.

    The last match of the most trusted pattern wins: judges often quote the format before rating.
    """
    if not text:
        return FAILED
    for pattern in PATTERNS:
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            return value if 0.0 <= value <= MAX_SCORE else FAILED
    return FAILED


def best_index(scores: list[float]) -> int | None:
    """Index of the highest valid score (the first on ties); None when every judgement failed."""
    valid = [(score, -i) for i, score in enumerate(scores) if score != FAILED]
    return -max(valid)[1] if valid else None


def annotations(responses: list[dict], verdicts: list[str], repetition_min_tokens: int) -> list[dict]:
    """The published per-response annotations, aligned with `responses`."""
    return [
        {
            "response_token_length": response["completion_tokens"],
            "judgement": verdict,
            "repetition_flag": response["completion_tokens"] >= repetition_min_tokens,
            "preference_score": parse_score(verdict),
        }
        for response, verdict in zip(responses, verdicts, strict=True)
    ]
