"""The publisher's annotations as inputs (models.<v>.annotations, stages/core/release/flags.py): the flags
and the Gemma-2 two-turn ids of the variant's published file win where it has the row, ours are kept for
the rows it lacks, and the card says which is which; on the sample, whose project-written published files
(scripts/make_sample.py) disagree with translate's flags on some rows."""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest

from stages.core.release import flags, published
from stages.core.rows.second_turn import selected, wanted
from stages.core.storage.jsonl import read_jsonl_gz
from stages.core.storage.source import NoMatchError
from tests.conftest import SAMPLE, run_stage, set_params

FILE = "dataset/{name}-lmsys-chat-1m-synth-ja+en.jsonl.gz"
RELEASE = "data/release/gemma2/gemma2-lmsys-chat-1m-synth-ja+en.jsonl.gz"
FLAGS = ["duplicate_user_instruction_ja", "empty_user_instruction_ja", "is_template_instruction"]
MULTITURN = "synthesized_multiturn_conversation"


def _published(name: str = "gemma2") -> dict[str, dict]:
    path = SAMPLE / "lmsys-chat-1m-synth" / FILE.format(name=name)
    return {r["conversation_id"]: r for r in read_jsonl_gz(path)}


def _two_turn(record: dict) -> bool:
    """Whether a record's synthesized_multiturn_conversation (a list of one conversation) has two turns."""
    entry = record.get(MULTITURN)
    return bool(entry) and len(entry[0]) > 1


def _translated(workspace) -> dict[str, dict]:
    table = pq.read_table(workspace / "data/private/translated-ja.parquet")
    return {r["conversation_id"]: r for r in table.to_pylist()}


def _release(workspace) -> dict[str, dict]:
    return {r["conversation_id"]: r for r in read_jsonl_gz(workspace / RELEASE)}


def _annotations(workspace, name: str = "gemma2") -> dict[str, dict]:
    table = pq.read_table(workspace / f"data/generated/{name}.annotations.parquet")
    return {r["conversation_id"]: r for r in table.to_pylist()}


def _metrics(workspace) -> dict:
    return json.loads((workspace / "data/metrics/package-gemma2.json").read_text())


@pytest.fixture
def upstream(workspace, monkeypatch, fake_engine):
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    return workspace


def _build(workspace, monkeypatch, **settings) -> None:
    """gemma2's generate, score and package, with `settings` (annotations, source) set first."""

    def mutate(data):
        variant = data["models"]["gemma2"]
        variant["annotations"] = settings.get("annotations", variant["annotations"])
        variant["generate"]["source"] = settings.get("source", "engine")

    set_params(workspace, mutate)
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "gemma2")


def test_the_sample_variants_take_the_published_annotations(workspace):
    """The published variants' default: their conf/model files say `annotations: published`."""
    from stages.core.config.params import load_params

    assert {v.annotations for v in load_params().models.values()} == {"published"}


def test_source_published_keeps_every_published_flag_and_two_turn_id(upstream, monkeypatch):
    _build(upstream, monkeypatch, source="published")  # score.rejudge false: the published judgements
    theirs, ours, release = _published(), _translated(upstream), _release(upstream)
    shared = release.keys() & theirs.keys()
    assert shared and release.keys() - theirs.keys()  # the sample's file lacks some released rows
    for cid, record in release.items():
        if cid in theirs:  # every published flag value kept, categories included
            assert [record[f] for f in FLAGS] == [theirs[cid][f] for f in FLAGS], cid
        else:  # a row the publisher never annotated keeps ours
            assert [record[f] for f in FLAGS] == [ours[cid][f] for f in FLAGS], cid
    # the published flags are not ours: the test would not tell them apart otherwise
    differ = {f: [c for c in shared if theirs[c][f] != ours[c][f]] for f in FLAGS}
    assert all(differ.values()), differ
    categories = {theirs[c]["is_template_instruction"] for c in shared} - {None}
    assert categories == {"company introduction", "chemical industry article"}
    two_turn = {c for c in release if release[c][MULTITURN] and len(release[c][MULTITURN][0]) > 1}
    assert two_turn == {c for c in shared if _two_turn(theirs[c])} and two_turn
    table = _annotations(upstream)
    assert list(table) == list(ours)  # one row per translated row, in translated order
    assert {c for c, r in table.items() if r["annotated_by"] == "published"} == ours.keys() & theirs.keys()
    assert all(r["two_turn"] is None for c, r in table.items() if c not in theirs)
    assert {c for c, r in table.items() if r["two_turn"]} == {
        c for c in ours if c in theirs and _two_turn(theirs[c])
    }


def test_source_engine_asks_a_second_turn_exactly_for_the_published_two_turn_ids(upstream, monkeypatch):
    _build(upstream, monkeypatch)  # the fake engine answers, judges and writes the second turns
    theirs, release = _published(), _release(upstream)
    share = 0.297
    answered = {c for c, r in release.items() if r[MULTITURN]}  # the rows with a best response
    two_turn = {c for c in answered if len(release[c][MULTITURN][0]) > 1}
    shared = answered & theirs.keys()
    assert shared and answered - theirs.keys()
    assert two_turn & shared == {c for c in shared if _two_turn(theirs[c])} != set()
    # the rows the publisher never annotated follow the hash
    assert two_turn - theirs.keys() == {c for c in answered - theirs.keys() if selected(c, share)}
    # and the hash alone would have picked other ids: the published ids are what decided
    assert {c for c in shared if selected(c, share)} != two_turn & shared
    for cid in shared:  # flags: the publisher's where it has the row
        assert [release[cid][f] for f in FLAGS] == [theirs[cid][f] for f in FLAGS]


