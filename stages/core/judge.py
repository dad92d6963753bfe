"""Row logic of score: judge requests, the rating parser, the score of each judge mode, and
best-response selection.

A judgement becomes its score by `score.mode`: `parse` (published) reads the rating in the text;
`structured` asks the engine for JSON that follows JUDGEMENT_SCHEMA, so a rating is always written,
and reads its "rating"; `logprob` asks for the top alternatives of the tokens after "[[" and scores
the expected rating over the rating tokens among them (`expected_rating`)."""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
import unicodedata

import pyarrow as pa

from stages.core.engines import ChatRequest, Completion, Engine, Reply
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
RATINGS = list(range(11))
# structured mode: an explanation first (as the prompt asks), then a rating the schema restricts to 0-10
JUDGEMENT_SCHEMA = {
    "title": "judgement",
    "type": "object",
    "properties": {"explanation": {"type": "string"}, "rating": {"type": "integer", "enum": RATINGS}},
    "required": ["explanation", "rating"],
    "additionalProperties": False,
}
RATING_MARK = "[["  # logprob mode: the rating token follows it ("Rating: [[7]]")
RATING_TOKEN = re.compile(r"10|[0-9]")  # what a rating token reads, past "[[" and spaces


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


def structured_score(text: str | None) -> float:
    """The "rating" of a JSON judgement (structured mode); parse_score of the text where it is not
    such JSON (cut at max_tokens, say)."""
    try:
        rating = json.loads(text)["rating"]
    except (TypeError, ValueError, KeyError):
        return parse_score(text)
    valid = isinstance(rating, int | float) and not isinstance(rating, bool) and 0 <= rating <= MAX_SCORE
    return float(rating) if valid else parse_score(text)


def expected_rating(completion: Completion) -> float:
    """Logprob mode: the expected rating, sum of p(k) * k over the ratings k = 0..10 that the top
    alternatives of the token after the last "[[" (that has any) read, p renormalised over them.

    A token reads rating k when, past the part of "[[" it holds, it is k's digits (spaces around
    them allowed; no leading zero). "10" may be one token (Llama 3) or "1" then "0" (Gemma splits digits):
    - a "10" token among the alternatives: the tokenizer writes 10 as one token, so "1" is 1;
    - else, where the sampled token is "1", the next token's alternatives split its mass: "0" (and no
      further digit) is 10, a token that is no digit is 1, other digits (11-19) are dropped;
    - else "1" cannot be told from the start of a 10: its mass goes to whichever of 1 and 10 is
      nearer the mean of the other ratings (10 on a tie), or, with no other rating, the "[[" is skipped.
    Where no "[[" is followed by rating alternatives (or the engine returned no logprobs), the score
    is parse_score of the text, so FAILED (-1) only where that finds no rating either.
    """
    tokens = completion.logprobs or []
    joined = "".join(token for token, _ in tokens)
    starts = list(itertools.accumulate((len(token) for token, _ in tokens[:-1]), initial=0))
    ends = [m.end() for m in re.finditer(re.escape(RATING_MARK), joined)]
    for end in reversed(ends):
        holder = bisect.bisect_right(starts, end) - 1
        if holder < 0 or end >= starts[holder] + len(tokens[holder][0]) or not tokens[holder][1]:
            continue
        following = tokens[holder + 1] if holder + 1 < len(tokens) else None
        ratings = _ratings(tokens[holder], joined[starts[holder] : end], following)
        if ratings:
            total = sum(ratings.values())
            return sum(p * k for k, p in ratings.items()) / total
    return parse_score(completion.text)


def _ratings(token: list, prefix: str, following: list | None) -> dict[int, float]:
    """Probability of each rating at `token` ([text, alternatives]) whose text starts with `prefix`
    (the end of "[["), the "1" of a split 10 resolved as `expected_rating` says."""
    ratings: dict[int, float] = {}
    ones = 0.0  # mass of a bare "1": 1, or the first token of "10"
    for text, logprob in token[1].items():
        rest = text.removeprefix(prefix).strip() if text.startswith(prefix) else ""
        if not RATING_TOKEN.fullmatch(rest):
            continue
        if rest == "1":
            ones += math.exp(logprob)
        else:
            ratings[int(rest)] = ratings.get(int(rest), 0.0) + math.exp(logprob)
    if not ones or 10 in ratings:
        return ratings | ({1: ones} if ones else {})
    sampled = token[0].removeprefix(prefix).strip() if token[0].startswith(prefix) else ""
    if sampled == "1":
        zero, end = _after_one(following[1] if following else {})
        share = zero / (zero + end) if zero + end else 0.0  # the text ended after "1": a 1
        return ratings | {1: ones * (1 - share), 10: ones * share}
    if not ratings:
        return {}
    mean = sum(p * k for k, p in ratings.items()) / sum(ratings.values())
    return ratings | {1 if mean - 1 < 10 - mean else 10: ones}


