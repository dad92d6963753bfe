"""The published release files (tokyotech-llm/lmsys-chat-1m-synth): a variant's public file fetched
once per source and revision into paths.published (sha256 checked against params' pins), read a
batch at a time, and its responses joined onto the translated rows (generate, source: published).

The join keeps memory bounded as stages/core/join.py does: DuckDB joins the conversation_ids only,
the responses move through an Arrow IPC spill by row range, and each range is put back in
translated order; `rows` (a range) sets the peak memory, not the size of the file."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from stages.core.errors import SourceError
from stages.core.io import ENGINE_METADATA, PARQUET_OPTIONS, atomic_path, sha256_file, write_json
from stages.core.join import DUCKDB, Spill, read_batches, rechunk
from stages.core.params import COMMIT, PublishedParams
from stages.core.responses import ANNOTATION, GENERATED, MESSAGE, RESPONSES
from stages.core.source import fetch_files

LOG = logging.getLogger(__name__)
ID = "conversation_id"
JA, EN = "synthesized_assistant_responses", "synthesized_assistant_responses_en"
NOTES = "synthesized_response_scoring_annotations"
# the fields read from a public record; any other field is ignored, a missing one is null
RECORD = pa.schema(
    [
        (ID, pa.string()),
        ("duplicate_user_instruction_ja", pa.string()),
        ("empty_user_instruction_ja", pa.bool_()),
        ("is_template_instruction", pa.string()),
        (JA, pa.list_(MESSAGE)),
        (NOTES, pa.list_(ANNOTATION)),
        (EN, pa.list_(MESSAGE)),
    ]
)
BLOCK = 32 << 20  # bytes of JSON lines parsed at a time; one record must fit in a block
PUBLISHED, NOT_PUBLISHED = "published", "not_published"  # generate's status of a row
TAKEN = pa.schema([(ID, pa.string()), ("responses_ja", RESPONSES), ("responses_en", RESPONSES)])
PLACED = pa.schema([("row", pa.int64()), ("responses_ja", RESPONSES), ("responses_en", RESPONSES)])


def _fetched_before(spec: PublishedParams, path: str, local: Path, note: Path) -> dict | None:
    """The record of a copy fetched before, if params fix the file's bytes (a commit revision or a
    sha256 pin) and the copy still hashes as the record (and the pin) says; else None."""
    if not (path in spec.sha256 or re.fullmatch(COMMIT, spec.revision or "")):
        return None  # a branch or a local path may have changed: fetch it again
    if not (local.is_file() and note.is_file()):
        return None
    record = json.loads(note.read_text(encoding="utf-8"))
    wanted = spec.sha256.get(path, record["sha256"])
    same = (record["uri"], record["revision"], record["sha256"]) == (spec.uri, spec.revision, wanted)
    return record if same and sha256_file(local) == wanted else None


def fetch(spec: PublishedParams, release_name: str, cache: str | Path) -> tuple[Path, dict]:
    """The local copy of a variant's published file and its record (uri, revision, path, size,
    sha256): the copy in `cache` when it was fetched before (see _fetched_before), else fetched
    (a sha256 that differs from the pin stops it: ChecksumError)."""
    path = spec.path(release_name)
    where = Path(cache) / hashlib.sha256(f"{spec.uri}@{spec.revision}".encode()).hexdigest()[:16]
    local, note = where / path, where / f"{path}.fetched.json"
    if (record := _fetched_before(spec, path, local, note)) is not None:
        LOG.info("using the copy of %s/%s fetched before (sha256 %s)", spec.uri, path, record["sha256"])
        return local, record
    [entry] = fetch_files(spec.source(release_name), where)
    record = {"uri": spec.uri, "revision": spec.revision, **entry}
    write_json(record, note)
    if path not in spec.sha256:
        LOG.warning("%s/%s is not pinned: published.sha256 {%s: %s}", spec.uri, path, path, entry["sha256"])
    return local, record


def producer(record: dict) -> dict:
    """The generate role's identity when the responses are the published file's (package's manifest
    names it as it names a model): the file, its revision and sha256."""
    return {
        "backend": "published",
        "llm": {"model": f"{record['uri']}/{record['path']}", "revision": record["revision"], "dtype": None},
        "libraries": {},
        "sha256": record["sha256"],
    }


def read_records(
    path: str | Path, columns: list[str], schema: pa.Schema = RECORD
) -> Iterator[pa.RecordBatch]:
    """`columns` of a published jsonl.gz file, a block of lines at a time (`schema`'s types)."""
    options = pj.ParseOptions(
        explicit_schema=pa.schema([schema.field(c) for c in columns]), unexpected_field_behavior="ignore"
    )
    try:
        for batch in pj.open_json(path, pj.ReadOptions(block_size=BLOCK), options):
            if ID in columns and batch.column(ID).null_count:
                raise SourceError(f"{path}: a record has no {ID}")
            yield batch
    except pa.ArrowInvalid as err:
        raise SourceError(f"{path}: not the published JSON lines: {err}") from err


def responses(cid: str, messages: list[dict] | None, notes: list[dict] | None, scored: bool) -> list | None:
    """Published responses as generate's RESPONSE rows: the token count from the annotations
    (required, aligned, when `scored`); the finish reason and prompt tokens are not published."""
    if messages is None:
        return None
    if scored and (notes is None or len(notes) != len(messages)):
        got = "no" if notes is None else len(notes)
        raise SourceError(f"{cid}: {len(messages)} published responses but {got} annotations")
    tokens = [n["response_token_length"] for n in notes] if scored else [None] * len(messages)
    return [
        {"content": m["content"], "finish_reason": None, "prompt_tokens": None, "completion_tokens": t}
        for m, t in zip(messages, tokens, strict=True)
    ]


def _taken(batch: pa.RecordBatch, with_en: bool) -> pa.Table:
    rows = batch.to_pylist()
    return pa.Table.from_pylist(
        [
            {
                ID: r[ID],
                "responses_ja": responses(r[ID], r[JA], r[NOTES], scored=True),
                "responses_en": responses(r[ID], r[EN], None, scored=False) if with_en else None,
            }
            for r in rows
        ],
        schema=TAKEN,
    )


def _repeated(db: duckdb.DuckDBPyConnection, table: Path) -> list[str]:
    query = f"SELECT {ID} FROM read_parquet($t) GROUP BY {ID} HAVING count(*) > 1 ORDER BY {ID} LIMIT 5"
    return [cid for (cid,) in db.sql(query, params={"t": str(table)}).fetchall()]


def _places(db: duckdb.DuckDBPyConnection, taken: Path, translated: Path, rows: int) -> pa.RecordBatchReader:
    """Each published row's row in translated order (null: not a translated row), in published order."""
    query = f"""SELECT t.file_row_number AS row FROM read_parquet($taken, file_row_number = true) p
        LEFT JOIN read_parquet($translated, file_row_number = true) t USING ({ID})
        ORDER BY p.file_row_number"""
    return db.sql(query, params={"taken": str(taken), "translated": str(translated)}).to_arrow_reader(rows)


def _spill(taken: Path, translated: Path, scratch: Path, rows: int, parts: int) -> Spill:
    """The published responses of translated rows, spilled by row range."""
    spill = Spill(scratch / "by-row", PLACED, parts)
    with duckdb.connect(config={**DUCKDB, "temp_directory": str(scratch / "duckdb")}) as db:
        if repeated := _repeated(db, taken):
            raise SourceError(f"the published file repeats conversation_ids, e.g. {repeated}")
        places = rechunk(_places(db, taken, translated, rows), rows)
        for part, place in zip(rechunk(read_batches(taken, None, rows), rows), places, strict=True):
            table = pa.table([place.column(0), part["responses_ja"], part["responses_en"]], schema=PLACED)
            table = table.filter(pc.is_valid(table["row"]))
            spill.write(table, table["row"].to_numpy() // rows)
    return spill


def _in_order(ids: pa.Array, placed: pa.Table, start: int, with_en: bool) -> pa.Table:
    """Generate's table of translated rows [start, start + len(ids)) from their published rows."""
    index = np.full(len(ids), -1, dtype=np.int64)
    index[placed["row"].to_numpy() - start] = np.arange(placed.num_rows)
    found = placed.take(pa.array(index, mask=index < 0))
    present, none = pa.array(index >= 0), pa.nulls(len(ids), pa.string())

    def status(column: pa.ChunkedArray) -> pa.ChunkedArray:
        return pc.if_else(present, pc.if_else(pc.is_valid(column), PUBLISHED, none), NOT_PUBLISHED)

    en = found["responses_en"] if with_en else pa.nulls(len(ids), RESPONSES)
    return pa.table(
        [ids, found["responses_ja"], en, status(found["responses_ja"]), status(en) if with_en else none],
        schema=GENERATED,
    )


def write_generated(
    translated: str | Path, published: Path, out: str | Path, with_en: bool, rows: int, producer: dict
) -> int:
    """Write generate's table for every translated row from the published file: its responses where
    the file has the row (status `published`, or null where it has no responses), null responses
    and status `not_published` where it lacks the row. `producer` is recorded as the generate role
    (package's manifest names it). Return the rows written."""
    translated, out = Path(translated), Path(out)
    total = pq.ParquetFile(translated).metadata.num_rows
    metadata = {f"{ENGINE_METADATA}generate".encode(): json.dumps(producer, sort_keys=True).encode()}
    schema = GENERATED.with_metadata(metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".published") as tmp:
        scratch = Path(tmp)
        with pq.ParquetWriter(scratch / "taken.parquet", TAKEN, **PARQUET_OPTIONS) as writer:
            for batch in read_records(published, [ID, JA, NOTES, EN]):
                writer.write_table(_taken(batch, with_en))
        spill = _spill(scratch / "taken.parquet", translated, scratch, rows, max(1, -(-total // rows)))
        ids = rechunk(read_batches(translated, [ID], rows), rows)
        with atomic_path(out) as tmp_out, pq.ParquetWriter(tmp_out, schema, **PARQUET_OPTIONS) as writer:
            for index, (part, placed) in enumerate(zip(ids, spill.parts(), strict=False)):
                writer.write_table(_in_order(part[ID].combine_chunks(), placed, index * rows, with_en))
    return total
