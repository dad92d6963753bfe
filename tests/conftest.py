"""Shared fixtures: a FakeEngine, a sample workspace, and a helper that runs a stage in-process."""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.engines import ChatRequest, Completion, Engine, Reply, RequestError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", help="run tests that need a CUDA GPU and vllm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="needs a GPU: run with --gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def fake_reply(messages: list[dict[str, str]], index: int) -> str:
    """Deterministic text: judges get a rating from 0 to 10, everything else a short answer."""
    last = messages[-1]["content"]
    digest = int(hashlib.sha256(f"{last}:{index}".encode()).hexdigest(), 16)
    if "impartial judge" in last:
        return f"The answer is relevant and fluent. Rating: [[{digest % 11}]]"
    if "next message the user would plausibly send" in last:
        return "もう少し詳しく説明してください。"
    return f"回答{index}: {digest % 9973}"


@dataclass
class FakeEngine(Engine):
    """Answers without a model and records every request it got. It misbehaves on purpose where
    asked: a call holding a prompt that contains one of `refuse` raises RequestError (as vLLM
    rejects a whole `LLM.chat` call for one bad prompt); a prompt over `max_model_len` tokens
    (4 characters a token) is never sent."""

    llm: LLMSpec = field(default_factory=lambda: LLMSpec(model="fake", max_model_len=4096))
    options: EngineParams = field(default_factory=lambda: EngineParams(backend="transformers", batch_size=8))
    requests: list[ChatRequest] = field(default_factory=list)
    refuse: tuple[str, ...] = ()
    delay: float = 0.0  # seconds each call takes, for tests that kill a stage mid-run
    loads: int = 0
    choices: int | None = None  # like a server that ignores `n`: at most this many completions a request

    def load(self) -> None:
        self.loads += 1

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return sum(len(m["content"]) for m in messages) // 4 + 4

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        time.sleep(self.delay)
        bad = [r for r in requests if any(word in m["content"] for word in self.refuse for m in r.messages)]
        if bad:
            raise RequestError(f"{len(bad)} of {len(requests)} prompts refused")
        self.requests.extend(requests)
        return [
            Reply(
                [Completion(fake_reply(r.messages, j), "stop", 20, 5 + j) for j in range(r.n)][: self.choices]
            )
            for r in requests
        ]


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> FakeEngine:
    """One FakeEngine returned by make_engine in every stage module."""
    engine = FakeEngine()

    def make_engine(llm: LLMSpec, options: EngineParams) -> FakeEngine:
        engine.llm, engine.options = llm, options  # the identity of the model the stage asked for
        return engine

    monkeypatch.setattr("stages.core.runtime.executors.make_engine", make_engine)
    return engine


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding the sample and a sample-profile params.yaml; the test runs inside it."""
    shutil.copytree(SAMPLE, tmp_path / "data" / "sample")
    (tmp_path / "params.yaml").write_text(compose_params(["profile=sample"]), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(workspace: Path, mutate) -> None:
    """Edit the workspace's params.yaml in place: `mutate` changes the loaded mapping."""
    path = workspace / "params.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    mutate(data)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def run_stage(monkeypatch: pytest.MonkeyPatch, module: str, *args: str) -> None:
    """Run `python -m stages.<module> args...` in-process."""
    mod = __import__(f"stages.{module}", fromlist=["main"])
    monkeypatch.setattr(sys, "argv", [f"stages.{module}", *args])
    mod.main()
