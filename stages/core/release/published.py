"""The published release files (tokyotech-llm/lmsys-chat-1m-synth): a variant's public file fetched
once per source and revision into paths.published (sha256 checked against params' pins), read a
batch at a time, and joined onto the translated rows as generate's table (its responses: generate,
source published) or score's (its judgements and multi-turn conversations: score, source published,
rejudge false).

The join keeps memory bounded as stages/core/rows/translation.py does: DuckDB joins the conversation_ids only,
each record's row moves through an Arrow IPC spill by row range, and each range is put back in
translated order; `rows` (a range) sets the peak memory, not the size of the file."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from stages.core.config.errors import SourceError
from stages.core.config.release_params import PublishedParams
from stages.core.config.schema import COMMIT
from stages.core.rows import fields
from stages.core.rows.responses import ANNOTATION, GENERATED, MESSAGE, SCORED
from stages.core.rows.scores import best_index
from stages.core.storage.atomic import atomic_path
from stages.core.storage.jsonl import sha256_file, write_json
from stages.core.storage.parquet import ENGINE_METADATA, PARQUET_OPTIONS
from stages.core.storage.source import fetch_files
from stages.core.storage.spill import DUCKDB, Spill, in_order, read_batches, rechunk, repeated_ids

LOG = logging.getLogger(__name__)
ID = "conversation_id"
JA, EN = fields.RESPONSES, fields.RESPONSES_EN
NOTES = fields.NOTES
MULTITURN = fields.MULTITURN  # read in the file's shape (comparison.record_schema)
# the fields read from a public record; any other field is ignored, a missing one is null
RECORD = pa.schema(
    [
        (ID, pa.string()),
        (fields.DUPLICATE, pa.string()),
        (fields.EMPTY, pa.bool_()),
        (fields.TEMPLATE, pa.string()),
        (JA, pa.list_(MESSAGE)),
        (NOTES, pa.list_(ANNOTATION)),
        (EN, pa.list_(MESSAGE)),
    ]
)
BLOCK = 32 << 20  # bytes of JSON lines parsed at a time; one record must fit in a block
# a status taken from the file, and that of a translated row the file lacks (generate's, score's)
PUBLISHED, NOT_PUBLISHED = "published", "not_published"


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
    """A role's identity (generate, judge, second_turn) when its output is the published file's (package's
    manifest names it as it names a model): the file, its revision and sha256."""
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


@dataclass(frozen=True)
class Taking:
    """What a stage takes of the published file: `columns` of each record (typed as in `record`), made
    into a row of the stage's out (`out`, conversation_id first) by `take`. A translated row the file
    lacks gets nulls, and `lacking` (column -> status) in its status columns."""

    columns: list[str]
    out: pa.Schema
    take: Callable[[dict], dict]
    lacking: dict[str, str] = field(default_factory=dict)
    record: pa.Schema = RECORD


def _aligned(cid: str, messages: list[dict] | None, notes: list[dict] | None) -> None:
    """Raise unless published responses come with one annotation each."""
    if messages is not None and (notes is None or len(notes) != len(messages)):
        got = "no" if notes is None else len(notes)
        raise SourceError(f"{cid}: {len(messages)} published responses but {got} annotations")


def responses(cid: str, messages: list[dict] | None, notes: list[dict] | None, scored: bool) -> list | None:
    """Published responses as generate's RESPONSE rows: the token count from the annotations
    (required, aligned, when `scored`); the finish reason and prompt tokens are not published."""
    if messages is None:
        return None
    if scored:
        _aligned(cid, messages, notes)
    tokens = [n[fields.TOKENS] for n in notes] if scored else [None] * len(messages)
    return [
        {"content": m["content"], "finish_reason": None, "prompt_tokens": None, "completion_tokens": t}
        for m, t in zip(messages, tokens, strict=True)
    ]


def generated_row(record: dict, with_en: bool) -> dict:
    """Generate's row of a published record: its responses, status `published` (null: none)."""
    ja = responses(record[ID], record[JA], record[NOTES], scored=True)
    en = responses(record[ID], record[EN], None, scored=False) if with_en else None
    return {
        ID: record[ID],
        "responses_ja": ja,
        "responses_en": en,
        "status_ja": None if ja is None else PUBLISHED,
        "status_en": None if en is None else PUBLISHED,
    }


def conversation(value: list | None) -> list | None:
    """Score's multiturn from a published synthesized_multiturn_conversation: a list of one
    conversation [[assistant(, user, assistant)]] as it is, or the older flat [assistant, user,
    assistant] made one. None where the record has none."""
    if not value:
        return None
    return [value] if isinstance(value[0], dict) else value


def scored_row(record: dict, multiturn: bool) -> dict:
    """Score's row of a published record: the annotations as published, judge status `published`
    per response, where `multiturn` the record's conversation (`conversation`, status `published`),
    and the best response: the one that conversation starts from, as the publisher chose it (the
    card: the second turn continues the best response [V]), else scores.best_index (the judge's
    rule). Nulls where the record has no responses."""
    cid, messages, notes = record[ID], record[JA], record[NOTES]
    _aligned(cid, messages, notes)
    row = dict.fromkeys(SCORED.names) | {ID: cid}
    if messages is None:
        return row
    at = best_index([n[fields.SCORE] for n in notes])
    if multiturn and (stored := conversation(record.get(MULTITURN))) is not None:
        contents = [m["content"] for m in messages]
        if len(stored) != 1 or not stored[0] or stored[0][0]["content"] not in contents:
            raise SourceError(
                f"{cid}: the published {MULTITURN} is not one conversation starting from one of its responses"
            )
        at, row["multiturn"], row["multiturn_status"] = (
            contents.index(stored[0][0]["content"]),
            stored,
            PUBLISHED,
        )
    row.update(annotations=notes, best_index=at, judge_status=[PUBLISHED] * len(notes))
    return row


