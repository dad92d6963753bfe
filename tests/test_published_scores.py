"""score with generate.source `published`: the published judgements (and multi-turn conversations) kept
unless score.rejudge, on the sample's project-written published files (scripts/make_sample.py)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from stages.core.config.errors import SourceError
from stages.core.config.params import load_params
from stages.core.release import published
from stages.core.storage.jsonl import read_jsonl_gz
from stages.core.storage.parquet import engine_roles
from stages.core.storage.resume import recipe
from tests.conftest import SAMPLE, run_stage, set_params

FILE = "dataset/{name}-lmsys-chat-1m-synth-ja+en.jsonl.gz"
A, B = {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}
USER = {"role": "user", "content": "more?"}


def _published(name: str) -> dict[str, dict]:
    path = SAMPLE / "lmsys-chat-1m-synth" / FILE.format(name=name)
    return {r["conversation_id"]: r for r in read_jsonl_gz(path)}


def _argmax(scores: list[float]) -> int | None:
    """The highest score that is not -1, the first on ties (written out, not judge.best_index)."""
    valid = [s for s in scores if s >= 0]
    return scores.index(max(valid)) if valid else None


@pytest.fixture
def from_published(workspace, monkeypatch, fake_engine):
    """The sample through translate, then gemma2 and gemma3 generated from their published files."""
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)

    def source(data):
        for variant in ("gemma2", "gemma3"):
            data["models"][variant]["generate"]["source"] = "published"

    set_params(workspace, source)
    for variant in ("gemma2", "gemma3"):
        run_stage(monkeypatch, "generate", variant)
    return workspace


def _rows(workspace, name: str) -> list[dict]:
    return pq.read_table(workspace / f"data/scored/{name}.parquet").to_pylist()


def test_score_keeps_the_published_judgements_and_loads_no_model(from_published, monkeypatch, fake_engine):
    loads, requests = fake_engine.loads, len(fake_engine.requests)
    run_stage(monkeypatch, "score", "gemma2")
    assert (fake_engine.loads, len(fake_engine.requests)) == (loads, requests)  # no model loaded
    theirs, kinds = _published("gemma2"), set()
    for row in _rows(from_published, "gemma2"):
        record = theirs.get(row["conversation_id"])
        if record is None:  # the file lacks the row: nothing judged, the second turn says so
            assert (row["annotations"], row["best_index"], row["judge_status"]) == (None, None, None)
            assert (row["multiturn"], row["multiturn_status"]) == (None, "not_published")
            kinds.add("not_published")
            continue
        notes, responses = (
            record["synthesized_response_scoring_annotations"],
            record["synthesized_assistant_responses"],
        )
        assert row["annotations"] == notes
        if notes is None:
            assert (row["best_index"], row["judge_status"], row["multiturn_status"]) == (None, None, None)
            continue
        best = _argmax([n["preference_score"] for n in notes])
        assert row["judge_status"] == ["published"] * len(notes)
        entries = record["synthesized_multiturn_conversation"]
        if entries and isinstance(entries[0], dict):  # the older flat shape: one conversation
            entries = [entries]
        if entries:  # kept as published; the best response is the one it continues
            assert (row["multiturn"], row["multiturn_status"]) == (entries, "published")
            assert responses[row["best_index"]] == entries[0][0]
            assert row["best_index"] == best  # the sample continues the argmax, the first on ties
        else:
            assert (row["best_index"], row["multiturn"], row["multiturn_status"]) == (best, None, None)
        kinds.add(row["multiturn_status"])
    assert {"not_published", "published"} <= kinds
    roles = engine_roles([from_published / "data/scored/gemma2.parquet"])
    assert set(roles) == {"judge", "second_turn"} and roles["judge"]["backend"] == "published"


def test_package_sft_and_compare_run_on_published_judgements(from_published, monkeypatch):
    for stage in ("score", "package", "sft", "compare"):
        run_stage(monkeypatch, stage, "gemma2")
    release = from_published / "data/release/gemma2"
    manifest = json.loads((release / "manifest.json").read_text())
    path = FILE.format(name="gemma2")
    uri = load_params().published.uri
    for role in ("generate", "judge", "second_turn"):
        producer = manifest["producers"]["models"][role]
        assert (producer["engine"], producer["model"]) == ("published", f"{uri}/{path}")
    theirs = _published("gemma2")
    records = list(read_jsonl_gz(release / "gemma2-lmsys-chat-1m-synth-ja+en.jsonl.gz"))
    assert records
    for record in records:
        published_record = theirs.get(record["conversation_id"], {})
        assert record["synthesized_response_scoring_annotations"] == published_record.get(
            "synthesized_response_scoring_annotations"
        )
    sft = json.loads((from_published / "data/metrics/sft-gemma2.json").read_text())
    assert sft["sets"]["lmsys-chat-1m-synth-ja-gemma2-2turn-wo-pii-and-template-instructions"]["written"] > 0
    compared = json.loads((from_published / "data/metrics/compare-gemma2.json").read_text())
    assert compared["rows"]["both"] > 0
    assert compared["published"]["judgements_failed"] == 55  # the published file's, all of its rows


def test_rejudge_asks_the_judge_again(from_published, monkeypatch, fake_engine):
    set_params(from_published, lambda d: d["models"]["gemma3"]["score"].update(rejudge=True))
    loads = fake_engine.loads
    run_stage(monkeypatch, "score", "gemma3")
    assert fake_engine.loads > loads
    statuses, judged = set(), 0
    for row in _rows(from_published, "gemma3"):
        for note, status in zip(row["annotations"] or [], row["judge_status"] or [], strict=True):
            statuses.add(status)  # the sample's small max_model_len skips some long responses
            judged += status == "ok"
            assert note["judgement"] is None or "Rating: [[" in note["judgement"]  # the FakeEngine's judge
    assert statuses <= {"ok", "skipped_too_long"} and judged > 0


def test_rejudge_leaves_the_resume_key_of_configs_without_it_unchanged(workspace):
    score = load_params().models["gemma3"].score
    assert "rejudge" not in recipe(score)
    assert recipe(score.model_copy(update={"rejudge": True}))["rejudge"] is True


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ([], None),
        ([A], [[A]]),  # the older flat shape, single-turn
        ([A, USER, B], [[A, USER, B]]),  # flat, two-turn
        ([[A, USER, B]], [[A, USER, B]]),  # the published shape
        ([[A]], [[A]]),
    ],
)
def test_the_published_conversation_in_either_shape(value, expected):
    assert published.conversation(value) == expected


def _record(conversation: list | None, scores: list[float]) -> dict:
    return {
        "conversation_id": "c1",
        published.JA: [{"role": "assistant", "content": t} for t in ("a", "b", "c")[: len(scores)]],
        published.NOTES: [{"preference_score": x, "response_token_length": 1} for x in scores],
        published.MULTITURN: conversation,
    }


def test_the_best_response_is_the_one_the_published_conversation_continues():
    row = published.scored_row(_record([[B, USER, A]], [7.0, 7.0]), multiturn=True)
    assert (row["best_index"], row["multiturn"], row["multiturn_status"]) == (1, [[B, USER, A]], "published")
    row = published.scored_row(_record(None, [7.0, 7.0]), multiturn=True)
    assert (row["best_index"], row["multiturn"]) == (0, None)  # no conversation: the judge's rule
    row = published.scored_row(_record([[B]], [-1.0, -1.0]), multiturn=True)
    assert row["best_index"] == 1  # every judgement failed, yet the publisher continued b


@pytest.mark.parametrize("stored", [[[{"role": "assistant", "content": "z"}]], [[], []]])
def test_a_published_conversation_from_no_response_is_refused(stored):
    with pytest.raises(SourceError, match="c1: the published synthesized_multiturn_conversation is not one"):
        published.scored_row(_record(stored, [7.0, 3.0]), multiturn=True)
