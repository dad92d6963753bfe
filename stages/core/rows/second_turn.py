"""Gemma-2-style second turn: for some of the conversations with a best response, the generator
writes the user's follow-up to the best response, then answers it; the others stay single-turn. Which
ones: where the variant's annotations are the publisher's, exactly the conversations its published file
has two-turn (the row's `two_turn`, generate's annotation table); elsewhere a share of them, chosen by
a hash of the conversation_id.

Each row holds our shape (docs/assumptions.md 32), a list of one conversation: [[assistant, user, assistant]]
(two-turn) or [[assistant]] (single-turn: the best response). The first user turn (the Japanese
instruction, LMSYS-licensed) is left out so that it stays only in the encrypted file; prepend
`translated_conversation` to get the whole conversation. Null: no best response, or the second
turn of a selected conversation did not come back (its status says why)."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from stages.core.config.variant_params import GenerateParams, SecondTurnParams
from stages.core.rows.prompts import user_turn, with_system
from stages.core.rows.requests import OK, Chat, ChatRequest
from stages.core.rows.responses import JUDGED, SCORED, request_seed

SALT = "second-turn"  # the hashed text is f"{SALT}:{conversation_id}"


def selected(conversation_id: str, share: float) -> bool:
    """Whether a conversation gets a second turn: the first 8 bytes of SHA-256("second-turn:<id>"),
    as a fraction of 2^64, fall below `share`. Depends on the id alone (not the seed): our rule, as
    the publisher's is stated nowhere."""
    digest = hashlib.sha256(f"{SALT}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def wanted(conversation_id: str, two_turn: bool | None, share: float) -> bool:
    """Whether a conversation with a best response gets a second turn: as its published file has it where the
    annotation table knows (`two_turn` not null), else by the hash (`selected`)."""
    return selected(conversation_id, share) if two_turn is None else two_turn


def continue_conversations(
    engine: Chat,
    turns: list[tuple[str, str, str]],
    spec: SecondTurnParams,
    generate: GenerateParams,
    seed: int,
) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """For each (id, question, best answer): id -> [assistant, user, assistant] where both new turns
    came back, and id -> status (ok, or which turn failed and why: `follow_up_failed`,
    `follow_up_empty`, `answer_skipped_too_long`, ...)."""
    asks = [
        ChatRequest(user_turn(spec.prompt, question=q, answer=a), seed=request_seed(seed, c, "turn2-user"))
        for c, q, a in turns
    ]
    dialogues, statuses = {}, {}
    for (c, q, a), reply in zip(turns, engine.chat(asks, spec.sampling), strict=True):
        follow_up = reply.completions[0].text.strip() if reply.completions else ""
        statuses[c] = f"follow_up_{'empty' if reply.status == OK else reply.status}"
        if follow_up:
            dialogues[c] = [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
                {"role": "user", "content": follow_up},
            ]
    answers = [
        ChatRequest(with_system(generate.system_prompt, d), seed=request_seed(seed, c, "turn2"))
        for c, d in dialogues.items()
    ]
    for (c, dialogue), reply in zip(dialogues.items(), engine.chat(answers, spec.sampling), strict=True):
        statuses[c] = OK if reply.completions else f"answer_{reply.status}"
        if reply.completions:
            dialogue.append({"role": "assistant", "content": reply.completions[0].text})
    return {c: d[1:] for c, d in dialogues.items() if statuses[c] == OK}, statuses


def best_answers(rows: list[dict], best: list[int | None]) -> list[tuple[str, str, str]]:
    """(conversation_id, Japanese instruction, best response) for each row that has a best response."""
    return [
        (row["conversation_id"], row["instruction_ja"], row["responses_ja"][b]["content"])
        for row, b in zip(rows, best, strict=True)
        if b is not None
    ]


def second_turn_table(
    engine: Chat, part: pa.Table, spec: SecondTurnParams, generate: GenerateParams, seed: int
) -> pa.Table:
    """One shard of score's out with each row's conversation from its best response: two-turn for the
    rows `wanted` picks (published two-turn ids, else spec.share's hash), single-turn for the others (no
    request, null status), null without."""
    rows = part.to_pylist()
    turns = best_answers(rows, [r["best_index"] for r in rows])
    published = {r["conversation_id"]: r.get("two_turn") for r in rows}
    chosen = [t for t in turns if wanted(t[0], published[t[0]], spec.share)]
    dialogues, statuses = continue_conversations(engine, chosen, spec, generate, seed)
    singles = {c: [{"role": "assistant", "content": a}] for c, _, a in turns if c not in statuses}
    stored = {**singles, **dialogues}
    ids = [r["conversation_id"] for r in rows]
    columns = [part[c] for c in ["conversation_id", *JUDGED]]
    entries = [[stored[c]] if c in stored else None for c in ids]
    return pa.table([*columns, entries, [statuses.get(c) for c in ids]], schema=SCORED)
