"""The bundled tiny model: trained deterministically, pinned by its content digest, and behaving
like each role of the pipeline (the DAG-level checks are in test_pipeline.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from scripts.make_tiny_model import build, model_digest, write_revision
from stages.core.config.compose import compose_params
from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.engines import ChatRequest, make_engine
from stages.core.rows.judge import FAILED, parse_score
from stages.core.rows.prompts import user_turn
from stages.core.storage.resume import digest, recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "sample" / "tiny-chat"
CONF = ROOT / "conf" / "llm" / "tiny.yaml"
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")  # kana and kanji
GREEDY = Sampling(temperature=0.0, max_tokens=24)


def test_training_is_deterministic(tmp_path):
    """The same code path as `make sample`, cut to a few steps: two runs write identical files."""
    first, second = tmp_path / "a", tmp_path / "b"
    assert build(first, seed=0, steps=2) == build(second, seed=0, steps=2)
    names = sorted(p.name for p in first.iterdir())
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(names)
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_the_committed_model_is_pinned_by_its_digest():
    """conf/llm/tiny.yaml's revision is the digest of data/sample/tiny-chat: a model retrained or
    edited without `make sample` fails here."""
    revision = yaml.safe_load(CONF.read_text(encoding="utf-8"))["revision"]
    assert revision == model_digest(TINY)
    assert (TINY / "model.safetensors").stat().st_size < 4_000_000  # small enough for git
    params = yaml.safe_load(compose_params(["profile=sample"]))
    llms = [params["translate"]["llm"]] + [
        params["models"][v][role]["llm"] for v in params["models"] for role in ("generate", "score")
    ]
    assert {llm["revision"] for llm in llms} == {revision}  # in the params every engine stage depends on


def test_changed_weights_change_the_model_identity(tmp_path):
    """Retrained weights get another revision, hence another response-cache identity, resume key
    and params value (so `dvc repro` reruns the engine stages)."""
    changed = tmp_path / "tiny-chat"
    shutil.copytree(TINY, changed)
    weights = load_file(changed / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-2
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    conf = tmp_path / "tiny.yaml"
    shutil.copy(CONF, conf)
    write_revision(conf, model_digest(changed))
    before = LLMSpec(**yaml.safe_load(CONF.read_text(encoding="utf-8")))
    after = LLMSpec(**yaml.safe_load(conf.read_text(encoding="utf-8")))
    assert after.revision != before.revision
    options = EngineParams(backend="transformers", batch_size=4)
    old, new = make_engine(before, options), make_engine(after, options)
    assert old.cache_identity() != new.cache_identity()
    assert digest(recipe(before)) != digest(recipe(after))


@pytest.fixture(scope="module")
def engine():
    llm = LLMSpec(model=str(TINY), dtype="float32", max_model_len=4096)
    with make_engine(llm, EngineParams(backend="transformers", batch_size=16)) as engine:
        yield engine


def _texts(engine, requests: list[ChatRequest], sampling: Sampling = GREEDY) -> list[str]:
    return [reply.completions[0].text for reply in engine.chat(requests, sampling)]


def test_it_answers_a_user_turn_with_short_varied_replies(engine):
    question = [{"role": "user", "content": "光合成を10歳の子どもに説明してください。"}]
    [reply] = engine.chat([ChatRequest(question, n=6, seed=7)], Sampling(temperature=0.6, max_tokens=16))
    texts = [c.text for c in reply.completions]
    assert all(texts) and len(set(texts)) >= 3
    assert sum(bool(JAPANESE.search(t)) for t in texts) >= 4  # a Japanese question, mostly Japanese replies


def test_the_judge_rates_answers_by_their_quality_and_sometimes_not_at_all(engine):
    question = "光合成を10歳の子どもに説明してください。"
    answers = {
        "good": "光合成をやさしく説明しますね。まず、光合成の基本から始めましょう。ポイントは三つあります。",
        "repeat": "はい。はい。はい。はい。はい。",
        "english": "Here is a simple way to explain photosynthesis. There are three key points.",
        "ask_back": "どういう意味ですか？",
    }
    requests = [ChatRequest(user_turn("judge-0to10", question=question, answer=a)) for a in answers.values()]
    verdicts = dict(zip(answers, _texts(engine, requests), strict=True))
    scores = {style: parse_score(text) for style, text in verdicts.items()}
    assert "Rating: [[" in verdicts["good"]
    assert scores["good"] >= 6 > scores["english"] >= 0 and scores["good"] > scores["repeat"] >= 0, verdicts
    assert scores["ask_back"] == FAILED, verdicts  # the deliberate malformed judgement: no rating


def test_it_translates_into_japanese_and_asks_follow_up_questions(engine):
    english = ["Write a short poem about coral reefs. Mention one open question.", "Hello!"]
    translations = _texts(engine, [ChatRequest(user_turn("translate-ja", text=t)) for t in english])
    assert all(JAPANESE.search(t) for t in translations), translations
    question, answer = "火山の歴史を5文で要約してください。", "火山の歴史を簡単にまとめます。"
    follow = user_turn("second-turn-user", question=question, answer=answer)
    [text] = _texts(engine, [ChatRequest(follow, seed=3)], Sampling(temperature=0.6, max_tokens=16))
    assert JAPANESE.search(text) and text.rstrip().endswith(("？", "?", "。")), text
