"""Gemma-2-style two-turn continuation: the generator writes the user's follow-up to the best
response, then answers it.

The stored continuation starts at the best response: [assistant, user, assistant]. The first
user turn (the Japanese instruction, LMSYS-licensed) is left out so that it stays only in the
encrypted file; prepend `translated_conversation` to get the whole two-turn conversation."""

from __future__ import annotations

from stages.core.engines import ChatRequest, Engine
from stages.core.params import GenerateParams, SecondTurnParams
from stages.core.prompts import user_turn, with_system
from stages.core.responses import request_seed


def continue_conversations(
    engine: Engine,
    turns: list[tuple[str, str, str]],
    spec: SecondTurnParams,
    generate: GenerateParams,
    seed: int,
) -> dict[str, list[dict]]:
    """Map conversation_id -> [assistant, user, assistant] for each (id, question, best answer)."""
    asks = [
        ChatRequest(user_turn(spec.prompt, question=q, answer=a), seed=request_seed(seed, c, "turn2-user"))
        for c, q, a in turns
    ]
    follow_ups = [completions[0].text.strip() for completions in engine.chat(asks, spec.sampling)]
    dialogues = {
        c: [
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
            {"role": "user", "content": f},
        ]
        for (c, q, a), f in zip(turns, follow_ups, strict=True)
        if f
    }
    answers = [
        ChatRequest(with_system(generate.system_prompt, d), seed=request_seed(seed, c, "turn2"))
        for c, d in dialogues.items()
    ]
    for (_, dialogue), completions in zip(
        dialogues.items(), engine.chat(answers, spec.sampling), strict=True
    ):
        dialogue.append({"role": "assistant", "content": completions[0].text})
    return {c: dialogue[1:] for c, dialogue in dialogues.items()}


def best_answers(rows: list[dict], best: list[int | None]) -> list[tuple[str, str, str]]:
    """(conversation_id, Japanese instruction, best response) for each row that has a best response."""
    return [
        (row["conversation_id"], row["instruction_ja"], row["responses_ja"][b]["content"])
        for row, b in zip(rows, best, strict=True)
        if b is not None
    ]
