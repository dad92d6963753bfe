"""Row logic of score: judge replies in, per-response annotations (judgement, score) and judge
statuses out; also the judge requests, the rating parser and best-response selection.

A judgement becomes its score by `score.mode`: `parse` (the default; the published parser is not
public, docs/assumptions.md) reads the rating in the text; `structured` asks the engine for JSON that
follows JUDGEMENT_SCHEMA, so a rating is always written, and reads its "rating"; `logprob` asks for
the top alternatives of the tokens after "[[" and scores the expected rating over the rating tokens
among them (`expected_rating`). A server that ignores the
mode asked (plain text for a schema, no logprobs) gets the parse score and status MODE_IGNORED
(`effective_mode`), so the request is asked again and counted, never passed off as "ok"."""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
import unicodedata

import pyarrow as pa

from stages.core.config.variant_params import ScoreParams
from stages.core.rows import fields
from stages.core.rows.prompts import PUBLISHED, published_judge, user_turn
from stages.core.rows.requests import (
    MODE_IGNORED,
    OK,
    PARSED,
    TRUNCATED,
    Chat,
    ChatRequest,
    Completion,
    Reply,
    honours,
)
from stages.core.rows.responses import SCORED, request_seed
from stages.core.rows.scores import SCORE_FAILED, best_index

