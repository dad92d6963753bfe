"""merge: the sample's Gemma-2 release with its Japanese instructions and LMSYS-Chat-1M's columns,
row by row, and the errors of a missing input."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.core.config.errors import SourceError
from stages.core.release import merged
from stages.core.storage.jsonl import read_jsonl_gz, write_jsonl_gz
from tests.conftest import run_stage
from tests.test_sft import STEM, built  # noqa: F401  (the sample run through package@gemma2)

OUT = "data/private/merged/gemma2.jsonl.gz"


@pytest.fixture(scope="module")
def merged_ws(built: Path) -> Path:  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(built)
        run_stage(mp, "merge", "gemma2")
    return built


def _lmsys(ws: Path) -> dict[str, dict]:
    """The first LMSYS-Chat-1M row of each conversation_id (fetch keeps the first of a repeated one)."""
    rows: dict[str, dict] = {}
    for path in sorted((ws / "data/raw/lmsys-chat-1m/data").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows.setdefault(row["conversation_id"], row)
    return rows


def test_one_merged_record_per_release_record_in_release_order(merged_ws):
    release = list(read_jsonl_gz(merged_ws / f"data/release/gemma2/{STEM}.jsonl.gz"))
    records = list(read_jsonl_gz(merged_ws / OUT))
    assert [r["conversation_id"] for r in records] == [r["conversation_id"] for r in release]
    translated = {
        r["conversation_id"]: r["instruction_ja"]
        for r in pq.read_table(merged_ws / "data/private/translated-ja.parquet").to_pylist()
    }
    lmsys = _lmsys(merged_ws)
    for record, public in zip(records, release, strict=True):
        cid = record["conversation_id"]
        assert list(record) == [*public, "translated_conversation", *merged.LMSYS]
        assert {k: record[k] for k in public} == public
        assert record["translated_conversation"] == [{"role": "user", "content": translated[cid]}]
        assert {k: record[k] for k in merged.LMSYS} == {k: lmsys[cid][k] for k in merged.LMSYS}
    assert any(r["redacted"] for r in records)  # the published converter's --exclude_pii reads it
    assert any(r["synthesized_multiturn_conversation"] for r in records)
    metrics = json.loads((merged_ws / "data/metrics/merge-gemma2.json").read_text())
    assert metrics == {"rows": len(release), "rows_without_lmsys": 0}


def test_the_merged_bytes_do_not_change(merged_ws, tmp_path):
    again = tmp_path / "again.jsonl.gz"
    lmsys = merged.lmsys_files(merged_ws / "data/raw/lmsys-chat-1m", ["data/train-*.parquet"])
    release = merged_ws / f"data/release/gemma2/{STEM}.jsonl.gz"
    merged.write_merged(release, str(merged_ws / "data/private/translated-ja.parquet"), lmsys, again, rows=7)
    assert again.read_bytes() == (merged_ws / OUT).read_bytes()  # whatever the batch size
    assert gzip.decompress(again.read_bytes())  # one standard gzip member


def test_a_conversation_lmsys_lacks_gets_null_columns_and_is_counted(merged_ws, tmp_path):
    lmsys = merged.lmsys_files(merged_ws / "data/raw/lmsys-chat-1m", ["data/train-00000-*.parquet"])
    release = merged_ws / f"data/release/gemma2/{STEM}.jsonl.gz"
    out = tmp_path / "one-shard.jsonl.gz"
    counts = merged.write_merged(release, str(merged_ws / "data/private/translated-ja.parquet"), lmsys, out)
    lacking = [r for r in read_jsonl_gz(out) if r["conversation"] is None]
    assert 0 < len(lacking) == counts["rows_without_lmsys"] < counts["rows"]
    assert all(r[c] is None for r in lacking for c in merged.LMSYS)


def test_a_release_row_without_its_instruction_names_the_translated_table(merged_ws, tmp_path):
    table = pq.read_table(merged_ws / "data/private/translated-ja.parquet")
    other = tmp_path / "translated.parquet"
    pq.write_table(table.slice(5), other)
    release = merged_ws / f"data/release/gemma2/{STEM}.jsonl.gz"
    lmsys = merged.lmsys_files(merged_ws / "data/raw/lmsys-chat-1m", ["data/train-*.parquet"])
    with pytest.raises(SourceError, match=str(other)):
        merged.write_merged(release, str(other), lmsys, tmp_path / "out.jsonl.gz")
    assert not (tmp_path / "out.jsonl.gz").exists()


@pytest.mark.parametrize(
    ("moved", "named"),
    [
        ("data/private/translated-ja.parquet", "translate@ja"),
        ("data/release/gemma2", "package@gemma2"),
        (f"data/release/gemma2/{STEM}.jsonl.gz", "package@gemma2"),
        ("data/raw/lmsys-chat-1m", "fetch"),
    ],
)
def test_a_missing_input_is_named(merged_ws, monkeypatch, moved, named):
    path = merged_ws / moved
    aside = merged_ws / f"{moved}.aside"
    shutil.move(path, aside)
    monkeypatch.chdir(merged_ws)
    try:
        with pytest.raises(SourceError, match=rf"{re.escape(moved)} does not exist: .*`dvc repro {named}`"):
            run_stage(monkeypatch, "merge", "gemma2")
    finally:
        shutil.move(aside, path)


def test_an_empty_release_gives_an_empty_merged_file(merged_ws, tmp_path):
    release, out = tmp_path / "empty.jsonl.gz", tmp_path / "out.jsonl.gz"
    write_jsonl_gz([], release)
    lmsys = merged.lmsys_files(merged_ws / "data/raw/lmsys-chat-1m", ["data/train-*.parquet"])
    translated = str(merged_ws / "data/private/translated-ja.parquet")
    assert merged.write_merged(release, translated, lmsys, out) == {"rows": 0, "rows_without_lmsys": 0}
    assert list(read_jsonl_gz(out)) == []
