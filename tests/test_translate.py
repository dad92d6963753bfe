"""The streaming join of translate (stages/core/rows/translation.py) with batches of a few rows, so that the
batches, the spill parts and the row ranges really split: first-turn order, first occurrences
across batch boundaries, rows the release lacks."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.rows.annotate import compile_templates
from stages.core.rows.first_turn import SCHEMA
from stages.core.rows.translation import TranslationJoin, llm_rows

ROWS = 40
TEXTS = ["こんにちは", "光合成とは？", "", "  ", "\u3000", "猫の名前を考えて", "こんにちは！"]
LACKING = {
    3: ("こんにちは", "ok"),
    11: (None, "failed"),
    17: ("", "empty_source"),
    30: ("猫の名前を考えて", "ok"),
}
UNANSWERED = 25  # the release lacks it and the LLM has no answer: it is left out


def _first_turn(ids: list[str]) -> pa.Table:
    rows = [
        {
            "conversation_id": cid,
            "model": "m",
            "language": "Japanese",
            "turn": 1,
            "redacted": False,
            "flagged": False,
            "instruction": f"question {i}",
            "empty_first_turn": False,
            "instruction_chars": 10,
            "long_first_turn": False,
        }
        for i, cid in enumerate(ids)
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _expected_duplicates(ids: list[str], texts: list[str | None]) -> list[str | None]:
    """The published rule, row by row: the first earlier row with the identical non-empty text."""
    first: dict[str, str] = {}
    out: list[str | None] = []
    for cid, text in zip(ids, texts, strict=True):
        if text is None or not text.strip():
            out.append(None)
            continue
        out.append(first.get(text))
        first.setdefault(text, cid)
    return out


def _inputs(tmp_path) -> tuple[list[str], list[str | None]]:
    """A first-turn table of ROWS rows and a release in reverse order (so that a text's first
    occurrence in first-turn order comes last in the release), lacking the LACKING rows and
    UNANSWERED."""
    ids = [f"c{i:03d}" for i in range(ROWS)]
    texts = [TEXTS[(i * 5) % len(TEXTS)] for i in range(ROWS)]
    pq.write_table(_first_turn(ids), tmp_path / "first.parquet", row_group_size=7)
    released = [(ids[i], texts[i]) for i in reversed(range(ROWS)) if i not in LACKING and i != UNANSWERED]
    released += [("not-in-first-turn", "こんにちは"), (ids[11], None)]  # a null text: lacking too
    table = pa.table(
        {"conversation_id": [c for c, _ in released], "instruction_ja": [t for _, t in released]}
    )
    pq.write_table(table, tmp_path / "released.parquet", row_group_size=9)
    for i, (text, _) in LACKING.items():
        texts[i] = text
    return ids, texts


@pytest.mark.parametrize("batch_rows", [1, 3, 8, 64])
def test_streamed_duplicates_point_at_the_first_occurrence_across_batches(tmp_path, batch_rows):
    ids, texts = _inputs(tmp_path)
    out = tmp_path / "out" / "translated.parquet"
    with TranslationJoin(tmp_path / "first.parquet", tmp_path / "released.parquet", out, batch_rows) as join:
        missing = join.missing()
        assert missing["row"].to_pylist() == sorted([*LACKING, UNANSWERED])
        answers = {ids[i]: answer for i, answer in LACKING.items()}
        written = join.write(llm_rows(missing, answers), compile_templates([]))
    kept = [i for i in range(ROWS) if i != UNANSWERED]
    table = pq.read_table(out)
    assert written == table.num_rows == len(kept)
    assert pq.ParquetFile(out).metadata.num_row_groups == -(-ROWS // batch_rows)
    assert table["conversation_id"].to_pylist() == [ids[i] for i in kept]
    assert table["instruction_ja"].to_pylist() == [texts[i] for i in kept]
    assert table["duplicate_user_instruction_ja"].to_pylist() == _expected_duplicates(
        [ids[i] for i in kept], [texts[i] for i in kept]
    )
    dups = table["duplicate_user_instruction_ja"].to_pylist()
    assert dups[0] is None and dups[kept.index(35)] == "c000"  # こんにちは: the first row wins
    assert dups[kept.index(3)] == "c000"  # an LLM translation is a duplicate of a released one
    assert dups[kept.index(30)] == "c001"  # and the other way round
    assert dups[kept.index(11)] is None and dups[kept.index(2)] is None  # failed, empty: never
    assert table["empty_user_instruction_ja"].to_pylist() == [
        texts[i] is not None and not texts[i].strip() for i in kept
    ]
    assert table["translation_failed"].to_pylist() == [texts[i] is None for i in kept]
    sources = table["instruction_source"].to_pylist()
    assert sources == ["llm" if i in LACKING else "released" for i in kept]
    assert list(out.parent.iterdir()) == [out]  # the scratch directory is gone


def test_the_rows_a_translator_answered_name_it_as_their_source(tmp_path):
    ids, _ = _inputs(tmp_path)
    out = tmp_path / "translated.parquet"
    with TranslationJoin(tmp_path / "first.parquet", tmp_path / "released.parquet", out, 8) as join:
        missing = join.missing()
        answers = {ids[i]: answer for i, answer in LACKING.items()}
        join.write(llm_rows(missing, answers), compile_templates([]), source="deepl")
    table = pq.read_table(out)
    sources = dict(
        zip(table["conversation_id"].to_pylist(), table["instruction_source"].to_pylist(), strict=True)
    )
    assert {ids[i]: sources[ids[i]] for i in LACKING} == {ids[i]: "deepl" for i in LACKING}
    assert set(sources.values()) == {"deepl", "released"} and ids[UNANSWERED] not in sources


def test_repeated_first_turn_ids_are_named(tmp_path):
    pq.write_table(_first_turn(["a", "b", "a", "c", "b"]), tmp_path / "first.parquet")
    pq.write_table(
        pa.table({"conversation_id": ["a"], "instruction_ja": ["x"]}), tmp_path / "released.parquet"
    )
    with TranslationJoin(
        tmp_path / "first.parquet", tmp_path / "released.parquet", tmp_path / "o.parquet"
    ) as join:
        assert join.repeated_ids() == ["a", "b"]


@pytest.mark.parametrize("without_flagged", [True, False])
def test_the_release_decides_membership_and_the_filter_only_what_it_lacks(tmp_path, without_flagged):
    """A released row is written whatever its moderation flag (ja too), and is a first occurrence
    like any other; a flagged row the release lacks is ja's to leave out, ja+unsafe's to list."""
    first = _first_turn(["a", "b", "c", "d", "e"])
    first = first.set_column(5, "flagged", pa.array([True, False, False, True, False]))
    pq.write_table(first, tmp_path / "first.parquet")
    released = pa.table(
        {"conversation_id": ["a", "b", "c", "gone"], "instruction_ja": ["同じ", "同じ", "別", "x"]}
    )
    pq.write_table(released, tmp_path / "released.parquet")
    out = tmp_path / "translated.parquet"
    with TranslationJoin(
        tmp_path / "first.parquet", tmp_path / "released.parquet", out, without_flagged=without_flagged
    ) as join:
        assert join.release_counts() == {
            "release_rows": 4,
            "release_rows_without_first_turn": 1,  # "gone": fetch's filter dropped it
            "release_rows_moderation_flagged": 1,  # "a": written all the same
        }
        assert join.released_without_first_turn() == ["gone"]
        missing = join.missing()
        assert missing["conversation_id"].to_pylist() == (["e"] if without_flagged else ["d", "e"])
        assert join.write(llm_rows(missing, {}), compile_templates([])) == 3  # drop: only the released
    table = pq.read_table(out)
    assert table["conversation_id"].to_pylist() == ["a", "b", "c"]
    assert table["duplicate_user_instruction_ja"].to_pylist() == [None, "a", None]
    assert table["instruction_source"].to_pylist() == ["released"] * 3


def test_repeated_ids_of_a_table_or_a_parquet_file(tmp_path):
    """One query names the repeated conversation_ids for translate, the published file and compare."""
    import duckdb

    from stages.core.storage.spill import repeated_ids

    ids = pa.table({"conversation_id": ["d", "a", "b", "a", "c", "d", "b", "e"]})
    pq.write_table(ids, tmp_path / "ids.parquet")
    with duckdb.connect() as db:
        assert repeated_ids(db, "read_parquet($t)", {"t": str(tmp_path / "ids.parquet")}) == ["a", "b", "d"]
        db.register("side", ids)
        assert repeated_ids(db, "side", limit=2) == ["a", "b"]


def test_in_order_places_a_part_s_rows_and_refuses_a_row_placed_twice():
    from stages.core.storage.spill import in_order

    placed = pa.table({"row": [12, 10, 14], "text": ["c", "a", "e"]})
    table, present = in_order(placed, 10, 5)
    assert table["text"].to_pylist() == ["a", None, "c", None, "e"]
    assert present.tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match=r"a row of \[10, 15\) is placed more than once"):
        in_order(pa.table({"row": [11, 11], "text": ["x", "y"]}), 10, 5)