FAILED = SCORE_FAILED
MAX_SCORE = 10.0
# A rating value: "7", "7.5" or "8" of "8." at a sentence end; never part of a longer number ("2023"),
# a negative number ("-3"), a range ("1-10", "1 to 10") or a scale ("10点満点", "10点中").
NUMBER = r"(?<![\d.\-−])(\d+(?:\.\d+)?)(?!\.?\d|\s*(?:[-–~]|to\b)\s*\d|\s*点(?:満点|中))"
# "Rating:", "**Final score** is", "Score (1-10) =", "Score out of 10:", "評価は", "点数は10点中",
# "a score of".
LABEL = (
    r"(?:\b(?:(?:overall|final)\s+)?(?:rating|score|grade)s?\b|総合評価|評価|点数|スコア|採点)"
    r"(?:[ \t]*(?:\([^()\n]{0,30}\)|out\s+of\s+10|/\s*10))?"
    r"[ \t*]*(?:[:=]|\bis\b|\bwould\s+be\b|\bof\b|は|を)"
    r"(?![ \t*:]*\[[^\]\n]*(?:\n|\Z))"  # a "[" must close on its line: "Rating: [[1" may be a cut "[[10]]"
    r"[ \t*:\[「『【]*(?:10[ \t]*点(?:満点)?中[ \t]*)?"
)
OTHER_SCALE = r"(?![ \t*\]」』】]*(?:/|out\s+of)\s*(?!10(?!\d))\d)"  # "Rating: 4/5" is not a 0-10 rating
COUNTER = r"(?![ \t]*(?:つ|個|項目|段階|件|回|年|月|日|%))"  # "評価は3つの観点で", "評価は5段階" count things
SCALE_10 = r"[ \t*]*(?:/[ \t]*|out\s+of\s+)10(?![\d/]|\.\d)"  # "/10", " out of 10"; not "10/5", "10.5"
DOUBLE_BRACKET = re.compile(rf"\[\[[ \t*]*{NUMBER}[ \t*]*(?:/[ \t]*10[ \t]*)?\]\]")  # "[[7]]", "[[ 7.5 ]]"
LABELLED = re.compile(rf"(?i){LABEL}{NUMBER}{OTHER_SCALE}{COUNTER}")  # "Rating: **7**/10", "評価: 7点"
JSON_FIELD = re.compile(rf"""(?i)["'](?:\w*_)?(?:score|rating)["']\s*:\s*"?{NUMBER}""")  # {"score": 7}
# a rating verb: "I'd give it 4/10", "I rate this answer a solid 7 out of 10", "7点をつけます", "8点とします"
RATED = re.compile(
    rf"(?i)\b(?:give[sn]?|giving|gave|rate[sd]?)\s+(?:(?:it|this|that|the|my)\b(?:\s+(?:response|answer"
    rf"|reply|one))?\s+)?(?:(?:an?|at|as)\s+(?:[a-z]+\s+)?)?\**{NUMBER}\**{SCALE_10}(?!\s+of\b)"
    rf"|{NUMBER}[ \t]*点[ \t]*(?:を[ \t]*(?:つけ|付け|与え)(?!加|足)|と[ \t]*(?:し|評価|判断))"
)
# An unlabelled rating ("8/10", "8 out of 10", "7点", "[7]") is a rating only where it stands alone
# at the close of the judgement. ALONE: it starts the text or a line, or follows a sentence or clause
# mark (. ! ? 。 : , 、 — –), past spaces and opening markup (* _ # > ( 「 『 【 " “).
ALONE = r"(?:^|(?<=[.!?。:,、—–]))[ \t*_#>(「『【\"“]*"
# CLOSING: nothing follows it to the end but whitespace, punctuation (. , ; ! ? 。 、), closing
# brackets and quotes () ] } 」 』 】 〉 》 " ' ” ’), markdown (* _ ~ `), closing HTML tags ("</b>")
# and a scale note ("(10点満点)", "(out of 10)").
CLOSING = r"(?=(?:[\s.,;!?。、)\]}」』】〉》\"'”’*_~`]|</\w+>|\((?:10点満点|out\s+of\s+10)\))*\Z)"
OUT_OF_TEN = re.compile(  # "7/10", "7 out of 10", "10点中7点", "7点"; not a date ("2023/10", "3/10/2024")
    rf"(?im){ALONE}(?:10[ \t]*点(?:満点)?中[ \t]*)?{NUMBER}(?:{SCALE_10}|[ \t*]*点){CLOSING}"
)
BARE_BRACKET = re.compile(rf"(?m){ALONE}\[[ \t*]*{NUMBER}[ \t*]*\]{CLOSING}")  # "[7]"; not "see [1] and [2]."
PATTERNS = (DOUBLE_BRACKET, LABELLED, JSON_FIELD, RATED, OUT_OF_TEN, BARE_BRACKET)  # in order of trust
GOVERNED = (LABELLED, RATED, OUT_OF_TEN)  # patterns whose match a negation or a condition can void
# A quote: "…" and '…' within a line, opened after no letter and closed before none (not 12", it's);
# “…”, 「…」, 『…』 across lines; a `code` span (not a ``` fence, so a fenced JSON judgement still counts).
QUOTED = re.compile(
    r"(?<![\w\"])\"(?=\S)[^\"\n]*?(?<=\S)\"(?!\w)|(?<![\w'’])'(?=\S)[^'\n]*?(?<=\S)'(?!\w)"
    r"|“[^“”]*”|「[^「」]*」|『[^『』]*』|(?<!`)`[^`\n]+`(?!`)"
)
BLOCKQUOTE = re.compile(r"(?m)^[ \t]*>.*$")  # a markdown blockquote line, "> ..."
# a label or a JSON key just before a quote makes it the judge's own words: 'Rating: "[[7]]"', a JSON
# judgement cut short ('{"explanation": "... Rating: [[6]]", "rati')
QUOTE_LABEL = re.compile(
    r"(?i)(?:(?:\b(?:rating|score|grade|verdict)s?|評価|点数|スコア|採点)[ \t*]*[:=]|[\"']\s*:)[ \t*]*\Z"
)
LOOKBACK = 300  # characters searched on each side of a match for its clause and sentence
# where a clause starts: a clause or sentence mark, a bracket, a dash or a conjunction
CLAUSE_MARK = re.compile(
    r"(?i)[,;:.!?。、—–()\n]|\b(?:and|but|so|because|since|although|though|while|whereas|yet|however)\b"
    r"|が[、,]|けど|しかし|ただし"
)
# where a sentence starts: a sentence mark or a contrast ("If it were perfect, 10/10; but as it is 6/10")
SENTENCE_MARK = re.compile(r"(?i)[;.!?。\n]|\b(?:but|however|yet)\b|が[、,]|けど|しかし|ただし")
# a negation in the rating's clause: "I would not give", "I wouldn't rate", "never", "cannot", "no way";
# not a bare "no", which negates a noun ("no errors, I give it 9/10")
NEGATION = re.compile(r"(?i)\b(?:not|never|cannot)\b|n['’]t\b|\bno\s+(?:way|means)\b")
# a counterfactual in the rating's clause: "I would have given it 9/10", "I'd have rated it"
COUNTERFACTUAL = re.compile(r"(?i)(?:\b(?:would|could|should|might)|['’]d)\s+(?:not\s+)?have\b")
# a condition in the rating's sentence: "if", "unless", "Had it cited sources, ...", "Were it ...",
# "もし", "完璧であれば", "引用していれば", "例があったら", "完璧なら"; not "even if", "as if", "if I had to
# rate it", "if you ask me", "if anything", nor code ("an if statement", "`if`", "if/else", "ならない")
CONDITION = re.compile(
    r"(?i)(?<!even )(?<!as )(?<!`)\bif\b(?![-/`]|\s+(?:(?:I|we)\s+(?:had|have|must)|you\s+ask|anything"
    r"|statements?|else|blocks?|clauses?|conditions?|branch(?:es)?|checks?)\b)|\bunless\b"
    r"|(?:^|,)\W*(?:had|were|should)\s+(?:it|this|that|they|the)\b"
    r"|もし|であれば|ていれば|ったら|ならば?(?![ないびず])"
)
MODAL = re.compile(r"(?i)\b(?:would|could|might)\b|['’]d\b")  # "I'd give it 9/10 if it had sources"
# a Japanese negation right after the rating, past kana only: "10点をつけることはできません", "7点ではない"
JA_NEGATION = re.compile(r"[点 \t]*[ぁ-ゖ]*?(?:な(?:い|かっ)|ません|かね(?:ます|る))")
RATINGS = list(range(11))
# structured mode: an explanation first (as the prompt asks), then a rating the schema restricts to 0-10
JUDGEMENT_SCHEMA = {
    "title": "judgement",
    "type": "object",
    "properties": {"explanation": {"type": "string"}, "rating": {"type": "integer", "enum": RATINGS}},
    "required": ["explanation", "rating"],
    "additionalProperties": False,
}
# what each mode asks of the engine, as `honours` reads a request (only these fields matter to it)
ASKED = {
    "parse": ChatRequest([]),
    "structured": ChatRequest([], json_schema=JUDGEMENT_SCHEMA),
    "logprob": ChatRequest([], top_logprobs=1),
}
RATING_MARK = "[["  # logprob mode: the rating token follows it ("Rating: [[7]]")
# what a rating token reads past "[[" and spaces: its digits, and the closing "]]" where the tokenizer
# writes the rating and its close as one token ("[[1]]" in the tiny model's vocabulary)
RATING_TOKEN = re.compile(r"(10|[0-9])\s*(\]{1,2})?")


