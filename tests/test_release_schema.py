"""The release's jsonl.gz and Parquet carry one schema: `datasets` and pandas read the same columns
(and, where the format allows, types) from both, all-null columns included. Public records, their
Arrow types and the release counts are built from Arrow batches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasets.info import DatasetInfosDict

from stages.core.config.errors import SourceError
from stages.core.config.params import load_params
from stages.core.release.files import public_file
from stages.core.rows import records as release
from stages.core.rows.responses import SCORED
from tests.conftest import run_stage

STEM = "gemma2-lmsys-chat-1m-synth-ja+en"
MULTITURN = "synthesized_multiturn_conversation"
LIST_COLUMNS = [
    "synthesized_assistant_responses",
    "synthesized_response_scoring_annotations",
    "synthesized_assistant_responses_en",
    MULTITURN,
]


@pytest.fixture
def gemma2(workspace, monkeypatch, fake_engine):
    """gemma2's release (English responses and a second turn) on the sample; its directory."""
    for stage in ("fetch", "decrypt", "translate", "generate", "score", "package"):
        run_stage(monkeypatch, stage, *(["gemma2"] if stage in ("generate", "score", "package") else []))
    return workspace / "data/release/gemma2"


def _without_second_turn(workspace, monkeypatch) -> None:
    """Re-package gemma2 as if no second turn had come back: synthesized_multiturn_conversation all null."""
    path = workspace / "data/scored/gemma2.parquet"
    scored = pq.read_table(path)
    scored = scored.set_column(
        scored.schema.get_field_index("multiturn"),
        "multiturn",
        pa.nulls(scored.num_rows, SCORED.field("multiturn").type),
    )
    pq.write_table(scored, path)
    run_stage(monkeypatch, "package", "gemma2")


def _card_features(schema: pa.Schema) -> datasets.Features:
    """The features `load_dataset` takes from a dataset card holding release.features(schema)."""
    card = yaml.safe_load(yaml.safe_dump({"dataset_info": {"features": release.features(schema)}}))
    return DatasetInfosDict.from_dataset_card_data(card)["default"].features


@pytest.mark.parametrize("second_turn", ["answered", "all null"])
def test_datasets_loads_one_schema_and_the_same_rows_from_jsonl_gz_and_parquet(
    gemma2, workspace, monkeypatch, tmp_path, second_turn
):
    if second_turn == "all null":
        _without_second_turn(workspace, monkeypatch)
    schema = pq.read_schema(gemma2 / f"{STEM}.parquet").remove_metadata()
    assert schema == release.public_schema(with_en=True, with_second_turn=True)
    features = _card_features(schema)
    assert features == datasets.Features.from_arrow_schema(schema)
    cache = str(tmp_path / "hf-cache")
    from_json = datasets.load_dataset(
        "json", data_files=str(gemma2 / f"{STEM}.jsonl.gz"), features=features, cache_dir=cache
    )["train"]
    from_parquet = datasets.load_dataset(
        "parquet", data_files=str(gemma2 / f"{STEM}.parquet"), cache_dir=cache
    )["train"]
    assert from_json.features == from_parquet.features == features
    assert isinstance(from_json.features[MULTITURN], datasets.List)  # not Value("null"), even all null
    assert from_json.to_list() == from_parquet.to_list()
    multiturn = from_parquet[MULTITURN]
    assert all(m is None for m in multiturn) == (second_turn == "all null")


def test_the_release_stores_one_conversation_per_instruction_single_turn_or_two_turn(gemma2):
    """As published: a list holding one conversation from the best response, two-turn for some
    instructions and single-turn for the rest; the Japanese instruction is in neither."""
    records = pq.read_table(gemma2 / f"{STEM}.parquet").to_pylist()
    shapes = Counter()
    for record in records:
        if record[MULTITURN] is None:
            assert record["synthesized_assistant_responses"] is None  # no best response
            continue
        (conversation,) = record[MULTITURN]
        roles = tuple(turn["role"] for turn in conversation)
        assert roles in {("assistant",), ("assistant", "user", "assistant")}
        assert conversation[0] in record["synthesized_assistant_responses"]
        shapes[roles] += 1
    two, one = shapes[("assistant", "user", "assistant")], shapes[("assistant",)]
    assert two / (one + two) == pytest.approx(0.297, abs=0.04)  # the published share: 134,014 / 451,450
    metrics = json.loads((gemma2 / "manifest.json").read_text())["metrics"]
    assert (metrics["multiturn_conversations"], metrics["single_turn_conversations"]) == (two, one)


