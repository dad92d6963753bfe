"""compare@M and generate with source `published`, on the sample and its project-written published files
(scripts/make_sample.py: write_published)."""

from __future__ import annotations

import copy
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scripts import make_sample
from stages.core.config.params import load_params
from stages.core.release import compare_report, comparison, published, settled
from stages.core.storage.jsonl import read_jsonl_gz
from stages.core.storage.source import ChecksumError, NoMatchError
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
    # our flags, so that compare has flags that differ from the published ones (annotations: published
    # takes theirs wherever the file has the row: tests/test_annotations.py)
    set_params(upstream, lambda d: d["models"]["gemma3"].update(annotations="ours"))
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
    expected = {k: sum(int(s) == k for s in _scores(theirs) if s != -1) for k in range(11)}
    assert published_scores == {-1: sum(s == -1 for s in _scores(theirs)), **expected}
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
    counts = {(r["responses"], r["source"]): r["rows"] for r in per_row}
    assert counts[10, "published"] == sum(_count(r) == 10 for r in theirs)
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
    for stage in ("score", "package"):  # the published judgements kept, re-packaged
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


EN, MULTITURN = "synthesized_assistant_responses_en", "synthesized_multiturn_conversation"
# the sample's published files (scripts/make_sample.py): rows, instructions with responses, responses,
# instructions with English responses, English responses, multi-turn entries, single-turn, two-turn
PUBLISHED = {
    "llama3.1": (298, 194, 1108, 194, 194, 0, 0, 0),
    "gemma2": (298, 194, 1108, 194, 194, 194, 136, 58),
    "gemma3": (309, 201, 1956, 0, 0, 0, 0, 0),
}


def _turns(entry: list | None) -> int | None:
    """Assistant turns of a multi-turn entry of either shape (flat, or a list holding a conversation)."""
    if entry is None:
        return None
    messages = [m for item in entry for m in (item if isinstance(item, list) else [item])]
    return sum(m["role"] == "assistant" for m in messages)


def _side(records: list[dict]) -> tuple:
    turns = [t for t in (_turns(r.get(MULTITURN)) for r in records) if t is not None]
    english = [len(r.get(EN) or []) for r in records]
    return (
        len(records),
        sum(_count(r) > 0 for r in records),
        sum(map(_count, records)),
        sum(n > 0 for n in english),
        sum(english),
        len(turns),
        turns.count(1),
        turns.count(2),
    )


def _figures(side: dict) -> tuple:
    multiturn = side["multiturn"]
    return (
        side["rows"],
        side["instructions_with_responses"],
        side["responses"],
        side["instructions_with_responses_en"],
        side["responses_en"],
        multiturn["entries"],
        multiturn["single_turn"],
        multiturn["two_turn"],
    )


@pytest.fixture
def compared_gemma2(upstream, monkeypatch):
    for stage in ("generate", "score", "package", "compare"):
        run_stage(monkeypatch, stage, "gemma2")
    return upstream


def test_compare_counts_english_multiturn_and_the_cards_figures(compared_gemma2):
    metrics = json.loads((compared_gemma2 / "data/metrics/compare-gemma2.json").read_text())
    release = compared_gemma2 / "data/release/gemma2/gemma2-lmsys-chat-1m-synth-ja+en.jsonl.gz"
    ours, theirs = {r["conversation_id"]: r for r in read_jsonl_gz(release)}, _published("gemma2")
    assert metrics["compared"] is True
    assert _figures(metrics["published"]) == _side(list(theirs.values())) == PUBLISHED["gemma2"]
    assert _figures(metrics["ours"]) == _side(list(ours.values()))
    assert metrics["published"]["multiturn"]["share_two_turn"] == round(58 / 194, 6)
    assert metrics["ours"]["multiturn"]["two_turn"] > 0 and metrics["ours"]["responses_en"] > 0
    # the card's figures counted on both sides; the card's own only against its release (not the sample)
    assert metrics["figures"]["instructions"] == {"ours": _side(list(ours.values()))[1], "published": 194}
    assert metrics["figures"]["multiturn"]["published"] == 58
    assert not any("card" in row for row in metrics["figures"].values())
    shared = sorted(ours.keys() & theirs.keys())
    for field, present in (
        (EN, lambda r: bool(r.get(EN))),
        (MULTITURN, lambda r: _turns(r.get(MULTITURN)) == 2),
    ):
        name = "responses_en_present" if field == EN else "two_turn"
        agree = sum(present(ours[c]) == present(theirs[c]) for c in shared) / len(shared)
        assert metrics["agreement"][name] == round(agree, 6), name
    chars = json.loads(
        (compared_gemma2 / "data/metrics/plots/gemma2/compare_response_en_chars.json").read_text()
    )
    lengths = [len(m["content"]) for r in theirs.values() for m in r.get(EN) or []]
    published_chars = {r["characters"]: r["responses_en"] for r in chars if r["source"] == "published"}
    assert sum(published_chars.values()) == 194 and published_chars["0-255"] == sum(n < 256 for n in lengths)
    report = (compared_gemma2 / "data/metrics/compare-gemma2.md").read_text()
    assert "## Multi-turn entries (by assistant turns)" in report and "| two_turn |" in report


