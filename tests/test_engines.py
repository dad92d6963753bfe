"""Engines: the transformers engine on the tiny model, chat rules, and install/secret errors."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

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


class _ChatServer(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/chat/completions endpoint that records what it was asked."""

    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatServer.seen.append({"path": self.path, "auth": self.headers["Authorization"], **body})
        choices = [
            {
                "index": i,
                "finish_reason": "length" if i else "stop",
                "message": {
                    "role": "assistant",
                    "content": f"answer {i} to {body['messages'][-1]['content']}",
                },
            }
            for i in range(body.get("n", 1))
        ]
        reply = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": choices,
                "usage": {
                    "prompt_tokens": 11,
                    "completion_tokens": 6 * len(choices),
                    "total_tokens": 11 + 6 * len(choices),
                },
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


def test_openai_engine_against_a_local_server(monkeypatch):
    pytest.importorskip("openai")
    _ChatServer.seen.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("LOCAL_KEY", "sk-local")
        options = EngineParams(
            backend="openai",
            batch_size=4,
            api_key_env="LOCAL_KEY",
            base_url=f"http://127.0.0.1:{server.server_port}/v1",
        )
        gemma = LLMSpec(model="google/gemma-3-27b-it", system_role=False)
        request = ChatRequest(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "質問"}], n=2, seed=7
        )
        with make_engine(gemma, options) as engine:
            [group] = engine.chat([request], Sampling(temperature=0.6, top_p=0.9, max_tokens=32))
    finally:
        server.shutdown()
        server.server_close()
    [sent] = _ChatServer.seen
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-local"
    assert sent["messages"] == [{"role": "user", "content": "Be brief.\n\n質問"}]  # Gemma: no system role
    assert (sent["model"], sent["n"], sent["seed"], sent["max_tokens"]) == ("google/gemma-3-27b-it", 2, 7, 32)
    assert [c.text for c in group] == ["answer 0 to Be brief.\n\n質問", "answer 1 to Be brief.\n\n質問"]
    assert [c.finish_reason for c in group] == ["stop", "length"]
    assert all(c.prompt_tokens == 11 and c.completion_tokens == 6 for c in group)
