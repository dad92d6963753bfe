"""Row logic of score: judge messages, the rating parser, and best-response selection."""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa

from stages.core.engines import ChatRequest, Engine, Reply
from stages.core.params import ScoreParams
from stages.core.prompts import user_turn
from stages.core.responses import SCORE_FAILED, SCORED, request_seed

FAILED = SCORE_FAILED
MAX_SCORE = 10.0
# A rating value: "7", "7.5" or "8" of "8." at a sentence end; never part of a longer number ("2023"),
# a negative number ("-3"), a range ("1-10", "1 to 10") or a scale ("10点満点", "10点中").
NUMBER = r"(?<![\d.\-−])(\d+(?:\.\d+)?)(?!\.?\d|\s*(?:[-–~]|to\b)\s*\d|\s*点(?:満点|中))"
# "Rating:", "**Final score** is", "Score (1-10) =", "Score out of 10:", "評価は", "点数:", "a score of".
LABEL = (
    r"(?:\b(?:(?:overall|final)\s+)?(?:rating|score|grade)s?\b|総合評価|評価|点数|スコア|採点)"
    r"(?:[ \t]*(?:\([^()\n]{0,30}\)|out\s+of\s+10|/\s*10))?"
    r"[ \t*]*(?:[:=]|\bis\b|\bwould\s+be\b|\bof\b|は|を)"
    r"(?![ \t*:]*\[[^\]\n]*(?:\n|\Z))"  # a "[" must close on its line: "Rating: [[1" may be a cut "[[10]]"
    r"[ \t*:\[「『【]*"
)
OTHER_SCALE = r"(?![ \t*\]」』】]*(?:/|out\s+of)\s*(?!10(?!\d))\d)"  # "Rating: 4/5" is not a 0-10 rating
DOUBLE_BRACKET = re.compile(rf"\[\[[ \t*]*{NUMBER}[ \t*]*(?:/[ \t]*10[ \t]*)?\]\]")  # "[[7]]", "[[ 7.5 ]]"
LABELLED = re.compile(rf"(?i){LABEL}{NUMBER}{OTHER_SCALE}")  # "Rating: **7**/10", "評価: 7点"
JSON_FIELD = re.compile(rf"""(?i)["'](?:\w*_)?(?:score|rating)["']\s*:\s*"?{NUMBER}""")  # {"score": 7}
OUT_OF_TEN = re.compile(  # "7/10", "7 out of 10", "10点中7点", "7点"; not a date ("2023/10", "3/10/2024")
    rf"(?i){NUMBER}[ \t*]*(?:(?:/[ \t]*|out\s+of\s+)10(?![\d/]|\.\d)|点)"
)
BARE_BRACKET = re.compile(rf"\[[ \t*]*{NUMBER}[ \t*]*\]")  # "[7]", last: "[1][2]" are usually citations
PATTERNS = (DOUBLE_BRACKET, LABELLED, JSON_FIELD, OUT_OF_TEN, BARE_BRACKET)  # in order of trust


def judge_messages(prompt: str, question: str, answer: str) -> list[dict[str, str]]:
    return user_turn(prompt, question=question, answer=answer)


def parse_score(text: str | None) -> float:
    """The 0-10 rating a judge meant; FAILED (-1) when its output holds none in range. Never raises.

    The text is NFKC-normalised (full-width digits, colons, brackets), then the first of PATTERNS with an
    in-range value gives its LAST in-range match: judges often quote the format before they rate.
    Out-of-range values are skipped, so a pattern holding only those falls through to the next one.
    """
    if not isinstance(text, str):  # None, or NaN from a missing pandas cell
        return FAILED
    text = unicodedata.normalize("NFKC", text)
    for pattern in PATTERNS:
        in_range = [value for value in map(float, pattern.findall(text)) if 0.0 <= value <= MAX_SCORE]
        if in_range:
            return in_range[-1]
    return FAILED


def best_index(scores: list[float]) -> int | None:
    """Index of the highest valid score (the first on ties); None when every judgement failed."""
    valid = [(score, -i) for i, score in enumerate(scores) if score != FAILED]
    return -max(valid)[1] if valid else None


def annotations(responses: list[dict], replies: list[Reply], repetition_threshold: int) -> list[dict]:
    """The published per-response annotations, aligned with `responses` (judgement null and score
    -1 where the judge request was not sent or failed)."""
    notes = []
    for response, reply in zip(responses, replies, strict=True):
        verdict = reply.completions[0].text if reply.completions else None
        notes.append(
            {
                "response_token_length": response["completion_tokens"],
                "judgement": verdict,
                "repetition_flag": response["completion_tokens"] > repetition_threshold,
                "preference_score": parse_score(verdict),
            }
        )
    return notes


def judge_rows(engine: Engine, rows: list[dict], spec: ScoreParams, seed: int) -> tuple[list, list]:
    """Judge every response of every row in one batched call: per row its annotations and each
    judge request's status (both None for a row without responses)."""
    requests = [
        ChatRequest(
            judge_messages(spec.prompt, r["instruction_ja"], response["content"]),
            seed=request_seed(seed, r["conversation_id"], f"judge:{j}"),
        )
        for r in rows
        for j, response in enumerate(r["responses_ja"] or [])
    ]
    replies = iter(engine.chat(requests, spec.sampling))
    notes, statuses = [], []
    for r in rows:
        mine = None if r["responses_ja"] is None else [next(replies) for _ in r["responses_ja"]]
        notes.append(
            None if mine is None else annotations(r["responses_ja"], mine, spec.repetition_threshold)
        )
        statuses.append(None if mine is None else [reply.status for reply in mine])
    return notes, statuses


def judge_table(engine: Engine, part: pa.Table, spec: ScoreParams, seed: int) -> pa.Table:
    """One shard of score's out: annotations, best response and judge statuses of each row."""
    notes, statuses = judge_rows(engine, part.to_pylist(), spec, seed)
    best = [None if n is None else best_index([x["preference_score"] for x in n]) for n in notes]
    nulls = [None] * part.num_rows  # the second pass, where the variant has one, fills these
    return pa.table([part["conversation_id"], notes, best, statuses, nulls, nulls], schema=SCORED)