def test_compare_counts_the_redacted_conversations_each_side_answers(compared_gemma2):
    metrics = json.loads((compared_gemma2 / "data/metrics/compare-gemma2.json").read_text())
    translated = pq.read_table(compared_gemma2 / "data/private/translated-ja.parquet").to_pylist()
    redacted = {r["conversation_id"] for r in translated if r["redacted"]}
    release = compared_gemma2 / "data/release/gemma2/gemma2-lmsys-chat-1m-synth-ja+en.jsonl.gz"
    ours, theirs = {r["conversation_id"]: r for r in read_jsonl_gz(release)}, _published("gemma2")
    assert redacted
    assert metrics["redacted"] == {
        "conversations": len(redacted),
        "rows_ours": len(redacted & ours.keys()),
        "with_responses_ours": sum(_count(ours[c]) > 0 for c in redacted & ours.keys()),
        "rows_published": len(redacted & theirs.keys()),
        "with_responses_published": sum(_count(theirs[c]) > 0 for c in redacted & theirs.keys()),
    }


def test_published_figures_of_the_gemma3_and_llama_files(compared):
    gemma3 = json.loads((compared / "data/metrics/compare-gemma3.json").read_text())
    assert _figures(gemma3["published"]) == PUBLISHED["gemma3"]
    assert gemma3["published"]["multiturn"] == {"entries": 0, "single_turn": 0, "two_turn": 0, "other": 0}
    assert _side(list(_published("llama3.1").values())) == PUBLISHED["llama3.1"]


@pytest.mark.parametrize("nested", [False, True])
def test_turns_and_the_multiturn_shape_of_a_file(tmp_path, nested):
    def message(role):
        return {"role": role, "content": role}

    entries = [
        [message("assistant")],
        None,
        [message("assistant"), message("user"), message("assistant")],
        [message("user"), message("assistant"), message("user"), message("assistant")],
    ]
    entries = [[e] if nested and e is not None else e for e in entries]
    path = tmp_path / "file.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write(json.dumps({"conversation_id": "x"}) + "\n")  # no entry in the first record
        for i, entry in enumerate(entries):
            out.write(json.dumps({"conversation_id": str(i), MULTITURN: entry}) + "\n")
    kind = comparison.multiturn_type(path)
    assert kind == (comparison.NESTED if nested else comparison.FLAT)
    column = pa.array(entries, kind)
    assert comparison.turns(column).to_pylist() == [1, None, 2, 2] == [_turns(e) for e in entries]
    assert comparison.turns(column.slice(1)).to_pylist() == [None, 2, 2]


def test_a_file_without_the_multiturn_field_has_no_shape(tmp_path):
    path = tmp_path / "file.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write(json.dumps({"conversation_id": "x"}) + "\n")
    assert comparison.multiturn_type(path) is None
    assert MULTITURN not in comparison.record_schema(path)[1]


def test_the_cards_figures_are_those_of_its_release_only(workspace):
    spec = load_params().published
    assert spec.figures("gemma2") is None  # the sample's files are not the card's release
    on_the_hub = spec.model_copy(update={"uri": spec.card.uri})
    assert on_the_hub.figures("gemma2") == {
        "instructions": 451450,
        "responses": 2707917,
        "instructions_en": 453861,
        "responses_en": 453861,
        "multiturn": 134014,
    }
    assert on_the_hub.figures("gemma3")["multiturn"] is None and on_the_hub.figures("other") is None
    sides = {"ours": {"instructions_with_responses": 5, "responses": 9, "instructions_with_responses_en": 0,
                      "responses_en": 0, "multiturn": {"two_turn": 0}}}  # fmt: skip
    sides["published"] = sides["ours"]
    found = comparison.figures(sides, on_the_hub.figures("gemma3"))
    assert found["instructions"] == {"ours": 5, "published": 5, "card": 487370}
    assert found["multiturn"] == {"ours": 0, "published": 0}  # the card gives none


