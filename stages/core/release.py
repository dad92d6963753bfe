"""Row logic of package: release records with the published field names, and release metrics."""

from __future__ import annotations

from stages.core.judge import FAILED


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


def release_metrics(rows: list[dict]) -> dict:
    scores = [a["preference_score"] for r in rows for a in (r["annotations"] or [])]
    valid = [s for s in scores if s != FAILED]
    return {
        "instructions": len(rows),
        "instructions_with_responses": sum(r["responses_ja"] is not None for r in rows),
        "responses_ja": sum(len(r["responses_ja"] or []) for r in rows),
        "responses_en": sum(len(r["responses_en"] or []) for r in rows),
        "multiturn_conversations": sum(r["multiturn"] is not None for r in rows),
        "judgements": len(scores),
        "judgements_failed": len(scores) - len(valid),
        "mean_preference_score": round(sum(valid) / len(valid), 4) if valid else None,
        "template_instructions": sum(r["is_template_instruction"] is not None for r in rows),
        "empty_instructions": sum(bool(r["empty_user_instruction_ja"]) for r in rows),
        "duplicate_instructions": sum(r["duplicate_user_instruction_ja"] is not None for r in rows),
    }