def test_pandas_reads_the_same_columns_and_values_from_jsonl_gz_and_parquet(gemma2, workspace, monkeypatch):
    """JSON has no types: pandas reads a column that is null in every row as float64 NaN, where the
    Parquet file says what it is (object, None). Everything else has the same dtype and values; an
    explicit dtype=object gives the Parquet reading for the all-null column too."""
    _without_second_turn(workspace, monkeypatch)
    from_json = pd.read_json(gemma2 / f"{STEM}.jsonl.gz", lines=True)
    from_parquet = pd.read_parquet(gemma2 / f"{STEM}.parquet")
    assert list(from_json.columns) == list(from_parquet.columns) == release.public_schema(True, True).names
    all_null = [c for c in from_parquet.columns if from_parquet[c].isna().all()]
    assert MULTITURN in all_null
    assert (from_json[all_null].dtypes == "float64").all() and from_json[all_null].isna().all().all()
    typed = [c for c in from_parquet.columns if c not in all_null]
    assert from_json[typed].dtypes.to_dict() == from_parquet[typed].dtypes.to_dict()
    for column in typed:
        parquet = from_parquet[column].map(lambda v: v.tolist() if hasattr(v, "tolist") else v)
        assert from_json[column].tolist() == parquet.tolist(), column
    explicit = pd.read_json(gemma2 / f"{STEM}.jsonl.gz", lines=True, dtype={c: object for c in all_null})
    assert explicit[all_null].dtypes.to_dict() == from_parquet[all_null].dtypes.to_dict()
    assert explicit[MULTITURN].tolist() == from_parquet[MULTITURN].tolist() == [None] * len(from_parquet)


def test_features_name_the_field_whose_type_a_dataset_card_cannot_hold():
    with pytest.raises(ValueError, match=r"release field turns\.when: no dataset card type .*timestamp"):
        release.features(pa.schema([("turns", pa.list_(pa.struct([("when", pa.timestamp("s"))])))]))


RESPONSES = pa.list_(pa.struct([("content", pa.string()), ("finish_reason", pa.string())]))


def _rows(failed: list[bool]) -> pa.Table:
    """Rows as package reads them, `failed` marking translation failures."""
    n = len(failed)
    a, u = {"role": "assistant", "content": "r"}, {"role": "user", "content": "more"}
    responses = [[{"content": f"r{i}.{k}", "finish_reason": "stop"} for k in range(i % 3)] for i in range(n)]
    notes = [[{"response_token_length": k, "judgement": "j", "repetition_flag": False,
               "preference_score": [-1.0, 7.0][k % 2]} for k in range(i % 3)] for i in range(n)]  # fmt: skip
    return pa.table(
        {
            "conversation_id": [f"c{i}" for i in range(n)],
            "instruction_ja": [f"指示{i}" for i in range(n)],
            "duplicate_user_instruction_ja": [None, "c0", None, None, None, None][:n],
            "empty_user_instruction_ja": [False, False, True, False, False, False][:n],
            "is_template_instruction": [None, None, None, "essay", None, None][:n],
            "translation_failed": failed,
            "responses_ja": pa.array([r if i % 4 != 2 else None for i, r in enumerate(responses)], RESPONSES),
            "responses_en": pa.array([r[:1] or None for r in responses], RESPONSES),
            "status_ja": ["ok", "ok", "failed", "ok", "skipped_too_long", "ok"][:n],
            "status_en": ["ok", None, "skipped_too_long", "ok", "partial", "ok"][:n],
            "annotations": pa.array(notes, SCORED.field("annotations").type),
            "judge_status": pa.array([["ok", "failed"][: i % 3] for i in range(n)], pa.list_(pa.string())),
            "multiturn": pa.array(
                [None, None, None, [[a]], [[a, u, a]], None][:n], SCORED.field("multiturn").type
            ),
            "multiturn_status": [None, "follow_up_failed", None, None, None, None][:n],
        }
    )


