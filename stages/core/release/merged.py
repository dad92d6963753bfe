"""The merged file of merge@<variant>: each record of the variant's public release file (jsonl.gz), in
release order, with its Japanese instruction (translated_conversation, from the translated table) and
the LMSYS-Chat-1M columns of its conversation, as the published merge scripts put them side by side
(which rows, field names and order are our reading: docs/assumptions.md).

Memory does not grow with the rows, as in stages/core/rows/translation.py: DuckDB, under a memory limit and
spilling to a private scratch directory, joins the conversation_ids only (and returns the short
Japanese instructions in release order); the LMSYS columns move through an Arrow IPC spill by
release row range, and each range is put back in release order beside its release records, which
are read a block of lines at a time. `rows` (a range) sets the peak memory."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from stages.core.config.errors import SourceError
from stages.core.rows import fields
from stages.core.rows.records import public_schema
from stages.core.storage.atomic import private_tempdir
from stages.core.storage.jsonl import jsonl_gz_table_writer
from stages.core.storage.parquet import PARQUET_OPTIONS
from stages.core.storage.spill import DUCKDB, Spill, in_order, read_batches, rechunk

ID = "conversation_id"
EN, MULTITURN = fields.RESPONSES_EN, fields.MULTITURN
# LMSYS-Chat-1M's columns, in its own order, after translated_conversation (the order: an inference)
LMSYS = ["model", "conversation", "turn", "language", "openai_moderation", "redacted"]
RANGE_ROWS = 4096  # release rows joined and written at a time (one spill part): the stage's memory
BLOCK = 4 << 20  # bytes of release JSON lines parsed at a time (pyarrow holds ~50x): one record must fit
# the first LMSYS-Chat-1M row of each released conversation (files in sorted order, then rows: the row
# fetch keeps of a repeated conversation_id); conversation_ids only, so the sort stays narrow
PICKED = f"""CREATE TEMP TABLE picked AS
    SELECT r.file_row_number AS release_row, s.filename AS file, s.file_row_number AS file_row
    FROM read_parquet($ids, file_row_number = true) r
    JOIN read_parquet($lmsys, filename = true, file_row_number = true) s USING ({ID})
    QUALIFY row_number() OVER (PARTITION BY r.file_row_number ORDER BY s.filename, s.file_row_number) = 1"""
PLACES = (
    "SELECT file_row, release_row FROM picked WHERE file = $file ORDER BY file_row"  # one file's rows to take
)
UNTRANSLATED = f"""SELECT r.{ID} FROM read_parquet($ids, file_row_number = true) r
    LEFT JOIN read_parquet($translated) t USING ({ID})
    WHERE t.instruction_ja IS NULL ORDER BY r.file_row_number"""
TRANSLATED = f"""SELECT [{{'role': 'user', 'content': t.instruction_ja}}] AS {fields.INSTRUCTION}
    FROM read_parquet($ids, file_row_number = true) r JOIN read_parquet($translated) t USING ({ID})
    ORDER BY r.file_row_number"""


def _first_record(path: Path) -> dict | None:
    with gzip.open(path, "rt", encoding="utf-8") as text:
        line = text.readline()
    return json.loads(line) if line.strip() else None


def release_schema(path: Path) -> pa.Schema:
    """The public schema of a release file, from the fields of its first record."""
    first = _first_record(path) or {}
    return public_schema(EN in first, MULTITURN in first)


def read_release(path: Path, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The records of a release file, a block of lines at a time; a field the schema lacks is an error."""
    if _first_record(path) is None:
        return  # an empty release: pyarrow reads no empty stream
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
    try:
        yield from pj.open_json(path, pj.ReadOptions(block_size=BLOCK), options)
    except pa.ArrowInvalid as err:
        raise SourceError(f"{path}: not a release file of this project ({err}): re-run package") from err


def lmsys_files(root: str | Path, include: list[str]) -> list[str]:
    """The fetched LMSYS-Chat-1M Parquet files under `root` (fetch.source.include), in sorted order."""
    found = sorted({str(p) for pattern in include for p in Path(root).glob(pattern) if p.is_file()})
    if not found:
        raise SourceError(
            f"no file under {root} matches fetch.source.include {include}: run `dvc repro fetch`"
        )
    return found