def judge_messages(prompt: str, question: str, answer: str) -> list[dict[str, str]]:
    """The judge's messages: for `published`, the release's judge prompt (its system message and its
    user turn); else the user turn of template `prompt`."""
    if prompt == PUBLISHED:
        return published_judge().messages(question, answer)
    return user_turn(prompt, question=question, answer=answer)


def parse_score(text: str | None) -> float:
    """The 0-10 rating a judge meant; FAILED (-1) when its output holds none in range. Never raises.

    The text is NFKC-normalised (full-width digits, colons, brackets), then the first of PATTERNS with an
    in-range value gives its LAST in-range match: judges often quote the format before they rate.
    Out-of-range values are skipped, so a pattern holding only those falls through to the next one.
    An explicit rating (DOUBLE_BRACKET "[[7]]", LABELLED "Rating: 7", JSON_FIELD '"rating": 7', RATED
    "I'd give it 7/10") counts anywhere in the text. An unlabelled one (OUT_OF_TEN "7/10", "7点",
    BARE_BRACKET "[7]") counts only where it stands ALONE at the CLOSING of the text: after the start, a
    line break or a sentence or clause mark, and before nothing but whitespace, punctuation and closing
    markup. So "Step 1/10 is wrong." and "Refer to [2] and [5]." hold no rating; "... Overall: 8/10"
    and "良い回答です。[7]" do.

    A match is not the judge's rating (`_stated`) where it lies wholly inside a quote (QUOTED: the
    answer's or the prompt's words, 'it ends with "Rating: 9"'), unless a label opens the quote
    ('Rating: "[[7]]"'); blockquote lines ("> Rating: 9") count as quotes only where the text has a
    rating outside them. A LABELLED, RATED or OUT_OF_TEN match is also void where a negation or a
    condition governs it (`_governed`): "I would not give it 10/10", "If it were perfect, I'd give it 10/10".
    """
    if not isinstance(text, str):  # None, or NaN from a missing pandas cell
        return FAILED
    text = unicodedata.normalize("NFKC", text)
    quoted = _quoted_spans(text)
    blockquoted = [(m.start(), m.end()) for m in BLOCKQUOTE.finditer(text)]
    score = _last_rating(text, quoted + blockquoted)
    return _last_rating(text, quoted) if score == FAILED and blockquoted else score


