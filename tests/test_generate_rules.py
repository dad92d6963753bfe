"""generate's row rules: who is asked, and the status of those who are not."""

from __future__ import annotations

import pyarrow as pa

from stages.core.params import GenerateParams, LLMSpec, Sampling
from stages.core.responses import SKIPPED_REDACTED, generate_table
from tests.conftest import FakeEngine


def _spec(skip_redacted: bool, n_en: int = 1) -> GenerateParams:
    return GenerateParams(
        llm=LLMSpec(model="fake"),
        n_ja=2,
        n_en=n_en,
        sampling=Sampling(temperature=0.6, max_tokens=16),
        shard_size=8,
        skip_redacted=skip_redacted,
    )


def _part() -> pa.Table:
    return pa.table(
        {
            "conversation_id": ["plain", "redacted", "redacted-empty"],
            "instruction": ["Hello", "Hello NAME_1, write to NAME_2", ""],
            "instruction_ja": ["こんにちは", "NAME_1さん、NAME_2に手紙を", ""],
            "empty_user_instruction_ja": [False, False, True],
            "duplicate_user_instruction_ja": [None, None, None],
            "translation_failed": [False, False, False],
            "redacted": [False, True, True],
        }
    )


def test_skip_redacted_asks_nothing_for_a_redacted_conversation_and_says_why():
    engine = FakeEngine()
    out = generate_table(engine, _part(), _spec(skip_redacted=True), seed=1).to_pylist()
    asked = {r.messages[-1]["content"] for r in engine.requests}
    assert asked == {"こんにちは", "Hello"}  # only the plain conversation, in both languages
    assert [r["status_ja"] for r in out] == ["ok", SKIPPED_REDACTED, None]  # an empty one: not eligible
    assert [r["status_en"] for r in out] == ["ok", SKIPPED_REDACTED, None]
    assert out[1]["responses_ja"] is None and out[1]["responses_en"] is None
    assert len(out[0]["responses_ja"]) == 2


def test_without_skip_redacted_a_redacted_conversation_is_answered():
    engine = FakeEngine()
    out = generate_table(engine, _part(), _spec(skip_redacted=False, n_en=0), seed=1).to_pylist()
    assert [r["status_ja"] for r in out] == ["ok", "ok", None]
    assert [r["status_en"] for r in out] == [None, None, None]  # English not asked at all
    assert len(out[1]["responses_ja"]) == 2
