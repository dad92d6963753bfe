"""A failure is never final and never silent: unfinished requests are asked again on the next run,
a stage above its failure ceiling exits non-zero naming its counts, and a dead engine stops it."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from stages.core.config.errors import PipelineError
from stages.core.engines import Completion, EngineDown, Reply
from stages.core.runtime.executors import check_ceiling
from tests.conftest import FakeEngine, run_stage, set_params

GENERATED = "data/generated/gemma3.parquet"


@pytest.fixture
def upstream(workspace, monkeypatch, fake_engine):
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    fake_engine.requests.clear()
    # translate's flags decide which rows generate asks (`_victims` reads them), not the published file's
    set_params(workspace, lambda d: d["models"]["gemma3"].update(annotations="ours"))
    return workspace


def _victims(workspace, count: int) -> list[dict]:
    """`count` rows of gemma3's subset that generate asks (non-empty, no duplicate, translated; redacted
    ones too), each with a text no other asked row contains (refusing it fails that row alone)."""
    rows = pq.read_table(workspace / "data/private/translated-ja+unsafe.parquet").to_pylist()
    asked = [
        r
        for r in rows
        if r["instruction_ja"]
        and r["duplicate_user_instruction_ja"] is None
        and len(r["instruction_ja"]) < 2000
    ]
    alone = [r for r in asked if sum(r["instruction_ja"] in o["instruction_ja"] for o in asked) == 1]
    return alone[:count]


def test_failed_requests_stop_the_stage_above_its_ceiling_then_only_they_are_asked_again(
    upstream, monkeypatch, fake_engine
):
    victims = _victims(upstream, 6)  # 6 of about 220 requests: above the 1% ceiling
    fake_engine.refuse = tuple(v["instruction_ja"] for v in victims)
    with pytest.raises(PipelineError) as failed:
        run_stage(monkeypatch, "generate", "gemma3")
    message = str(failed.value)
    assert message.startswith("generate@gemma3: 6 of ") and "(failed 6;" in message
    assert "models.gemma3.generate.max_failure_rate=0.01" in message
    assert "most common error (6x): 1 of 1 prompts refused" in message
    first = pq.read_table(upstream / GENERATED)  # the out is written, the failures in it
    assert first["status_ja"].to_pylist().count("failed") == 6

    fake_engine.refuse, asked_before = (), len(fake_engine.requests)
    run_stage(monkeypatch, "generate", "gemma3")  # the engine is fixed
    sent = [r.messages[-1]["content"] for r in fake_engine.requests[asked_before:]]
    failed_ids = {r["conversation_id"] for r in first.to_pylist() if r["status_ja"] == "failed"}
    texts = {r["conversation_id"]: r["instruction_ja"] for r in _victims(upstream, 10_000)}
    assert sorted(sent) == sorted(texts[c] for c in failed_ids)  # exactly the failed ones, once each
    resumed = pq.read_table(upstream / GENERATED)
    assert set(resumed["status_ja"].to_pylist()) <= {"ok", "skipped_too_long", None}

    shutil.rmtree(upstream / "data/.checkpoints")  # the same stage, uninterrupted, from nothing
    shutil.rmtree(upstream / "data/.cache")
    run_stage(monkeypatch, "generate", "gemma3")
    assert pq.read_table(upstream / GENERATED).equals(resumed)


def test_a_dead_engine_stops_the_stage_at_once_and_checkpoints_nothing_of_it(
    upstream, monkeypatch, fake_engine
):
    set_params(upstream, lambda d: d["engine"].update(max_consecutive_failures=5))
    fake_engine.refuse = ("",)  # every call is refused, like a server that is gone
    with pytest.raises(
        EngineDown, match=r"\d+ requests in a row failed \(engine.max_consecutive_failures=5\)"
    ):
        run_stage(monkeypatch, "generate", "gemma3")
    assert not list((upstream / "data/.checkpoints").glob("generate@gemma3/*/*.parquet"))
    assert not (upstream / GENERATED).exists()


def test_a_server_that_ignores_n_gives_partial_rows_that_are_asked_again(upstream, monkeypatch, fake_engine):
    set_params(upstream, lambda d: d["models"]["gemma3"]["generate"].update(max_failure_rate=1.0))
    fake_engine.choices = 1  # 1 completion whatever n asks
    run_stage(monkeypatch, "generate", "gemma3")
    statuses = pq.read_table(upstream / GENERATED)["status_ja"].to_pylist()
    assert "ok" not in statuses and statuses.count("partial") > 200
    fake_engine.choices = None
    run_stage(monkeypatch, "generate", "gemma3")
    table = pq.read_table(upstream / GENERATED).to_pylist()
    assert {r["status_ja"] for r in table} <= {"ok", "skipped_too_long", None}
    assert all(len(r["responses_ja"]) == 10 for r in table if r["status_ja"] == "ok")


def test_the_breaker_counts_failures_in_a_row_only():
    engine = FakeEngine()
    ok, bad = Reply([Completion("a", "stop", 1, 1)]), Reply([], "failed", "HTTP 503")
    for _ in range(10):  # failures between successes never trip it
        engine._watch([bad] * 31 + [ok])
    assert engine.failures["HTTP 503"] == 310
    with pytest.raises(EngineDown, match=r"32 requests in a row failed.*last error: HTTP 503"):
        engine._watch([bad] * 32)


def test_the_ceiling_counts_every_unfinished_status():
    from collections import Counter

    check_ceiling("s", Counter(ok=99, failed=1), "k", 0.01, Counter())  # 1%: at the ceiling, not above
    with pytest.raises(
        PipelineError, match=r"s: 3 of 100 requests did not finish \(partial 2, mode_ignored 1"
    ):
        check_ceiling("s", Counter(ok=97, partial=2, mode_ignored=1), "k", 0.01, Counter())
    with pytest.raises(PipelineError, match="follow_up_failed 2"):
        check_ceiling("s", Counter(ok=10, follow_up_failed=2, skipped_too_long=50), "k", 0.01, Counter())


def test_an_answer_that_ignored_the_form_asked_is_not_cached():
    from stages.core.engines import ChatRequest
    from stages.core.engines.base import cacheable

    schema = ChatRequest([{"role": "user", "content": "judge"}], json_schema={"type": "object"})
    logprobs = ChatRequest([{"role": "user", "content": "judge"}], top_logprobs=5)
    text = Reply([Completion("Rating: [[7]]", "stop", 1, 1)])
    assert not cacheable(text, schema) and not cacheable(text, logprobs)
    assert cacheable(Reply([Completion('{"rating": 7}', "stop", 1, 1)]), schema)
    assert cacheable(
        Reply([Completion("[[7]]", "stop", 1, 1, logprobs=[["[[", {}], ["7", {"7": 0.0}]])]), logprobs
    )
    assert not cacheable(Reply([], "partial"), ChatRequest([], n=2))