def _last_rating(text: str, quoted: list[tuple[int, int]]) -> float:
    """The last in-range `_stated` value of the first of PATTERNS that has one; FAILED where none has."""
    for pattern in PATTERNS:
        for match in reversed(list(pattern.finditer(text))):
            value = float(match.group(match.lastindex))  # RATED has two groups
            if 0.0 <= value <= MAX_SCORE and _stated(text, match, quoted):
                return value
    return FAILED


def _quoted_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) of the inside of each QUOTED span of `text` that no QUOTE_LABEL opens."""
    return [
        (m.start() + 1, m.end() - 1)
        for m in QUOTED.finditer(text)
        if not QUOTE_LABEL.search(text, max(0, m.start() - 30), m.start())
    ]


def _stated(text: str, match: re.Match, quoted: list[tuple[int, int]]) -> bool:
    """Whether `match` is the judge's own rating: inside none of the `quoted` spans and, for a GOVERNED
    pattern, not `_governed`."""
    inside = any(start <= match.start() and match.end() <= end for start, end in quoted)
    return not inside and not (match.re in GOVERNED and _governed(text, match))


def _governed(text: str, match: re.Match) -> bool:
    """Whether a negation or a condition governs the rating `match`:
    - a NEGATION or a COUNTERFACTUAL in its clause, back to the last CLAUSE_MARK ("I wouldn't rate it
      9 out of 10", "I would have given it 9/10"); or a JA_NEGATION right after it ("10点をつけられません");
    - a CONDITION in its sentence, back to the last SENTENCE_MARK ("If it were perfect, I'd give it 10/10";
      "完璧であれば10点をつけます"), or after it in its sentence where a MODAL comes before the number
      ("I would give it 9/10 if it cited sources").
    """
    before = text[max(0, match.start() - LOOKBACK) : match.start()]
    clause, sentence = _after_last(CLAUSE_MARK, before), _after_last(SENTENCE_MARK, before)
    if NEGATION.search(clause) or COUNTERFACTUAL.search(clause) or JA_NEGATION.match(text, match.end()):
        return True
    if CONDITION.search(sentence):
        return True
    after = SENTENCE_MARK.split(text[match.end() : match.end() + LOOKBACK], maxsplit=1)[0]
    return bool(MODAL.search(clause + match.group()) and CONDITION.search(after))


def _after_last(mark: re.Pattern, text: str) -> str:
    """`text` after the last match of `mark`; all of it where there is none."""
    ends = [m.end() for m in mark.finditer(text)]
    return text[ends[-1] :] if ends else text


def json_rating(text: str | None) -> float | None:
    """The "rating" of a JSON judgement (structured mode) when it is a number in 0-10; None where the
    text is no such JSON (the server ignored the schema, or the output was cut at max_tokens)."""
    try:
        rating = json.loads(text)["rating"]
    except (TypeError, ValueError, KeyError):
        return None
    valid = isinstance(rating, int | float) and not isinstance(rating, bool) and 0 <= rating <= MAX_SCORE
    return float(rating) if valid else None


def structured_score(text: str | None) -> float:
    """The "rating" of a JSON judgement (structured mode); parse_score of the text where it is not
    such JSON (cut at max_tokens, say)."""
    rating = json_rating(text)
    return parse_score(text) if rating is None else rating


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
    ratings = rating_alternatives(completion)
    if not ratings:
        return parse_score(completion.text)
    return sum(p * k for k, p in ratings.items()) / sum(ratings.values())


def rating_alternatives(completion: Completion) -> dict[int, float]:
    """The probability of each rating at the last "[[" of `completion` whose next token has rating
    alternatives, as `expected_rating` reads them; {} where none has (or there are no logprobs)."""
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
        if sum(ratings.values()) > 0:  # not all -inf
            return ratings
    return {}


def _ratings(token: list, prefix: str, following: list | None) -> dict[int, float]:
    """Probability of each rating at `token` ([text, alternatives]) whose text starts with `prefix`
    (the end of "[["), the "1" of a split 10 resolved as `expected_rating` says."""
    ratings: dict[int, float] = {}
    ones = 0.0  # mass of a bare "1": 1, or the first token of "10"
    for text, logprob in token[1].items():
        rest = text.removeprefix(prefix).strip() if text.startswith(prefix) else ""
        found = RATING_TOKEN.fullmatch(rest)
        if not found:
            continue
        value, closed = int(found[1]), found[2] is not None
        if value == 1 and not closed:
            ones += math.exp(logprob)
        else:
            ratings[value] = ratings.get(value, 0.0) + math.exp(logprob)
    if not ones or 10 in ratings:
        return ratings | ({1: ones} if ones else {})
    sampled = token[0].removeprefix(prefix).strip() if token[0].startswith(prefix) else ""
    if sampled == "1":
        zero, end = _after_one(following[1] if following else {})
        share = zero / (zero + end) if zero + end else 0.0  # the text ended after "1": a 1
        return ratings | {1: ones * (1 - share), 10: ones * share}
    if not sum(ratings.values()):  # no other rating (or only -inf ones)
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


def effective_mode(completion: Completion, mode: str) -> str:
    """The judge mode `completion` can be scored by: `mode` where the engine honoured it, else "parse".
    structured: honoured where the text is JSON with a 0-10 "rating" (`json_rating`); logprob: where
    some "[[" is followed by rating alternatives (`rating_alternatives`); parse is always honoured."""
    if mode == "structured" and json_rating(completion.text) is None:
        return "parse"
    if mode == "logprob" and not rating_alternatives(completion):
        return "parse"
    return mode


def score_of(completion: Completion | None, mode: str) -> float:
    """The 0-10 score of a judgement by the mode it honours (`effective_mode`; FAILED without one)."""
    if completion is None:
        return FAILED
    honoured = effective_mode(completion, mode)
    if honoured == "structured":
        return structured_score(completion.text)
    if honoured == "logprob":
        return expected_rating(completion)
    return parse_score(completion.text)


def judge_status(reply: Reply, mode: str) -> str:
    """The status of one judge request, final unless the engine's own is not (failed, partial):
    - MODE_IGNORED where the server did not honour the mode asked (`honours`, the rule the response
      cache keeps answers by: no logprobs, text that is no JSON): asked again on the next run;
    - TRUNCATED where the judgement was cut at max_tokens and holds no rating in its mode;
    - PARSED where the server honoured the mode but the judgement has no rating in it (no rating token
      after "[[", say): scored by parsing its text;
    - else the engine's status (OK, also for a parse-mode judgement without a rating: score -1)."""
    judged = reply.completions[0] if reply.completions else None
    if reply.status != OK or judged is None:
        return reply.status
    if not honours(judged, ASKED[mode]):
        return MODE_IGNORED
    if effective_mode(judged, mode) == mode and (mode != "parse" or parse_score(judged.text) != FAILED):
        return OK
    if judged.finish_reason == "length":
        return TRUNCATED
    return OK if mode == "parse" else PARSED


def judge_request(spec: ScoreParams, question: str, answer: str, seed: int) -> ChatRequest:
    """The judge request of one response: structured output or logprobs as `spec.mode` asks."""
    messages = judge_messages(spec.prompt, question, answer)
    if spec.mode == "structured":
        return ChatRequest(messages, seed=seed, json_schema=JUDGEMENT_SCHEMA)
    if spec.mode == "logprob":
        return ChatRequest(messages, seed=seed, top_logprobs=spec.top_logprobs, logprobs_after=RATING_MARK)
    return ChatRequest(messages, seed=seed)


def annotations(
    responses: list[dict], replies: list[Reply], repetition_threshold: int, mode: str = "parse"
) -> list[dict]:
    """The published per-response annotations, aligned with `responses` (judgement null and score
    -1 where the judge request was not sent or failed), scored by judge mode `mode` where the
    judgement honours it (`score_of`)."""
    notes = []
    for response, reply in zip(responses, replies, strict=True):
        judged = reply.completions[0] if reply.completions else None
        notes.append(
            {
                fields.TOKENS: response["completion_tokens"],
                "judgement": judged.text if judged else None,
                fields.REPETITION: response["completion_tokens"] > repetition_threshold,
                fields.SCORE: score_of(judged, mode),
            }
        )
    return notes


def judge_rows(engine: Chat, rows: list[dict], spec: ScoreParams, seed: int) -> tuple[list, list]:
    """Judge every response of every row in one batched call: per row its annotations and each
    judge request's status (`judge_status`; both None for a row without responses)."""
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
        statuses.append(None if mine is None else [judge_status(reply, spec.mode) for reply in mine])
    return notes, statuses


def judge_table(engine: Chat, part: pa.Table, spec: ScoreParams, seed: int) -> pa.Table:
    """One shard of score's out: annotations, best response and judge statuses of each row."""
    notes, statuses = judge_rows(engine, part.to_pylist(), spec, seed)
    best = [None if n is None else best_index([x[fields.SCORE] for x in n]) for n in notes]
    nulls = [None] * part.num_rows  # the second pass, where the variant has one, fills these
    return pa.table([part["conversation_id"], notes, best, statuses, nulls, nulls], schema=SCORED)
