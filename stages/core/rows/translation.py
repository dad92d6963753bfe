"""The join of translate in bounded memory: first-turn rows (LMSYS order) with their Japanese
instructions (the release's own order), in first-turn order, with the first earlier row of each
identical instruction. Neither table is ever loaded whole.

DuckDB, under a memory limit and spilling to a scratch directory, joins the conversation_ids only:
the unique-id check, the rows the release lacks, and each released row's place in first-turn
order. The Japanese text then moves through two spills of Arrow IPC files, one part at a time:

1. by a hash of the text, so that identical texts share a part, where sorting by (text, row)
   finds each text's first occurrence (texts are compared whole: no digest stands for them);
2. by row range: each range is put back in first-turn order and zipped with the first-turn rows.

Peak memory is set by `rows` (BATCH_ROWS: one part or range in memory), not by the number of
rows; the scratch directory (beside the output, removed at the end) holds up to about twice the
Japanese text at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core.config.errors import SourceError
from stages.core.rows import annotate
from stages.core.storage.spill import (
    BATCH_ROWS,
    DUCKDB,
    Spill,
    in_order,
    prefetched,
    read_batches,
    read_rows,
    rechunk,
    repeated_ids,
    write_parquet,
)

JOIN_THREADS = 2  # translate's joins of the ids: two threads halve their time, the memory stays flat
ID, TEXT = "conversation_id", "instruction_ja"
PLACES = pa.schema([("row", pa.int64())])
BY_TEXT = pa.schema([("row", pa.int64()), (ID, pa.string()), (TEXT, pa.string())])
BY_ROW = pa.schema([("row", pa.int64()), (TEXT, pa.string()), ("duplicate_of", pa.string())])
LLM_INPUT = pa.schema(  # the rows the release lacks, as translate_missing takes them (and their row)
    [("row", pa.int64()), (ID, pa.string()), ("instruction", pa.string()), ("empty_first_turn", pa.bool_())]
)
LLM_ROWS = pa.schema(
    [("row", pa.int64()), (ID, pa.string()), (TEXT, pa.string()), ("translation_status", pa.string())]
)


def _may_hold_nulls(path: str | Path, column: str) -> bool:
    """Whether the Parquet statistics leave room for a null in `column` (no statistics: yes)."""
    meta = pq.ParquetFile(path).metadata
    index = meta.schema.names.index(column)
    stats = [meta.row_group(i).column(index).statistics for i in range(meta.num_row_groups)]
    return any(s is None or not s.has_null_count or s.null_count > 0 for s in stats)


def llm_rows(missing: pa.Table, answers: dict[str, tuple[str | None, str]]) -> pa.Table:
    """The missing rows the translator LLM answered (`answers`: conversation_id -> (text or None,
    status)), in first-turn order; a missing row without an answer is dropped from the output."""
    ids, rows = missing[ID].to_pylist(), missing["row"].to_pylist()
    found = [(row, cid, *answers[cid]) for row, cid in zip(rows, ids, strict=True) if cid in answers]
    columns = list(zip(*found, strict=True)) if found else [()] * len(LLM_ROWS)
    return pa.table([pa.array(c, f.type) for c, f in zip(columns, LLM_ROWS, strict=True)], schema=LLM_ROWS)


class TranslationJoin:
    """One translate run's join: a scratch directory beside `out` (removed at the end) holding
    DuckDB's spill and the text's."""

    def __init__(
        self,
        first: str | Path,
        released: str | Path,
        out: str | Path,
        rows: int = BATCH_ROWS,
        without_flagged: bool = False,
    ):
        """`without_flagged` (subset ja): a moderation-flagged first turn the release lacks is not
        this subset's: never translated, never written; one the release holds is written (the
        release decides membership). The first-turn file is read as it is, not copied."""
        self.first, self.released, self.out, self.rows = Path(first), Path(released), Path(out), rows
        self.without_flagged = without_flagged
        self.rows_total = pq.ParquetFile(self.first).metadata.num_rows  # row positions run over all rows
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TranslationJoin:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(
            dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".join"
        )
        self.scratch = Path(self._stack.enter_context(scratch))
        config = {**DUCKDB, "threads": JOIN_THREADS, "temp_directory": str(self.scratch / "duckdb")}
        self.db = self._stack.enter_context(duckdb.connect(config=config))
        # a released row has a translation unless its text is null (the statistics say if one may be)
        self.has_text = f"r.{TEXT} IS NOT NULL" if _may_hold_nulls(self.released, TEXT) else "true"
        where = "WHERE NOT flagged" if self.without_flagged else ""
        (self.rows_in,) = self._sql(f"SELECT count(*) FROM read_parquet($first) {where}").fetchall()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """A DuckDB query, with $first: the first-turn Parquet file, and $released: the release's."""
        files = {"first": str(self.first), "released": str(self.released)}
        return self.db.sql(query, params={k: v for k, v in files.items() if f"${k}" in query})

    def repeated_ids(self) -> list[str]:
        """Up to 5 conversation_ids that the first-turn table holds more than once."""
        return repeated_ids(self.db, "read_parquet($first)", {"first": str(self.first)})

    def release_counts(self) -> dict[str, int]:
        """The released rows (with a translation) and how this subset's filter sees them:
        `release_rows`; `release_rows_without_first_turn`, those fetch's filter dropped (or LMSYS
        lacks): never written, they have no first turn; `release_rows_moderation_flagged`, those whose
        conversation the moderation flags (written: the release, not the flag, decides membership)."""
        query = f"""SELECT count(*), count(*) FILTER (WHERE f.{ID} IS NULL), count(*) FILTER (WHERE f.flagged)
            FROM read_parquet($released) r LEFT JOIN read_parquet($first) f USING ({ID})
            WHERE {self.has_text}"""
        names = ("release_rows", "release_rows_without_first_turn", "release_rows_moderation_flagged")
        return dict(zip(names, self._sql(query).fetchall()[0], strict=True))

    def released_without_first_turn(self, limit: int = 5) -> list[str]:
        """Up to `limit` released conversation_ids (with a translation) that have no first-turn row."""
        query = f"""SELECT {ID} FROM read_parquet($released) r ANTI JOIN read_parquet($first) USING ({ID})
            WHERE {self.has_text} ORDER BY {ID} LIMIT {int(limit)}"""
        return [cid for (cid,) in self._sql(query).fetchall()]

    def missing(self) -> pa.Table:
        """The first-turn rows of this subset (ja: not moderation-flagged) that the release has no
        translation for (join.LLM_INPUT), in first-turn order; only the row groups holding them are read."""
        where = "WHERE NOT f.flagged" if self.without_flagged else ""
        query = f"""SELECT f.file_row_number AS row FROM read_parquet($first, file_row_number = true) f
            ANTI JOIN (SELECT {ID} FROM read_parquet($released) r WHERE {self.has_text}) USING ({ID})
            {where} ORDER BY row"""
        rows = self._sql(query).fetchnumpy()["row"].astype(np.int64)
        table = read_rows(self.first, rows, LLM_INPUT.names[1:])
        return pa.Table.from_arrays([pa.array(rows), *table.columns], schema=LLM_INPUT)

    def _places(self) -> Path:
        """An Arrow IPC file of each released row's row in first-turn order (null: no such row or no
        translation), in release order. A released row is placed whatever its moderation flag: the
        release decides membership. DuckDB's work ends here: it is closed."""
        query = f"""SELECT CASE WHEN {self.has_text} THEN f.file_row_number END AS row
            FROM read_parquet($released, file_row_number = true) r
            LEFT JOIN read_parquet($first, file_row_number = true) f USING ({ID})
            ORDER BY r.file_row_number"""
        path = self.scratch / "places.arrow"
        with pa.ipc.new_stream(str(path), PLACES) as sink:
            for batch in self._sql(query).to_arrow_reader(self.rows):
                sink.write_batch(pa.record_batch(batch.columns, schema=PLACES))
        self.db.close()  # before the text is read: its memory is not held while that runs
        return path

    def _released_rows(self, places: Path) -> Iterator[pa.Table]:
        """The released translations with a first-turn row: (row, conversation_id, instruction_ja)."""
        texts = rechunk(read_batches(self.released, [ID, TEXT], self.rows), self.rows)
        with pa.OSFile(str(places)) as source:
            rows = rechunk(pa.ipc.open_stream(source), self.rows)
            for released, placed in prefetched(zip(texts, rows, strict=True)):
                table = pa.table([placed["row"], released[ID], released[TEXT]], schema=BY_TEXT)
                yield table.filter(pc.is_valid(table["row"]))

    def _spill_by_text(self, llm: pa.Table, parts: int) -> Spill:
        """Every translation (released and LLM) spilled by a hash of its text (DuckDB's hash)."""
        places, spill = self._places(), Spill(self.scratch / "by-text", BY_TEXT, parts)
        answered = llm.select(BY_TEXT.names).filter(pc.is_valid(llm[TEXT]))
        with duckdb.connect(config=DUCKDB) as hasher:
            for table in itertools.chain(self._released_rows(places), [answered]):
                hasher.register("texts", table.select([TEXT]))
                keys = hasher.sql(f"SELECT hash({TEXT}) % {parts} AS part FROM texts").fetchnumpy()["part"]
                hasher.unregister("texts")
                spill.write(table, keys.astype(np.int64))
        return spill

    def _spill_by_row(self, llm: pa.Table, parts: int) -> Spill:
        """Every translation with its duplicate-of (first occurrence), spilled by row range."""
        by_row = Spill(self.scratch / "by-row", BY_ROW, parts)
        for part in prefetched(self._spill_by_text(llm, parts).parts()):
            placed = pa.table([part["row"], part[TEXT], annotate.first_occurrences(part)], schema=BY_ROW)
            by_row.write(placed, part["row"].to_numpy() // self.rows)
        return by_row

    def write(
        self,
        llm: pa.Table,
        templates: list[annotate.Template],
        source: str = "llm",
        metadata: dict[bytes, bytes] | None = None,
    ) -> int:
        """Write the translated table to `out` in first-turn order with its flags, a row range at a
        time: every released row, and the rows the release lacks that the translator `source` (llm,
        deepl) answered (`llm`, LLM_ROWS; any other row the release lacks is left out). `metadata`:
        the out's schema metadata (the translator's identity). Return the rows written."""
        by_row = self._spill_by_row(llm, max(1, -(-self.rows_total // self.rows)))
        schema = output_schema(pq.read_schema(self.first)).with_metadata(metadata or {})
        first = rechunk(read_batches(self.first, None, self.rows), self.rows)
        pairs = prefetched(zip(first, by_row.parts(), strict=False))
        tables = (
            self._batch(rows, placed, index * self.rows, llm, templates, source)
            for index, (rows, placed) in enumerate(pairs)
        )
        return write_parquet(tables, schema, self.out)

    def _batch(
        self,
        first: pa.Table,
        placed: pa.Table,
        start: int,
        llm: pa.Table,
        templates: list[annotate.Template],
        source: str,
    ) -> pa.Table:
        """First-turn rows [start, start + n) with their translation, its source, the LLM's status
        and the flags; a row neither released nor answered by the translator (`llm`) is left out."""
        try:
            placed, _ = in_order(placed, start, first.num_rows)
        except ValueError:
            raise SourceError(
                f"{self.released} repeats conversation_ids: re-run decrypt, which rejects them"
            ) from None
        rows, answered_rows = np.arange(start, start + first.num_rows), llm["row"].to_numpy()
        answered = np.isin(rows, answered_rows)
        where = pa.array(np.searchsorted(answered_rows, rows), mask=~answered)
        table = (
            first.append_column(TEXT, placed[TEXT])
            .append_column("instruction_source", pc.if_else(pa.array(answered), source, "released"))
            .append_column("translation_status", llm["translation_status"].take(where))
        )
        keep = pa.array(answered | pc.is_valid(placed[TEXT]).to_numpy())
        return annotate.with_flags(table.filter(keep), placed["duplicate_of"].filter(keep), templates)


def output_schema(first: pa.Schema) -> pa.Schema:
    """The translated table: the first-turn columns, the translation and the flags."""
    extra = [(TEXT, pa.string()), ("instruction_source", pa.string()), ("translation_status", pa.string())]
    return pa.schema([*first.remove_metadata(), *extra, *annotate.FLAGS])
