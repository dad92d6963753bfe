"""Engines: the transformers engine on the tiny model, chat rules, and install/secret errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from stages.core.engines import ChatRequest, apply_chat_rules, make_engine
from stages.core.params import EngineParams, LLMSpec, Sampling

TINY = str(Path(__file__).resolve().parent.parent / "data" / "sample" / "tiny-chat")


def test_transformers_engine_returns_n_completions_with_token_counts():
    engine = make_engine(
        LLMSpec(model=TINY, dtype="float32"), EngineParams(backend="transformers", batch_size=8)
    )
    requests = [ChatRequest([{"role": "user", "content": f"質問 {i}"}], n=3, seed=i) for i in range(5)]
    with engine:
        first = engine.chat(requests, Sampling(temperature=0.8, max_tokens=6))
        again = engine.chat(requests, Sampling(temperature=0.8, max_tokens=6))
    assert [len(c) for c in first] == [3] * 5
    for completion in (c for group in first for c in group):
        assert completion.finish_reason in ("stop", "length")
        assert 1 <= completion.completion_tokens <= 6
        assert completion.prompt_tokens > 3
    assert first == again  # same seeds, same batches: same samples


def test_gemma_rules_merge_the_system_prompt_into_the_first_user_turn():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    gemma = LLMSpec(model="google/gemma-3-27b-it", system_role=False)
    assert apply_chat_rules(messages, gemma) == [{"role": "user", "content": "Be brief.\n\nHi"}]
    assert messages[1]["content"] == "Hi"  # the caller's messages are not mutated
    assert apply_chat_rules(messages, LLMSpec(model="llama")) == messages


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_engine_without_vllm_names_the_extra():
    engine = make_engine(LLMSpec(model="m"), EngineParams(backend="vllm", batch_size=1))
    with pytest.raises(ImportError, match=r"pip install 'lmsys-chat-1m-synth\[vllm\]'"):
        engine.load()


def test_openai_engine_needs_its_key_variable(monkeypatch):
    pytest.importorskip("openai")
    monkeypatch.delenv("MY_SERVER_KEY", raising=False)
    options = EngineParams(backend="openai", batch_size=1, api_key_env="MY_SERVER_KEY")
    with pytest.raises(ValueError, match=r"\$MY_SERVER_KEY"):
        make_engine(LLMSpec(model="m"), options).load()


@pytest.mark.gpu
def test_vllm_engine_on_a_gpu():
    engine = make_engine(
        LLMSpec(model=TINY, dtype="float32", max_model_len=2048),
        EngineParams(backend="vllm", batch_size=8, gpu_memory_utilization=0.3),
    )
    with engine:
        [group] = engine.chat(
            [ChatRequest([{"role": "user", "content": "こんにちは"}], n=4, seed=1)],
            Sampling(temperature=0.8, max_tokens=8),
        )
    assert len(group) == 4 and all(c.completion_tokens >= 1 for c in group)
