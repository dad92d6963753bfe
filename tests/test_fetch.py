"""fetch: copy with checksums, filter rules with per-rule counts, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.source import ChecksumError
from tests.conftest import run_stage


def _set(path: Path, mutate) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    mutate(data)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def test_fetch_filters_the_sample(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    metrics = json.loads((workspace / "data/metrics/fetch.json").read_text())
    rows = metrics["rows"]
    assert rows["rows_in"] == 336
    assert rows["rows_in"] - rows["rows_out"] == sum(v for k, v in rows.items() if k.startswith("dropped_"))
    assert rows["dropped_language"] == 12 and rows["dropped_moderation"] == 12
    table = pq.read_table(workspace / "data/interim/first-turn.parquet").to_pandas()
    assert len(table) == rows["rows_out"] == 312
    assert set(table.language) == {"English", "Japanese"}
    assert not table.flagged.any()
    assert table.redacted.sum() == 12  # redacted conversations are kept (redacted: keep)
    assert (table.instruction == "").sum() == rows["empty_first_turn"] == 4  # kept, not silently dropped
    assert [f["path"] for f in metrics["source"]] == sorted(f["path"] for f in metrics["source"])
    assert all(len(f["sha256"]) == 64 for f in metrics["source"] + metrics["released"])


def test_moderation_keep_and_redacted_drop(workspace, monkeypatch):
    def mutate(d):
        d["fetch"]["filter"].update(moderation="keep", redacted="drop")

    _set(workspace / "params.yaml", mutate)
    run_stage(monkeypatch, "fetch")
    rows = json.loads((workspace / "data/metrics/fetch.json").read_text())["rows"]
    assert rows["dropped_moderation"] == 0 and rows["dropped_redacted"] == 12
    table = pq.read_table(workspace / "data/interim/first-turn.parquet").to_pandas()
    assert table.flagged.sum() == 12 and not table.redacted.any()


def test_checksum_mismatch_names_file_and_hashes(workspace, monkeypatch):
    name = next((workspace / "data/sample/lmsys-chat-1m/data").glob("train-00001*")).name
    _set(
        workspace / "params.yaml", lambda d: d["fetch"]["source"]["sha256"].update({f"data/{name}": "0" * 64})
    )
    with pytest.raises(ChecksumError, match=rf"data/{name}: sha256 [0-9a-f]{{64}} but params pin 0{{64}}"):
        run_stage(monkeypatch, "fetch")
    assert not (workspace / "data/raw/lmsys-chat-1m/data" / name).exists()
    assert not (workspace / "data/interim/first-turn.parquet").exists()


def test_shard_with_missing_column_is_named(workspace, monkeypatch):
    shard = next((workspace / "data/sample/lmsys-chat-1m/data").glob("train-00001*"))
    pq.write_table(pq.read_table(shard).drop_columns(["openai_moderation"]), shard)
    with pytest.raises(
        ValueError, match=rf"{shard.name}: missing LMSYS-Chat-1M columns \['openai_moderation'\]"
    ):
        run_stage(monkeypatch, "fetch")
    assert not (workspace / "data/interim/first-turn.parquet").exists()


def test_no_matching_source_file(workspace, monkeypatch):
    _set(workspace / "params.yaml", lambda d: d["fetch"]["source"].update(include=["data/nothing-*.parquet"]))
    with pytest.raises(FileNotFoundError, match=r"no file under data/sample/lmsys-chat-1m matches"):
        run_stage(monkeypatch, "fetch")
