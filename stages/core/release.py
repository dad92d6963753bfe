"""Row logic of package: release records with the published field names, and release metrics."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from stages.core.engines import FAILED as FAILED_REQUEST
from stages.core.engines import TOO_LONG
from stages.core.engines.base import distribution_version
from stages.core.responses import ANNOTATION, MESSAGE, SCORE_FAILED


def assistant(responses: list[dict] | None) -> list[dict] | None:
    return None if responses is None else [{"role": "assistant", "content": r["content"]} for r in responses]


def release_record(row: dict, with_en: bool, with_second_turn: bool) -> dict:
    """One public record: published field names, no Japanese instruction text."""
    record = {
        "conversation_id": row["conversation_id"],
        "duplicate_user_instruction_ja": row["duplicate_user_instruction_ja"],
        "empty_user_instruction_ja": row["empty_user_instruction_ja"],
        "is_template_instruction": row["is_template_instruction"],
        "synthesized_assistant_responses": assistant(row["responses_ja"]),
        "synthesized_response_scoring_annotations": row["annotations"],
    }
    if with_en:
        record["synthesized_assistant_responses_en"] = assistant(row["responses_en"])
    if with_second_turn:
        record["synthesized_multiturn_conversation"] = row["multiturn"]
    return record


def instruction_record(row: dict) -> dict:
    """One record of the encrypted file: the Japanese first user turn."""
    return {
        "conversation_id": row["conversation_id"],
        "translated_conversation": [{"role": "user", "content": row["instruction_ja"]}],
    }


def public_schema(with_en: bool, with_second_turn: bool) -> pa.Schema:
    """Arrow schema of the public records, so every Parquet batch has the same types."""
    assistant_turns = pa.list_(MESSAGE)
    fields = [
        ("conversation_id", pa.string()),
        ("duplicate_user_instruction_ja", pa.string()),
        ("empty_user_instruction_ja", pa.bool_()),
        ("is_template_instruction", pa.string()),
        ("synthesized_assistant_responses", assistant_turns),
        ("synthesized_response_scoring_annotations", pa.list_(ANNOTATION)),
    ]
    if with_en:
        fields.append(("synthesized_assistant_responses_en", assistant_turns))
    if with_second_turn:
        fields.append(("synthesized_multiturn_conversation", pa.list_(MESSAGE)))
    return pa.schema(fields)


PROJECT = "lmsys-chat-1m-synth"


def add_metrics(totals: Counter, rows: list[dict]) -> None:
    """Add one batch of rows (translation failures included) to the running release counts."""
    failed = [r for r in rows if r["translation_failed"]]
    rows = [r for r in rows if not r["translation_failed"]]
    scores = [a["preference_score"] for r in rows for a in (r["annotations"] or [])]
    valid = [s for s in scores if s != SCORE_FAILED]
    totals.update(
        instructions=len(rows),
        translation_failed=len(failed),
        instructions_with_responses=sum(r["responses_ja"] is not None for r in rows),
        responses_ja=sum(len(r["responses_ja"] or []) for r in rows),
        responses_en=sum(len(r["responses_en"] or []) for r in rows),
        multiturn_conversations=sum(r["multiturn"] is not None for r in rows),
        judgements=len(scores),
        judgements_failed=len(scores) - len(valid),
        template_instructions=sum(r["is_template_instruction"] is not None for r in rows),
        empty_instructions=sum(bool(r["empty_user_instruction_ja"]) for r in rows),
        duplicate_instructions=sum(r["duplicate_user_instruction_ja"] is not None for r in rows),
    )
    statuses = {
        "generate": [s for r in rows for s in (r["status_ja"], r["status_en"])],
        "judge": [s for r in rows for s in (r["judge_status"] or [])],
        "second_turn": [r["multiturn_status"] for r in rows if r["multiturn_status"]],
    }
    for stage, found in statuses.items():  # why requests have no answer (second turn: follow_up_failed...)
        totals[f"{stage}_skipped_too_long"] += sum(s.endswith(TOO_LONG) for s in found if s)
        totals[f"{stage}_failed_requests"] += sum(s.endswith(FAILED_REQUEST) for s in found if s)
    totals["score_sum"] += sum(valid)


def release_metrics(totals: Counter) -> dict:
    """The release's metrics from the running counts."""
    metrics = {k: v for k, v in totals.items() if k != "score_sum"}
    scored = totals["judgements"] - totals["judgements_failed"]
    metrics["mean_preference_score"] = round(totals["score_sum"] / scored, 4) if scored else None
    return metrics


def producers(engines: dict[str, dict]) -> dict:
    """What produced a release: this project's version, and per role (generate, judge, second_turn)
    the model, its revision and placement, and the engine with its library versions."""
    return {
        "project": {"name": PROJECT, "version": distribution_version(PROJECT)},
        "models": {
            role: {
                "model": engine["llm"]["model"],
                "revision": engine["llm"]["revision"],
                "dtype": engine["llm"]["dtype"],
                "quantization": engine["llm"].get("quantization"),
                "engine": engine["backend"],
                "libraries": engine["libraries"],
            }
            for role, engine in sorted(engines.items())
        },
    }