def test_a_variant_with_compare_off_builds_without_a_published_file(upstream, monkeypatch):
    def off(data):
        data["models"]["gemma3"].update(compare=False, annotations="ours")
        data["published"]["file"] = "dataset/{name}-not-published.jsonl.gz"

    set_params(upstream, off)
    for stage in ("generate", "score", "package", "compare"):  # no published file is read
        run_stage(monkeypatch, stage, "gemma3")
    metrics = upstream / "data/metrics"
    assert json.loads((metrics / "compare-gemma3.json").read_text()) == {"compared": False}
    assert "not compared" in (metrics / "compare-gemma3.md").read_text()
    for table in comparison.PLOTS:
        assert json.loads((metrics / f"plots/gemma3/compare_{table}.json").read_text()) == []
    assert not (upstream / "data/.cache/published").exists()


def test_a_new_variant_copied_with_compare_on_is_told_to_set_compare_false(upstream, monkeypatch):
    """docs/configuration.md: a new variant starts as a copy of gemma3.yaml, which compares (compare: true);
    the publisher released no file of that name, so compare@M stops naming the switch that fixes it."""

    def add(data):  # annotations: ours set (left at published, generate stops: tests/test_annotations.py)
        mine = {**copy.deepcopy(data["models"]["gemma3"]), "release_name": "mine", "annotations": "ours"}
        data["models"]["mine"] = mine

    set_params(upstream, add)
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "mine")
    with pytest.raises(NoMatchError) as err:
        run_stage(monkeypatch, "compare", "mine")
    message = str(err.value)
    assert "dataset/mine-lmsys-chat-1m-synth-ja+en.jsonl.gz" in message
    assert "`compare: false` in conf/model/mine.yaml (models.mine.compare)" in message
    assert not (upstream / "data/metrics/compare-mine.json").exists()


def test_a_rerun_writes_the_same_report_metrics_and_plot_tables(compared, monkeypatch):
    """compare re-runs whenever stages/core changes (its DVC code dep): the committed files must not."""
    metrics = compared / "data/metrics"
    files = [metrics / "compare-gemma3.json", metrics / "compare-gemma3.md"]
    files += sorted((metrics / "plots/gemma3").glob("compare_*.json"))
    first = {path: path.read_bytes() for path in files}
    run_stage(monkeypatch, "compare", "gemma3")
    assert {path: path.read_bytes() for path in files} == first


RELEASE_NAMES = {"gemma2": "gemma2", "gemma3": "gemma3", "llama31": "llama3.1"}
NOTES = "synthesized_response_scoring_annotations"


@pytest.fixture(params=list(RELEASE_NAMES))
def compared_each(upstream, monkeypatch, request):
    for stage in ("generate", "score", "package", "compare"):
        run_stage(monkeypatch, stage, request.param)
    return upstream, request.param


def _categories(records) -> dict[str, int]:
    found: dict[str, int] = {}
    for record in records:
        if (category := record["is_template_instruction"]) is not None:
            found[category] = found.get(category, 0) + 1
    return dict(sorted(found.items()))


def _lengths(records, flag: bool) -> list[int]:
    return [
        n["response_token_length"] for r in records for n in r[NOTES] or [] if n["repetition_flag"] is flag
    ]