def test_public_table_of_sliced_and_chunked_batches_holds_the_published_records():
    whole = _rows([False] * 6)
    part = pa.concat_tables([whole.slice(1, 2), whole.slice(3, 3)])  # offsets into shared buffers
    records = release.public_table(part, with_en=True, with_second_turn=False).to_pylist()
    expected = [
        {
            "conversation_id": row["conversation_id"],
            "duplicate_user_instruction_ja": row["duplicate_user_instruction_ja"],
            "empty_user_instruction_ja": row["empty_user_instruction_ja"],
            "is_template_instruction": row["is_template_instruction"],
            "synthesized_assistant_responses": None
            if row["responses_ja"] is None
            else [{"role": "assistant", "content": r["content"]} for r in row["responses_ja"]],
            "synthesized_response_scoring_annotations": row["annotations"],
            "synthesized_assistant_responses_en": None
            if row["responses_en"] is None
            else [{"role": "assistant", "content": r["content"]} for r in row["responses_en"]],
        }
        for row in part.to_pylist()
    ]
    assert records == expected
    assert records[1]["synthesized_assistant_responses"] is None  # c2: null stays null, not []
    assert release.instruction_table(part).to_pylist() == [
        {"conversation_id": f"c{i}", "translated_conversation": [{"role": "user", "content": f"指示{i}"}]}
        for i in range(1, 6)
    ]


def test_release_counts_from_an_arrow_batch():
    totals = Counter()
    rows, failed = release.released(_rows([False, False, False, False, False, True]))
    assert (rows.num_rows, failed) == (5, 1)
    release.add_metrics(totals, rows, failed)
    assert release.release_metrics(totals) == {
        "instructions": 5,
        "translation_failed": 1,
        "instructions_with_responses": 4,  # c2's responses are null
        "responses_ja": 0 + 1 + 0 + 1,  # c0, c1, c3, c4
        "responses_en": 3,
        "multiturn_conversations": 1,  # c4: [[assistant, user, assistant]]
        "single_turn_conversations": 1,  # c3: [[assistant]]
        "judgements": 0 + 1 + 2 + 0 + 1,
        "judgements_failed": 1 + 1 + 0 + 1,
        "template_instructions": 1,
        "empty_instructions": 1,
        "duplicate_instructions": 1,
        "generate_skipped_too_long": 2,
        "generate_failed_requests": 1,
        "generate_partial_requests": 1,  # c4's English request: fewer than n came back
        "generate_refused_requests": 0,
        "judge_skipped_too_long": 0,
        "judge_failed_requests": 1,
        "judge_partial_requests": 0,
        "judge_refused_requests": 0,
        "judge_mode_ignored": 0,
        "judge_parsed_from_text": 0,
        "judge_truncated": 0,
        "second_turn_skipped_too_long": 0,
        "second_turn_failed_requests": 1,
        "second_turn_partial_requests": 0,
        "second_turn_refused_requests": 0,
        "generate_skipped_redacted": 0,
        "judgements_scored": 1,
        "mean_preference_score": 7.0,
    }


def test_release_metrics_hold_no_null_that_dvc_cannot_diff():
    totals = Counter(judgements=3, judgements_failed=3)  # no judgement parsed
    metrics = release.release_metrics(totals)
    assert metrics["judgements_scored"] == 0 and "mean_preference_score" not in metrics
    assert None not in metrics.values()


def test_readers_take_the_parquet_file_first_and_name_every_file_they_looked_for(workspace):
    """compare and sft read the public Parquet file, else the jsonl.gz one; merge reads only the
    jsonl.gz; a missing file is an error naming the directory, each file looked for and what to do."""
    params = load_params()
    stem = params.release_stem("gemma3")
    directory = Path(params.paths.release_of("gemma3"))
    with pytest.raises(SourceError) as err:
        public_file(params, "gemma3", hint="run package@gemma3")
    assert str(err.value) == (
        f"{directory} holds neither {stem}.parquet nor {stem}.jsonl.gz: run package@gemma3"
    )
    directory.mkdir(parents=True)
    (directory / f"{stem}.jsonl.gz").write_bytes(b"")
    assert public_file(params, "gemma3") == directory / f"{stem}.jsonl.gz"
    (directory / f"{stem}.parquet").write_bytes(b"")
    assert public_file(params, "gemma3") == directory / f"{stem}.parquet"
    other = workspace / "elsewhere"
    with pytest.raises(SourceError) as err:
        public_file(params, "gemma3", other, formats=("jsonl.gz",), hint="pass it")
    assert str(err.value) == f"{other / stem}.jsonl.gz does not exist: pass it"
