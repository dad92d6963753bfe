"""The openai engine against vLLM's own OpenAI-compatible server (`python -m
vllm.entrypoints.openai.api_server`, the CPU build, `make check-vllm`; skipped where vllm is not
importable) on 127.0.0.1, serving the bundled tiny model, started once for the module. Unlike
`transformers serve` (tests/test_openai_serve.py) it honours what the engine asks: n choices in one
request, per-request seeds, logprobs and response_format."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.config.variant_params import ScoreParams
from stages.core.engines import OK, ChatRequest, make_engine
from stages.core.rows.judge import judge_rows
from tests.test_openai_serve import _free_port
from tests.vllm_cpu import TINY, env

START_S = 300  # seconds for the server to import vLLM, start its engine core and load the model
SAMPLING = Sampling(temperature=1.0, max_tokens=16)
QUESTION = [{"role": "user", "content": "猫について教えてください。"}]


@dataclass
class Served:
    url: str
    log: Path

    def posts(self) -> int:
        """Chat requests the server has been sent (its access log)."""
        return self.log.read_text(errors="replace").count('"POST /v1/chat/completions ')


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url.removesuffix('/v1')}/health", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    port, log = _free_port(), tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    url = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", TINY]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"]
    command += ["--enforce-eager"]  # no torch.compile: minutes of C++ builds on two cores
    start = time.monotonic()
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env())
    try:
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() - start > START_S:
                pytest.fail(f"vLLM's server did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield Served(url, log)
    finally:
        server.terminate()  # vLLM shuts its engine core down on SIGTERM
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def engine(served, monkeypatch):
    monkeypatch.setenv("SERVE_TEST_KEY", "none")  # the server takes no key; the client needs one
    options = EngineParams(backend="openai", batch_size=8, base_url=served.url, api_key_env="SERVE_TEST_KEY")
    with make_engine(LLMSpec(model=TINY), options) as engine:
        yield engine


def test_n_choices_come_in_one_request(served, engine):
    before = served.posts()
    [reply] = engine.chat([ChatRequest(QUESTION, n=3, seed=1)], SAMPLING)
    time.sleep(0.5)  # the access log line follows the reply
    assert (reply.status, len(reply.completions), served.posts() - before) == (OK, 3, 1)
    assert all(c.prompt_tokens > 0 and 1 <= c.completion_tokens <= 16 for c in reply.completions)


def test_choice_j_of_a_request_is_the_reply_to_its_seed_plus_j(engine):
    [three] = engine.chat([ChatRequest(QUESTION, n=3, seed=7)], SAMPLING)
    [again] = engine.chat([ChatRequest(QUESTION, n=3, seed=7)], SAMPLING)
    singles = engine.chat([ChatRequest(QUESTION, seed=s) for s in (7, 8, 9)], SAMPLING)
    texts = [c.text for c in three.completions]
    assert texts == [c.text for c in again.completions]
    assert texts == [r.completions[0].text for r in singles]


@pytest.mark.parametrize("mode", ["structured", "logprob"])
def test_the_server_honours_each_judge_mode(engine, mode):
    spec = ScoreParams(
        llm=LLMSpec(model=TINY),
        prompt="judge-0to10",
        sampling=Sampling(temperature=0.0, max_tokens=64),
        shard_size=8,
        mode=mode,
    )
    rows = [
        {
            "conversation_id": f"c{i}",
            "instruction_ja": f"猫について教えてください。{i}",
            "responses_ja": [{"content": f"猫は動物です。{i}-{j}", "completion_tokens": 5} for j in range(2)],
        }
        for i in range(2)
    ]
    notes, statuses = judge_rows(engine, rows, spec, seed=0)
    flat = [s for row in statuses for s in row]
    assert len(flat) == 4 and not {"mode_ignored", "failed", "partial"} & set(flat), flat
    assert all(n["judgement"] for row in notes for n in row)


def test_logprobs_come_back_with_the_choices(engine):
    [reply] = engine.chat([ChatRequest(QUESTION, n=2, seed=5, top_logprobs=5)], SAMPLING)
    assert reply.status == OK
    for c in reply.completions:
        assert c.logprobs and len(c.logprobs) == c.completion_tokens


def test_a_request_the_server_refuses_fails_alone(engine):
    requests = [ChatRequest(QUESTION, seed=1), ChatRequest(QUESTION, top_logprobs=25), ChatRequest(QUESTION)]
    replies = engine.chat(requests, SAMPLING)
    assert [r.status == OK for r in replies] == [True, False, True], [(r.status, r.detail) for r in replies]