def test_a_duplicate_only_the_publisher_flagged_gets_no_responses(upstream, monkeypatch):
    theirs, ours = _published(), _translated(upstream)
    only_theirs = [
        c
        for c in ours
        if c in theirs
        and theirs[c]["duplicate_user_instruction_ja"] is not None
        and ours[c]["duplicate_user_instruction_ja"] is None
        and not ours[c]["empty_user_instruction_ja"]
    ]
    only_ours = [
        c
        for c in ours
        if c in theirs
        and theirs[c]["duplicate_user_instruction_ja"] is None
        and not theirs[c]["empty_user_instruction_ja"]
        and ours[c]["duplicate_user_instruction_ja"] is not None
    ]
    assert only_theirs and only_ours
    run_stage(monkeypatch, "generate", "gemma2")  # gemma2's default: annotations published
    table = pq.read_table(upstream / "data/generated/gemma2.parquet")
    rows = {r["conversation_id"]: r for r in table.to_pylist()}
    for cid in only_theirs:  # not asked: no responses, no status
        assert (rows[cid]["responses_ja"], rows[cid]["status_ja"], rows[cid]["status_en"]) == (
            None,
            None,
            None,
        )
    for cid in only_ours:  # the publisher answered it: so do we
        assert rows[cid]["status_ja"] in {"ok", "skipped_too_long"}


def test_annotations_ours_keeps_our_flags_and_the_hash(upstream, monkeypatch):
    _build(upstream, monkeypatch, annotations="ours")
    ours, release = _translated(upstream), _release(upstream)
    share = 0.297
    for cid, record in release.items():
        assert [record[f] for f in FLAGS] == [ours[cid][f] for f in FLAGS], cid
        if record[MULTITURN]:
            assert (len(record[MULTITURN][0]) > 1) == selected(cid, share), cid
    table = _annotations(upstream)
    assert {r["annotated_by"] for r in table.values()} == {"ours"}
    assert {r["two_turn"] for r in table.values()} == {None}
    metrics = _metrics(upstream)
    assert (metrics["annotations_published"], metrics["annotations_ours"]) == (0, len(release))
    card = (upstream / "data/release/gemma2/README.md").read_text()
    assert f"are this project's, computed by translate's rules, on all {len(release):,} rows" in card
    assert "(`annotations: ours`)" in card


def test_the_card_and_the_metrics_say_whose_flags_each_row_carries(upstream, monkeypatch):
    _build(upstream, monkeypatch, source="published")
    theirs, release = _published(), _release(upstream)
    published_rows = len(release.keys() & theirs.keys())
    metrics = _metrics(upstream)
    assert metrics["annotations_published"] == published_rows > 0
    assert metrics["annotations_ours"] == len(release) - published_rows > 0
    card = (upstream / "data/release/gemma2/README.md").read_text()
    sentence = (
        "Flags: `is_template_instruction` (its category), `duplicate_user_instruction_ja` and "
        "`empty_user_instruction_ja` are the publisher's, as its published file has them, on "
        f"{published_rows:,} rows (`annotations_published`), and this project's, computed by translate's "
        f"rules, on the {len(release) - published_rows:,} rows that file lacks (`annotations_ours`; "
        "`annotations: published`). On the publisher's rows a conversation is two-turn exactly where the "
        "published file's is"
    )
    assert sentence in card
    assert f"| annotations_published | {published_rows} |" in card


def test_a_new_variant_left_at_published_annotations_is_told_to_set_ours(upstream, monkeypatch):
    """docs/configuration.md: a new variant copied from gemma3.yaml, whose annotations are published; the
    publisher released no file of its name, so generate stops naming the switch."""

    def add(data):
        data["models"]["mine"] = {**copy.deepcopy(data["models"]["gemma3"]), "release_name": "mine"}

    set_params(upstream, add)
    with pytest.raises(NoMatchError) as err:
        run_stage(monkeypatch, "generate", "mine")
    assert "`annotations: ours` (models.mine.annotations)" in str(err.value)
    assert "conf/model/mine.yaml" in str(err.value)
    set_params(upstream, lambda d: d["models"]["mine"].update(annotations="ours", compare=False))
    run_stage(monkeypatch, "generate", "mine")
    assert {r["annotated_by"] for r in _annotations(upstream, "mine").values()} == {"ours"}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (None, False),  # published without responses: single-turn by the publisher's file
        ([[{"role": "assistant", "content": "a"}]], False),
        (
            [
                [
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            ],
            True,
        ),
        (
            [
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            True,
        ),  # flat
    ],
)
def test_a_published_record_s_two_turn_flag(entry, expected):
    record = {"conversation_id": "c", **dict.fromkeys(FLAGS), MULTITURN: entry}
    row = flags.published_row(record, multiturn=True)
    assert (row["two_turn"], row["annotated_by"]) == (expected, "published")
    assert flags.published_row(record, multiturn=False)["two_turn"] is None  # the file has no such field


def test_the_second_turn_follows_the_published_ids_and_the_hash_elsewhere():
    ids = [f"c{i}" for i in range(200)]
    assert [c for c in ids if wanted(c, None, 0.297)] == [c for c in ids if selected(c, 0.297)]
    assert all(wanted(c, True, 0.0) for c in ids) and not any(wanted(c, False, 1.0) for c in ids)
    assert published.conversation(None) is None
