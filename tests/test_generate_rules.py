"""generate's row rules: who is asked, and the status of those who are not."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.config.engine_params import LLMSpec, Sampling
from stages.core.config.params import validate
from stages.core.config.variant_params import GenerateParams
from stages.core.engines import ChatRequest, Reply
from stages.core.rows.responses import SKIPPED_REDACTED, generate_table
from stages.core.storage.resume import digest, recipe
from tests.conftest import FakeEngine

SAMPLING = Sampling(temperature=0.6, max_tokens=16)


def _spec(skip_redacted: bool = False, n_en: int = 1, **more) -> GenerateParams:
    return GenerateParams(
        llm=LLMSpec(model="fake"),
        n_ja=2,
        n_en=n_en,
        sampling=SAMPLING,
        shard_size=8,
        skip_redacted=skip_redacted,
        **more,
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


def test_redacted_conversations_are_asked_by_default():
    """The cards name only empty and duplicate instructions as not asked."""
    assert (
        GenerateParams(llm=LLMSpec(model="m"), n_ja=1, n_en=0, sampling=SAMPLING, shard_size=1).skip_redacted
        is False
    )
    out = generate_table(FakeEngine(), _part(), _spec(), seed=1).to_pylist()
    assert [(r["status_ja"], r["status_en"]) for r in out] == [("ok", "ok"), ("ok", "ok"), (None, None)]


@pytest.mark.parametrize("overrides", [[], ["profile=sample"]])
def test_conf_composes_to_the_published_defaults(overrides):
    params = validate(yaml.safe_load(compose_params(overrides)))
    for variant in params.models.values():
        assert variant.generate.skip_redacted is False
        assert variant.generate.sampling_en is None  # English samples as Japanese
        assert variant.generate.sampling.options() == {}  # no top_k, no penalties
    if not overrides:  # each production model's own context window
        windows = {key: llm.max_model_len for key, llm in params.llms().items()}
        assert windows == {
            "translate.llm": 131072,
            "models.llama31.generate.llm": 131072,
            "models.llama31.score.llm": 131072,
            "models.gemma2.generate.llm": 8192,
            "models.gemma2.score.llm": 8192,
            "models.gemma3.generate.llm": 131072,
            "models.gemma3.score.llm": 131072,
        }


@dataclass
class _ByCall(FakeEngine):
    """A FakeEngine that records, per call, the sampling and the prompts it got."""

    calls: list[tuple[Sampling, list[str]]] = field(default_factory=list)

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        self.calls.append((sampling, [r.messages[-1]["content"] for r in requests]))
        return super()._chat(requests, sampling)


def test_sampling_en_is_used_for_the_english_requests_in_their_own_call():
    english = Sampling(temperature=0.2, max_tokens=8, top_k=5)
    engine = _ByCall()
    out = generate_table(engine, _part(), _spec(sampling_en=english), seed=1).to_pylist()
    ja = ["こんにちは", "NAME_1さん、NAME_2に手紙を"]
    assert engine.calls == [(SAMPLING, ja), (english, ["Hello", "Hello NAME_1, write to NAME_2"])]
    assert [r["status_en"] for r in out] == ["ok", "ok", None]
    for same in (None, SAMPLING.model_copy()):  # null or equal: one call, both languages in one batch
        engine = _ByCall()
        generate_table(engine, _part(), _spec(sampling_en=same), seed=1)
        assert [(sampling, len(prompts)) for sampling, prompts in engine.calls] == [(SAMPLING, 4)]


def test_new_sampling_knobs_at_their_defaults_leave_the_keys_as_they_were():
    """Keys of configs written before top_k, the penalties and sampling_en: unchanged (their values
    from before the fields existed); a knob set away from its default enters the key."""
    assert recipe(SAMPLING) == {"temperature": 0.6, "top_p": 1.0, "max_tokens": 16}
    assert digest(recipe(_spec())) == "0db4d682a943d688"  # as computed at HEAD, before the knobs
    assert Sampling(temperature=0.6, max_tokens=16, top_k=-1) == SAMPLING  # vLLM's "off"
    knobs = {"top_k": 40, "frequency_penalty": 0.5, "repetition_penalty": 1.1}
    for name, value in knobs.items():
        changed = Sampling(temperature=0.6, max_tokens=16, **{name: value})
        assert recipe(changed) == recipe(SAMPLING) | {name: value} and changed.options() == {name: value}
    assert recipe(_spec(sampling_en=SAMPLING))["sampling_en"] == recipe(SAMPLING)