def test_what_the_published_file_settles(compared_each):
    """compare@M's figures of what the published file settles, each counted here from the two files:
    template categories, the repetition flag against token length, the longest response, two-turn ids."""
    workspace, variant = compared_each
    metrics = json.loads((workspace / f"data/metrics/compare-{variant}.json").read_text())
    (release,) = (workspace / f"data/release/{variant}").glob("*-lmsys-chat-1m-synth-ja+en.jsonl.gz")
    ours = {r["conversation_id"]: r for r in read_jsonl_gz(release)}
    theirs = _published(RELEASE_NAMES[variant])
    sides = {"ours": list(ours.values()), "published": list(theirs.values())}
    config = load_params().models[variant]
    threshold, max_tokens = config.score.repetition_threshold, config.generate.sampling.max_tokens

    categories = {side: _categories(records) for side, records in sides.items()}
    assert metrics["template_categories"] == {
        **categories,
        "ours_only": {k: n for k, n in categories["ours"].items() if k not in categories["published"]},
        "published_only": {k: n for k, n in categories["published"].items() if k not in categories["ours"]},
    }
    assert categories["published"]  # the sample's published files have template rows

    rule = metrics["repetition_rule"]
    assert rule["repetition_threshold"] == threshold
    for side, records in sides.items():
        flagged, unflagged = _lengths(records, True), _lengths(records, False)
        found = rule[side]
        assert (found["flagged"], found["unflagged"], found["unknown"]) == (len(flagged), len(unflagged), 0)
        assert found.get("flagged_min") == min(flagged, default=None)
        assert found.get("unflagged_max") == max(unflagged, default=None)
        candidates = range(max([*flagged, *unflagged, threshold]) + 1)  # every t worth trying
        separating = [t for t in candidates if all(n > t for n in flagged) and all(n <= t for n in unflagged)]
        assert found["separable"] == bool(separating)
        assert found["separating"].get("from", 0) == min(separating)
        assert found["separating"].get("to", "none") == (max(separating) if flagged else "none")
        assert found["agrees"] == (threshold in separating)
    # the sample's published flags follow one rule (more than some t of 1508..2500 tokens), not the
    # sample profile's 16; ours follow the configured threshold
    assert rule["published"]["separating"] == {"from": 1508, "to": 2500} and not rule["published"]["agrees"]
    assert rule["ours"]["agrees"]

    longest = metrics["longest_response"]
    assert longest["max_tokens"] == max_tokens
    for side, records in sides.items():
        lengths = _lengths(records, True) + _lengths(records, False)
        assert longest[side] == {"tokens": max(lengths), "responses": lengths.count(max(lengths))}
    assert longest["published"]["tokens"] == 2509 and longest["ours"]["tokens"] <= max_tokens

    report = (workspace / f"data/metrics/compare-{variant}.md").read_text()
    section = report.split("## What the published file settles\n\n")[1].split("\n\n")[0].splitlines()
    assert len(section) == 4
    named = ", ".join(f"{k} ({n})" for k, n in categories["published"].items())
    assert section[0].startswith("- Template categories (checks `translate.templates`): ")
    assert f"published {len(categories['published'])}: {named};" in section[0]
    assert section[1].startswith(
        f"- Repetition flag against response_token_length (checks "
        f"`models.{variant}.score.repetition_threshold` = {threshold}): published "
        f"{rule['published']['flagged']} flagged (the shortest 2501 tokens), "
        f"{rule['published']['unflagged']} unflagged (the longest 1508 tokens): flagged means more "
        "than t tokens for any t from 1508 to 2500; ours "
    )
    assert section[1].endswith(f"; the published file disagrees with {threshold}.")
    assert section[2] == (
        f"- Longest Japanese response (checks `models.{variant}.generate.sampling.max_tokens` = "
        f"{max_tokens}): published 2509 tokens ({longest['published']['responses']} responses reach it); "
        f"ours {longest['ours']['tokens']} tokens ({longest['ours']['responses']} responses reach it)."
    )
    assert section[3].startswith(f"- Two-turn conversations (checks `models.{variant}.second_turn`")

    if variant != "gemma2":  # no multi-turn field on the published side: nothing to settle
        assert "two_turn_ids" not in metrics and "not settled here" in section[3]
        return
    shared = sorted(ours.keys() & theirs.keys())
    two = {c: (_turns(ours[c].get(MULTITURN)) == 2, _turns(theirs[c].get(MULTITURN)) == 2) for c in shared}
    counts = {
        "both": sum(o and p for o, p in two.values()),
        "ours_only": sum(o and not p for o, p in two.values()),
        "published_only": sum(p and not o for o, p in two.values()),
        "neither": sum(not o and not p for o, p in two.values()),
    }
    agreement = round((counts["both"] + counts["neither"]) / len(shared), 6)
    assert metrics["two_turn_ids"] == {"shared": len(shared), **counts, "agreement": agreement}
    assert agreement == metrics["agreement"]["two_turn"] and counts["both"] > 0
    assert section[3].endswith(
        f"of {len(shared)} shared conversations, two-turn on both sides {counts['both']}, ours only "
        f"{counts['ours_only']}, published only {counts['published_only']}, neither {counts['neither']}: "
        f"agreement {agreement}."
    )