def _write_ids(release: Path, schema: pa.Schema, out: Path) -> int:
    """The release's conversation_ids, in release order, as a Parquet file; return how many."""
    rows = 0
    with pq.ParquetWriter(out, pa.schema([schema.field(ID)]), **PARQUET_OPTIONS) as writer:
        for batch in read_release(release, schema):
            writer.write_batch(batch.select([ID]))
            rows += batch.num_rows
    return rows


def _check_translated(db: duckdb.DuckDBPyConnection, files: dict[str, str | list[str]]) -> None:
    """Every released conversation must have its Japanese instruction in the translated table."""
    lacking = db.sql(UNTRANSLATED, params={k: files[k] for k in ("ids", "translated")}).fetchall()
    if lacking:
        raise SourceError(
            f"{files['translated']} has no Japanese instruction for {len(lacking)} conversations of the "
            f"release, e.g. {[cid for (cid,) in lacking[:3]]}: it is not this release's source; "
            "run `dvc repro` for the variant's translate and package stages"
        )


def _spill_lmsys(
    db: duckdb.DuckDBPyConnection, lmsys: list[str], scratch: Path, rows: int, parts: int
) -> Spill:
    """The LMSYS columns of the picked rows, each with its release row, spilled by row range."""
    found = pq.read_schema(lmsys[0])
    schema = pa.schema([("row", pa.int64()), *(found.field(c) for c in LMSYS)])
    spill = Spill(scratch / "by-row", schema, parts)
    for path in lmsys:
        at, row = db.sql(PLACES, params={"file": path}).to_arrow_table().columns
        at, row, start = at.to_numpy(), row.to_numpy(), 0
        for batch in read_batches(path, LMSYS, rows):
            lo, hi = np.searchsorted(at, [start, start + batch.num_rows])
            if hi > lo:
                table = pa.Table.from_batches([batch]).take(pa.array(at[lo:hi] - start))
                table = table.add_column(0, "row", pa.array(row[lo:hi])).cast(schema)
                spill.write(table, row[lo:hi] // rows)
            start += batch.num_rows
    return spill


def _side_by_side(*tables: pa.Table) -> pa.Table:
    """The columns of `tables` (of as many rows), in order, as one table."""
    return pa.Table.from_arrays(
        [c for t in tables for c in t.columns], [n for t in tables for n in t.column_names]
    )


def write_merged(release: Path, translated: str, lmsys: list[str], out: Path, rows: int = RANGE_ROWS) -> dict:
    """Write `out` (gzip JSON lines, deterministic bytes): each release record with
    translated_conversation and the LMSYS columns (null where LMSYS-Chat-1M lacks the conversation).
    Return the counts: rows, rows_without_lmsys."""
    schema = release_schema(release)
    with private_tempdir(out.parent, out.name) as scratch:
        files = {"ids": str(scratch / "ids.parquet"), "translated": str(translated), "lmsys": lmsys}
        total = _write_ids(release, schema, Path(files["ids"]))
        config = {**DUCKDB, "temp_directory": str(scratch / "duckdb")}
        with duckdb.connect(config=config) as db, jsonl_gz_table_writer(out) as write:
            _check_translated(db, files)
            db.execute(PICKED, {k: files[k] for k in ("ids", "lmsys")})
            [(found,)] = db.sql("SELECT count(*) FROM picked").fetchall()
            spill = _spill_lmsys(db, lmsys, scratch, rows, -(-total // rows))
            instructions = db.sql(TRANSLATED, params={k: files[k] for k in ("ids", "translated")})
            ranges = zip(
                rechunk(read_release(release, schema), rows),
                rechunk(instructions.to_arrow_reader(rows), rows),
                spill.parts(),
                strict=True,
            )
            for index, (public, instruction, placed) in enumerate(ranges):
                write(
                    _side_by_side(
                        public,
                        instruction,
                        in_order(placed, index * rows, public.num_rows)[0].drop_columns(["row"]),
                    )
                )
    return {"rows": total, "rows_without_lmsys": total - found}