def _after_one(alternatives: dict[str, float]) -> tuple[float, float]:
    """(mass of "0" ending the number, mass of a token that starts with no digit) after a "1"."""
    zero = end = 0.0
    for text, logprob in alternatives.items():
        if re.match(r"0(?![0-9])", text):
            zero += math.exp(logprob)
        elif not text[:1].isdigit():
            end += math.exp(logprob)
    return zero, end


def score_of(completion: Completion | None, mode: str) -> float:
    """The 0-10 score of a judgement by `score.mode` (FAILED without a judgement)."""
    if completion is None:
        return FAILED
    if mode == "structured":
        return structured_score(completion.text)
    if mode == "logprob":
        return expected_rating(completion)
    return parse_score(completion.text)


def judge_request(spec: ScoreParams, question: str, answer: str, seed: int) -> ChatRequest:
    """The judge request of one response: structured output or logprobs as `spec.mode` asks."""
    messages = judge_messages(spec.prompt, question, answer)
    if spec.mode == "structured":
        return ChatRequest(messages, seed=seed, json_schema=JUDGEMENT_SCHEMA)
    if spec.mode == "logprob":
        return ChatRequest(messages, seed=seed, top_logprobs=spec.top_logprobs, logprobs_after=RATING_MARK)
    return ChatRequest(messages, seed=seed)


def best_index(scores: list[float]) -> int | None:
    """Index of the highest valid score (the first on ties); None when every judgement failed."""
    valid = [(score, -i) for i, score in enumerate(scores) if score != FAILED]
    return -max(valid)[1] if valid else None


def annotations(
    responses: list[dict], replies: list[Reply], repetition_threshold: int, mode: str = "parse"
) -> list[dict]:
    """The published per-response annotations, aligned with `responses` (judgement null and score
    -1 where the judge request was not sent or failed), scored by judge mode `mode`."""
    notes = []
    for response, reply in zip(responses, replies, strict=True):
        judged = reply.completions[0] if reply.completions else None
        notes.append(
            {
                "response_token_length": response["completion_tokens"],
                "judgement": judged.text if judged else None,
                "repetition_flag": response["completion_tokens"] > repetition_threshold,
                "preference_score": score_of(judged, mode),
            }
        )
    return notes


def judge_rows(engine: Engine, rows: list[dict], spec: ScoreParams, seed: int) -> tuple[list, list]:
    """Judge every response of every row in one batched call: per row its annotations and each
    judge request's status (both None for a row without responses)."""
    requests = [
        judge_request(
            spec,
            r["instruction_ja"],
            response["content"],
            request_seed(seed, r["conversation_id"], f"judge:{j}"),
        )
        for r in rows
        for j, response in enumerate(r["responses_ja"] or [])
    ]
    replies = iter(engine.chat(requests, spec.sampling))
    notes, statuses = [], []
    for r in rows:
        mine = None if r["responses_ja"] is None else [next(replies) for _ in r["responses_ja"]]
        notes.append(
            None
            if mine is None
            else annotations(r["responses_ja"], mine, spec.repetition_threshold, spec.mode)
        )
        statuses.append(None if mine is None else [reply.status for reply in mine])
    return notes, statuses


def judge_table(engine: Engine, part: pa.Table, spec: ScoreParams, seed: int) -> pa.Table:
    """One shard of score's out: annotations, best response and judge statuses of each row."""
    notes, statuses = judge_rows(engine, part.to_pylist(), spec, seed)
    best = [None if n is None else best_index([x["preference_score"] for x in n]) for n in notes]
    nulls = [None] * part.num_rows  # the second pass, where the variant has one, fills these
    return pa.table([part["conversation_id"], notes, best, statuses, nulls, nulls], schema=SCORED)