def _write(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return path


def _record(cid: str, category: str | None, notes: list[tuple[int | None, bool | None]]) -> dict:
    """A published-shaped record: `notes` its (response_token_length, repetition_flag) per response."""
    return {
        "conversation_id": cid,
        "empty_user_instruction_ja": False,
        "duplicate_user_instruction_ja": None,
        "is_template_instruction": category,
        "synthesized_assistant_responses": [{"role": "assistant", "content": "x"} for _ in notes] or None,
        NOTES: [
            {"response_token_length": n, "judgement": "", "repetition_flag": f, "preference_score": 5.0}
            for n, f in notes
        ]
        or None,
    }


def _settled_totals(path: Path):
    """One side's totals of a file, tallied a batch at a time as compare tallies them."""
    schema, columns = comparison.record_schema(path)
    totals = Counter()
    for batch in published.read_records(path, columns, schema):
        settled.tally(totals, batch)
    return totals


def test_flags_no_single_threshold_separates_are_reported_so(tmp_path):
    """A published-shaped file whose repetition flags follow no length threshold: a flagged response
    shorter than an unflagged one."""
    path = _write(
        tmp_path / "not-separable.jsonl.gz",
        [
            _record("a", None, [(100, True), (3000, False), (50, False)]),
            _record("b", "company introduction", [(2500, True), (None, True), (10, None)]),
            _record("c", None, []),
        ],
    )
    rule = settled.repetition_side(_settled_totals(path), 2000)
    assert rule == {
        "flagged": 2,
        "unflagged": 2,
        "unknown": 2,  # a null length, a null flag
        "flagged_min": 100,
        "unflagged_max": 3000,
        "separable": False,
        "agrees": False,
    }
    lines = compare_report._rule("published", rule)
    assert lines.endswith("no single threshold separates them")


def test_the_thresholds_that_separate_the_flags_and_the_configured_one(tmp_path):
    """flagged > t >= unflagged: the published rule "more than 2000 tokens" is t = 2000 exactly when the
    longest unflagged response has 2000 tokens and the shortest flagged 2001."""
    path = _write(
        tmp_path / "edge.jsonl.gz",
        [_record("a", None, [(2001, True), (2000, False)]), _record("b", None, [(2001, True), (7, False)])],
    )
    totals = _settled_totals(path)
    rule = settled.repetition_side(totals, 2000)
    assert rule["separating"] == {"from": 2000, "to": 2000} and rule["agrees"]
    assert not settled.repetition_side(totals, 2001)["agrees"]
    assert not settled.repetition_side(totals, 1999)["agrees"]
    assert settled.longest_response({"ours": totals, "published": totals}, 4096)["published"] == {
        "tokens": 2001,
        "responses": 2,
    }
    equal = _settled_totals(
        _write(tmp_path / "equal.jsonl.gz", [_record("a", None, [(5, True), (5, False)])])
    )
    assert not settled.repetition_side(equal)["separable"]  # no t with 5 > t >= 5
    unflagged = _settled_totals(_write(tmp_path / "none.jsonl.gz", [_record("a", None, [(5, False)])]))
    assert settled.repetition_side(unflagged, 5) == {
        "flagged": 0,
        "unflagged": 1,
        "unknown": 0,
        "unflagged_max": 5,
        "separable": True,
        "separating": {"from": 5},  # any t from 5 up
        "agrees": True,
    }


def test_template_categories_only_one_side_has(tmp_path):
    ours = _write(
        tmp_path / "ours.jsonl.gz",
        [_record("a", "company introduction", []), _record("b", "story", []), _record("c", "story", [])],
    )
    theirs = _write(
        tmp_path / "theirs.jsonl.gz",
        [_record("a", "company introduction", []), _record("b", "chemical industry article", [])],
    )
    found = settled.template_categories({"ours": _settled_totals(ours), "published": _settled_totals(theirs)})
    assert found == {
        "ours": {"company introduction": 1, "story": 2},
        "published": {"chemical industry article": 1, "company introduction": 1},
        "ours_only": {"story": 2},
        "published_only": {"chemical industry article": 1},
    }