def _places(db: duckdb.DuckDBPyConnection, taken: Path, translated: Path, rows: int) -> pa.RecordBatchReader:
    """Each published row's row in translated order (null: not a translated row), in published order."""
    query = f"""SELECT t.file_row_number AS row FROM read_parquet($taken, file_row_number = true) p
        LEFT JOIN read_parquet($translated, file_row_number = true) t USING ({ID})
        ORDER BY p.file_row_number"""
    return db.sql(query, params={"taken": str(taken), "translated": str(translated)}).to_arrow_reader(rows)


def _spill(taken: Path, translated: Path, scratch: Path, rows: int, parts: int) -> Spill:
    """The taken rows of translated rows (their conversation_id replaced by their translated row),
    spilled by row range."""
    placed = pa.schema([("row", pa.int64()), *list(pq.read_schema(taken))[1:]])
    spill = Spill(scratch / "by-row", placed, parts)
    with duckdb.connect(config={**DUCKDB, "temp_directory": str(scratch / "duckdb")}) as db:
        if repeated := repeated_ids(db, "read_parquet($t)", {"t": str(taken)}):
            raise SourceError(f"the published file repeats conversation_ids, e.g. {repeated}")
        places = rechunk(_places(db, taken, translated, rows), rows)
        for part, place in zip(rechunk(read_batches(taken, None, rows), rows), places, strict=True):
            table = pa.table([place.column(0), *part.columns[1:]], schema=placed)
            table = table.filter(pc.is_valid(table["row"]))
            spill.write(table, table["row"].to_numpy() // rows)
    return spill


def _in_order(ids: pa.Array, placed: pa.Table, start: int, taking: Taking) -> pa.Table:
    """The out's rows of translated rows [start, start + len(ids)) from their taken rows."""
    found, present = in_order(placed, start, len(ids))
    present = pa.array(present)
    columns = [
        found[f.name]
        if f.name not in taking.lacking
        else pc.if_else(present, found[f.name], taking.lacking[f.name])
        for f in list(taking.out)[1:]
    ]
    return pa.table([ids, *columns], schema=taking.out)


def write_joined(
    translated: str | Path,
    published: Path,
    out: str | Path,
    taking: Taking,
    rows: int,
    roles: dict[str, dict],
) -> int:
    """Write `taking.out` for every translated row, in translated order, from the published file's
    records (`taking`); record each of `roles` (role -> producer) in its metadata, as package's manifest
    reads them. Return the rows written."""
    translated, out = Path(translated), Path(out)
    total = pq.ParquetFile(translated).metadata.num_rows
    metadata = {
        f"{ENGINE_METADATA}{role}".encode(): json.dumps(p, sort_keys=True).encode()
        for role, p in roles.items()
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".published") as tmp:
        scratch = Path(tmp)
        with pq.ParquetWriter(scratch / "taken.parquet", taking.out, **PARQUET_OPTIONS) as writer:
            for batch in read_records(published, taking.columns, taking.record):
                writer.write_table(
                    pa.Table.from_pylist(list(map(taking.take, batch.to_pylist())), taking.out)
                )
        spill = _spill(scratch / "taken.parquet", translated, scratch, rows, max(1, -(-total // rows)))
        ids = rechunk(read_batches(translated, [ID], rows), rows)
        schema = taking.out.with_metadata(metadata)
        with atomic_path(out) as tmp_out, pq.ParquetWriter(tmp_out, schema, **PARQUET_OPTIONS) as writer:
            for index, (part, placed) in enumerate(zip(ids, spill.parts(), strict=False)):
                writer.write_table(_in_order(part[ID].combine_chunks(), placed, index * rows, taking))
    return total


def write_generated(
    translated: str | Path, published: Path, out: str | Path, with_en: bool, rows: int, producer: dict
) -> int:
    """Write generate's table for every translated row from the published file: its responses where
    the file has the row (status `published`, or null where it has no responses), null responses
    and status `not_published` where it lacks the row. `producer` is recorded as the generate role
    (package's manifest names it). Return the rows written."""
    taking = Taking(
        [ID, JA, NOTES, EN],
        GENERATED,
        partial(generated_row, with_en=with_en),
        lacking={"status_ja": NOT_PUBLISHED, **({"status_en": NOT_PUBLISHED} if with_en else {})},
    )
    return write_joined(translated, published, out, taking, rows, {"generate": producer})


def write_scored(
    translated: str | Path,
    published: Path,
    out: str | Path,
    record: pa.Schema,
    multiturn: bool,
    rows: int,
    producer: dict,
) -> int:
    """Write score's table for every translated row from the published file (`record`: its fields'
    types, the multi-turn field's shape among them): each row as `scored_row` makes it and, where
    `multiturn`, the published conversations (status `not_published` where the file lacks the row);
    nulls where the file lacks the row or it has no responses. `producer` is recorded as the judge
    role (and second_turn where `multiturn`). Return the rows written."""
    columns = [ID, JA, NOTES, *([MULTITURN] if multiturn and MULTITURN in record.names else [])]
    taking = Taking(
        columns,
        SCORED,
        partial(scored_row, multiturn=multiturn),
        lacking={"multiturn_status": NOT_PUBLISHED} if multiturn else {},
        record=record,
    )
    roles = {"judge": producer, **({"second_turn": producer} if multiturn else {})}
    return write_joined(translated, published, out, taking, rows, roles)
