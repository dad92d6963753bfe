"""The openai engine against a real third-party server: `transformers serve` on 127.0.0.1, serving the
bundled tiny model on the CPU (started once for the module), which answers n, logprobs, top_logprobs
and response_format with HTTP 200 and ignores them; and against a port where nothing listens."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.config.errors import PipelineError
from stages.core.config.variant_params import ScoreParams
from stages.core.engines import MODE_IGNORED, OK, TOO_LONG, ChatRequest, make_engine
from stages.core.rows.judge import judge_rows

TINY = str(Path(__file__).resolve().parent.parent / "data" / "sample" / "tiny-chat")
SERVE = ("transformers", "fastapi", "uvicorn", "accelerate", "openai")  # what `transformers serve` needs
START_S = 240  # seconds for the server to import torch and load the model on two busy cores
SAMPLING = Sampling(temperature=1.0, max_tokens=16)
QUESTION = [{"role": "user", "content": "Tell me about cats."}]


@dataclass
class Served:
    url: str
    log: Path

    def posts(self) -> int:
        """Chat requests the server has been sent (its access log)."""
        return self.log.read_text().count('"POST /v1/chat/completions ')


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url.removesuffix('/v1')}/health", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    missing = [name for name in SERVE if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"transformers serve is not installed (no {', '.join(missing)}): pip install -e '.[cpu,test]'"
        )
    url, log = f"http://127.0.0.1:{_free_port()}/v1", tmp_path_factory.mktemp("serve") / "serve.log"
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", TINY, "--device", "cpu"]
    command += ["--host", host, "--port", port, "--log-level", "info"]  # info: the access log
    quiet = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | quiet)
    try:
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() - start > START_S:
                pytest.fail(f"transformers serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Served(url, log)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _engine(served: Served, monkeypatch, llm: LLMSpec | None = None, **options):
    monkeypatch.setenv("SERVE_TEST_KEY", "none")  # the server takes no key; the client needs one
    params = EngineParams(
        backend="openai", batch_size=8, base_url=served.url, api_key_env="SERVE_TEST_KEY", **options
    )
    return make_engine(llm or LLMSpec(model=TINY), params)


def test_the_server_answers_what_it_ignores_with_http_200(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url, api_key="none")
    assert [m.id for m in client.models.list()] == [TINY]  # pinned to the model: its name as given
    n = client.chat.completions.create(model=TINY, messages=QUESTION, n=3, max_tokens=8)
    logprobs = client.chat.completions.create(
        model=TINY, messages=QUESTION, logprobs=True, top_logprobs=5, max_tokens=8
    )
    schema = {"type": "object", "properties": {"rating": {"type": "integer"}}, "required": ["rating"]}
    structured = client.chat.completions.create(
        model=TINY,
        messages=QUESTION,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        max_tokens=8,
    )
    assert len(n.choices) == 1 and logprobs.choices[0].logprobs is None
    with pytest.raises(json.JSONDecodeError):
        json.loads(structured.choices[0].message.content)


def test_n_is_completed_with_single_choice_requests(served, monkeypatch):
    requests = [ChatRequest(QUESTION, n=3, seed=s) for s in (1, 2)]
    with _engine(served, monkeypatch) as engine:
        replies = engine.chat(requests, SAMPLING)
    assert [(r.status, len(r.completions)) for r in replies] == [(OK, 3), (OK, 3)]
    assert all(c.prompt_tokens > 0 and 1 <= c.completion_tokens <= 16 for r in replies for c in r.completions)


def test_choice_j_of_a_request_is_the_reply_to_its_seed_plus_j(served, monkeypatch):
    # the server seeds torch's global generator when a request arrives, so requests in flight together
    # share it: replies repeat only one request at a time
    with _engine(served, monkeypatch, max_concurrency=1) as engine:
        [three] = engine.chat([ChatRequest(QUESTION, n=3, seed=7)], SAMPLING)
        again = engine.chat([ChatRequest(QUESTION, n=3, seed=7)], SAMPLING)
        singles = engine.chat([ChatRequest(QUESTION, seed=s) for s in (7, 8, 9)], SAMPLING)
    texts = [c.text for c in three.completions]
    assert texts == [c.text for c in again[0].completions]
    assert texts == [r.completions[0].text for r in singles]
    assert len(set(texts)) > 1  # temperature 1: the seeds differ, so do the replies


def test_a_prompt_over_the_context_is_not_sent(served, monkeypatch):
    llm = LLMSpec(model=TINY, max_model_len=256)  # 256 - 16 prompt tokens at most
    long = [{"role": "user", "content": "Tell me about cats. " * 200}]
    with _engine(served, monkeypatch, llm) as engine:
        before = served.posts()
        short, too_long = engine.chat([ChatRequest(QUESTION), ChatRequest(long)], SAMPLING)
        time.sleep(0.5)  # the access log line follows the reply
        sent = served.posts() - before
    assert (short.status, too_long.status, too_long.completions) == (OK, TOO_LONG, [])
    assert "> 256 - 16" in too_long.detail and sent == 1


@pytest.mark.parametrize("mode", ["structured", "logprob"])
def test_a_judge_mode_the_server_ignores_is_recorded_as_ignored(served, monkeypatch, mode):
    spec = ScoreParams(
        llm=LLMSpec(model=TINY),
        prompt="judge-0to10",
        sampling=Sampling(temperature=0.0, max_tokens=32),
        shard_size=8,
        mode=mode,
    )
    rows = [
        {
            "conversation_id": f"c{i}",
            "instruction_ja": f"質問 {i}",
            "responses_ja": [{"content": f"回答 {i}-{j}", "completion_tokens": 5} for j in range(2)],
        }
        for i in range(2)
    ]
    with _engine(served, monkeypatch) as engine:
        notes, statuses = judge_rows(engine, rows, spec, seed=0)
    assert statuses == [[MODE_IGNORED] * 2] * 2
    assert all(n["judgement"] for row in notes for n in row)  # the text came back and was parsed


def test_a_url_where_nothing_listens_stops_at_load_naming_it(monkeypatch):
    pytest.importorskip("openai")
    url = f"http://127.0.0.1:{_free_port()}/v1"
    monkeypatch.setenv("SERVE_TEST_KEY", "none")
    options = EngineParams(backend="openai", batch_size=8, base_url=url, api_key_env="SERVE_TEST_KEY")
    start = time.monotonic()
    with pytest.raises(PipelineError, match=f"no OpenAI-compatible server answers at {url}/"):
        make_engine(LLMSpec(model=TINY), options).chat([ChatRequest(QUESTION)], SAMPLING)
    assert time.monotonic() - start < 5
