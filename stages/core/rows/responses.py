"""Arrow types of the generate/score tables, and the row logic of asking for n responses per row."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from stages.core.config.variant_params import GenerateParams
from stages.core.rows import fields
from stages.core.rows.prompts import with_system
from stages.core.rows.requests import Chat, ChatRequest, Completion, Reply

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
        (fields.TOKENS, pa.int64()),
        ("judgement", pa.string()),
        (fields.REPETITION, pa.bool_()),
        (fields.SCORE, pa.float64()),
    ]
)
FIELDS = {"ja": "instruction_ja", "en": "instruction"}  # the instruction each language answers
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
# generate's out: responses (null where not asked or none came back) and the request's status
GENERATED = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("responses_ja", RESPONSES),
        ("responses_en", RESPONSES),
        ("status_ja", pa.string()),  # ok, skipped_too_long, failed; null: not asked
        ("status_en", pa.string()),
    ]
)

# score's out: the published annotations, the best response, each judge request's status, and
# for variants with a second turn the continuation from the best response and its status
SCORED = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("annotations", pa.list_(ANNOTATION)),
        ("best_index", pa.int64()),
        ("judge_status", pa.list_(pa.string())),
        ("multiturn", pa.list_(pa.list_(MESSAGE))),  # one conversation: [[assistant(, user, assistant)]]
        ("multiturn_status", pa.string()),
    ]
)

JUDGED = ["annotations", "best_index", "judge_status"]  # what the judge pass adds, read by the second


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


SKIPPED_REDACTED = "skipped_redacted"  # generate.skip_redacted: a conversation LMSYS redacted (PII)


def eligible(row: dict) -> bool:
    """Empty, duplicate and untranslated instructions get no responses."""
    return not row[fields.EMPTY] and row[fields.DUPLICATE] is None and not row["translation_failed"]


def skipped_redacted(row: dict, spec: GenerateParams) -> bool:
    """With generate.skip_redacted, an eligible instruction of a redacted conversation is not asked."""
    return spec.skip_redacted and bool(row.get("redacted")) and eligible(row)


def requests_for(
    rows: list[dict], language: str, n: int, spec: GenerateParams, seed: int
) -> tuple[list[int], list[ChatRequest]]:
    """The positions of the rows asked in `language` (ja or en) and their requests for n responses."""
    field = FIELDS[language]
    todo = [i for i, r in enumerate(rows) if eligible(r) and not skipped_redacted(r, spec)] if n else []
    return todo, [
        ChatRequest(
            with_system(spec.system_prompt, [{"role": "user", "content": rows[i][field]}]),
            n=n,
            seed=request_seed(seed, rows[i]["conversation_id"], language),
        )
        for i in todo
    ]


def ask_both(engine: Chat, ja: list[ChatRequest], en: list[ChatRequest], spec: GenerateParams) -> list[Reply]:
    """The replies to the Japanese then the English requests: one call where both languages sample
    alike (a batched engine sees them at once), else one call each, English with `sampling_en`."""
    english = spec.sampling_en or spec.sampling
    if english == spec.sampling:
        return engine.chat(ja + en, spec.sampling)
    return engine.chat(ja, spec.sampling) + engine.chat(en, english)


def generate_table(engine: Chat, part: pa.Table, spec: GenerateParams, seed: int) -> pa.Table:
    """One shard of generate's out: n_ja and n_en responses to each eligible row (`ask_both`), and
    each request's status (None: not asked). A request that was not sent or failed gets null
    responses."""
    rows = part.to_pylist()
    asked = {
        lang: requests_for(rows, lang, n, spec, seed) for lang, n in (("ja", spec.n_ja), ("en", spec.n_en))
    }
    replies = iter(ask_both(engine, asked["ja"][1], asked["en"][1], spec))
    columns = []
    for (todo, _), n in zip(asked.values(), (spec.n_ja, spec.n_en), strict=True):
        found = [None] * len(rows)
        for i in todo:
            found[i] = next(replies)
        redacted = SKIPPED_REDACTED if n else None  # a language not asked has no status
        columns.append(
            (
                [as_rows(reply.completions) if reply and reply.completions else None for reply in found],
                [
                    reply.status if reply else (redacted if skipped_redacted(row, spec) else None)
                    for reply, row in zip(found, rows, strict=True)
                ],
            )
        )
    (ja, status_ja), (en, status_en) = columns
    return pa.table(
        [part["conversation_id"], pa.array(ja, RESPONSES), pa.array(en, RESPONSES), status_ja, status_en],
        schema=GENERATED,
    )
