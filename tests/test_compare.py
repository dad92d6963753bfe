"""compare@M and generate with source `published`, on the sample and its project-written published files
(scripts/make_sample.py: write_published)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from scripts import make_sample
from stages.core import published
from stages.core.io import read_jsonl_gz
from stages.core.params import load_params
from stages.core.source import ChecksumError
from tests.conftest import SAMPLE, run_stage, set_params

FILE = "dataset/{name}-lmsys-chat-1m-synth-ja+en.jsonl.gz"
FLAGS = ["empty_user_instruction_ja", "duplicate_user_instruction_ja", "is_template_instruction"]


def _published(name: str) -> dict[str, dict]:
    path = SAMPLE / "lmsys-chat-1m-synth" / FILE.format(name=name)
    return {r["conversation_id"]: r for r in read_jsonl_gz(path)}


def _count(record: dict) -> int:
    return len(record["synthesized_assistant_responses"] or [])


def _scores(records) -> list[float]:
    return [
        n["preference_score"] for r in records for n in r["synthesized_response_scoring_annotations"] or []
    ]


@pytest.fixture
def upstream(workspace, monkeypatch, fake_engine):
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    return workspace


@pytest.fixture
def compared(upstream, monkeypatch):
    for stage in ("generate", "score", "package", "compare"):
        run_stage(monkeypatch, stage, "gemma3")
    return upstream


def test_compare_metrics_are_those_of_the_two_files(compared):
    metrics = json.loads((compared / "data/metrics/compare-gemma3.json").read_text())
    release = compared / "data/release/gemma3/gemma3-lmsys-chat-1m-synth-ja+en.jsonl.gz"
    ours, theirs = {r["conversation_id"]: r for r in read_jsonl_gz(release)}, _published("gemma3")
    shared = sorted(ours.keys() & theirs.keys())
    # the sample's published file: 309 rows, 3 of them conversations no LMSYS shard holds
    assert len(theirs) == 309
    assert metrics["rows"] == {
        "ours": len(ours),
        "published": 309,
        "both": len(shared),
        "only_ours": len(ours.keys() - theirs.keys()),
        "only_published": len(theirs.keys() - ours.keys()),
    }
    assert metrics["rows"]["only_ours"] > 0 and metrics["rows"]["only_published"] == 3
    for flag in FLAGS:
        agree = sum(ours[c][flag] == theirs[c][flag] for c in shared) / len(shared)
        assert 0.5 < agree < 1 and metrics["agreement"][flag] == round(agree, 6), flag
    set_ours_only = sum(ours[c][FLAGS[2]] is not None and theirs[c][FLAGS[2]] is None for c in shared)
    assert metrics["differ"][FLAGS[2]]["set_ours_only"] == set_ours_only > 0
    agree = sum(_count(ours[c]) == _count(theirs[c]) for c in shared) / len(shared)
    assert metrics["agreement"]["responses_per_row"] == round(agree, 6)
    for side, records in (("ours", ours.values()), ("published", theirs.values())):
        scores = _scores(records)
        valid = [s for s in scores if s != -1]
        assert metrics[side]["responses"] == sum(map(_count, records))
        assert metrics[side]["judgements_failed"] == len(scores) - len(valid)
        assert metrics[side]["mean_preference_score"] == round(sum(valid) / len(valid), 4)
    assert metrics["published"]["judgements_failed"] > 0 and metrics["published"]["repetition_flags"] > 0


def test_compare_plot_tables_and_report(compared):
    plots = compared / "data/metrics/plots/gemma3"
    theirs = _published("gemma3").values()
    scores = json.loads((plots / "compare_scores.json").read_text())
    assert {r["source"] for r in scores} == {"ours", "published"}
    published_scores = {r["preference_score"]: r["responses"] for r in scores if r["source"] == "published"}
    expected = {str(k): sum(int(s) == k for s in _scores(theirs) if s != -1) for k in range(11)}
    assert published_scores == {"failed": sum(s == -1 for s in _scores(theirs)), **expected}
    tokens = json.loads((plots / "compare_response_tokens.json").read_text())
    lengths = [
        n["response_token_length"]
        for r in theirs
        for n in r["synthesized_response_scoring_annotations"] or []
    ]
    assert {r["tokens"]: r["responses"] for r in tokens if r["source"] == "published"}["2048+"] == sum(
        n > 2047 for n in lengths
    )
    per_row = json.loads((plots / "compare_responses_per_row.json").read_text())
    assert {r["bar"]: r["rows"] for r in per_row}["10 published"] == sum(_count(r) == 10 for r in theirs)
    report = (compared / "data/metrics/compare-gemma3.md").read_text()
    metrics = json.loads((compared / "data/metrics/compare-gemma3.json").read_text())
    assert "# compare@gemma3" in report
    rows = metrics["rows"]
    assert f"| {rows['both']} | {rows['only_ours']} | {rows['only_published']} |" in report
    assert (
        f"| is_template_instruction | {metrics['agreement']['is_template_instruction']} | differ |" in report
    )
    assert published.fetch(load_params().published, "gemma3", "data/.cache/published")[1]["sha256"] in report


def test_generate_takes_the_published_responses(upstream, monkeypatch, fake_engine):
    def from_published(data):
        for variant in ("gemma3", "llama31"):
            data["models"][variant]["generate"]["source"] = "published"

    set_params(upstream, from_published)
    loads, requests = fake_engine.loads, len(fake_engine.requests)  # translate's
    for variant in ("gemma3", "llama31"):
        run_stage(monkeypatch, "generate", variant)
    assert (fake_engine.loads, len(fake_engine.requests)) == (loads, requests)  # no model loaded
    for variant, name, subset in (("gemma3", "gemma3", "ja+unsafe"), ("llama31", "llama3.1", "ja")):
        translated = pq.read_table(
            upstream / f"data/private/translated-{subset}.parquet", columns=["conversation_id"]
        )
        theirs = _published(name)
        rows = pq.read_table(upstream / f"data/generated/{variant}.parquet").to_pylist()
        assert [r["conversation_id"] for r in rows] == translated["conversation_id"].to_pylist()
        statuses = set()
        for row in rows:
            record = theirs.get(row["conversation_id"])
            if record is None:
                assert row["responses_ja"] is None and row["status_ja"] == "not_published"
                statuses.add("not_published")
                continue
            notes = record["synthesized_response_scoring_annotations"] or []
            expected = [
                {
                    "content": m["content"],
                    "finish_reason": None,
                    "prompt_tokens": None,
                    "completion_tokens": n,
                }
                for m, n in zip(
                    record["synthesized_assistant_responses"] or [],
                    [n["response_token_length"] for n in notes],
                    strict=True,
                )
            ]
            assert row["responses_ja"] == (expected or None)
            assert row["status_ja"] == ("published" if expected else None)
            statuses.add(row["status_ja"])
            english = record.get("synthesized_assistant_responses_en")
            assert [r["content"] for r in row["responses_en"] or []] == [m["content"] for m in english or []]
            assert row["status_en"] == (("published" if english else None) if variant == "llama31" else None)
        assert statuses == {"published", "not_published", None}
    for stage in ("score", "package"):  # re-judged and re-packaged
        run_stage(monkeypatch, stage, "gemma3")
    release = upstream / "data/release/gemma3/gemma3-lmsys-chat-1m-synth-ja+en.jsonl.gz"
    theirs = _published("gemma3")
    for record in read_jsonl_gz(release):
        published_record = theirs.get(record["conversation_id"], {})
        assert record["synthesized_assistant_responses"] == published_record.get(
            "synthesized_assistant_responses"
        )
    manifest = json.loads((upstream / "data/release/gemma3/manifest.json").read_text())
    assert manifest["producers"]["models"]["generate"]["engine"] == "published"


def test_a_wrong_sha256_pin_is_refused_and_a_pinned_copy_is_checked(workspace):
    path = FILE.format(name="gemma3")

    def pin(digest: str | None):
        set_params(workspace, lambda d: d["published"].update(sha256={path: digest} if digest else {}))
        return load_params().published

    with pytest.raises(
        ChecksumError, match=f"{re.escape(path)}: sha256 is [0-9a-f]{{64}} but params pin 0{{64}}"
    ):
        published.fetch(pin("0" * 64), "gemma3", "cache")
    assert not [p for p in Path("cache").rglob("*.gz")]  # nothing left behind
    right = published.fetch(pin(None), "gemma3", "cache")[1]["sha256"]
    local, _ = published.fetch(pin(right), "gemma3", "cache")
    local.write_bytes(b"torn")  # a damaged copy is fetched again, not used
    local, record = published.fetch(pin(right), "gemma3", "cache")
    assert (
        record["sha256"] == right
        and local.read_bytes() == (SAMPLE / "lmsys-chat-1m-synth" / path).read_bytes()
    )


def test_the_sample_published_files_are_rewritten_byte_identical(tmp_path):
    rows, translations, rng = make_sample.build_rows(0)
    missing = make_sample.missing_translations(rows, translations)
    shards = make_sample.hygiene_rows(0, rows, translations, rng)
    for out in (tmp_path / "a", tmp_path / "b"):
        make_sample.write_published(out, [r for s in shards for r in s], translations, missing)
    for name in make_sample.PUBLISHED_VARIANTS:
        committed = (SAMPLE / "lmsys-chat-1m-synth" / FILE.format(name=name)).read_bytes()
        assert (tmp_path / "a/lmsys-chat-1m-synth" / FILE.format(name=name)).read_bytes() == committed
        assert (tmp_path / "b/lmsys-chat-1m-synth" / FILE.format(name=name)).read_bytes() == committed
        assert len(committed) < 100_000
