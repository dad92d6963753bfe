"""compare@M's logic: a release and its variant's published file, each read a batch at a time into
per-side totals (responses, scores, token lengths, and what the published file settles: settled.py)
and one small summary row per conversation, which DuckDB (under a memory limit, spilling to a scratch
directory) joins by conversation_id; the metrics and plot tables (the report: compare_report.py).
Memory does not grow with the size of either file."""

from __future__ import annotations

import gzip
import itertools
import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.config.errors import SourceError
from stages.core.release import settled
from stages.core.release.plots import LOW, TOKEN_BINS, ranges
from stages.core.release.published import EN, ID, JA, NOTES, RECORD
from stages.core.release.settled import SIDES
from stages.core.rows import fields
from stages.core.rows.responses import MESSAGE
from stages.core.rows.scores import SCORE_FAILED
from stages.core.storage.spill import DUCKDB, repeated_ids

FLAGS = (fields.EMPTY, fields.DUPLICATE, fields.TEMPLATE)
COLUMNS = [ID, *FLAGS, JA, NOTES]  # what compare reads of a record
MULTITURN = fields.MULTITURN
OPTIONAL = [EN, MULTITURN]  # read where a file has them (Gemma-3 has neither)
# the multi-turn field's two shapes: the old flat list of messages, and the nested one (a list holding
# one conversation, single- or two-turn: ours, and our reading of the published, docs/assumptions.md 32)
FLAT, NESTED = pa.list_(MESSAGE), pa.list_(pa.list_(MESSAGE))
PEEK = 10_000  # lines of a jsonl.gz file read to find the multi-turn field's shape
SUMMARY = pa.schema(
    [
        (ID, pa.string()),
        (fields.EMPTY, pa.bool_()),
        (fields.DUPLICATE, pa.string()),
        (fields.TEMPLATE, pa.string()),
        ("responses", pa.int64()),
        ("responses_en", pa.int64()),  # null: no English responses field or value
        ("turns", pa.int64()),  # assistant turns of the multi-turn entry; null: none
    ]
)
EXAMPLES = 3  # conversation_ids the report shows per kind of disagreement
# English response lengths in characters: the public records carry no token count for them
CHAR_BINS = (0, 256, 512, 1024, 2048, 4096, 8192)
CARD = ("instructions", "responses", "instructions_en", "responses_en", "multiturn")


TOKEN_RANGES, CHAR_RANGES = ranges(TOKEN_BINS), ranges(CHAR_BINS)  # (lower bound, label) per bin
TOKEN_LABELS, CHAR_LABELS = [label for _, label in TOKEN_RANGES], [label for _, label in CHAR_RANGES]


def multiturn_type(path: str | Path) -> pa.DataType | None:
    """The multi-turn field's type in a jsonl.gz file, from its first value in the first PEEK lines:
    NESTED (a list of conversations) or FLAT; FLAT when the field is there but null; None when absent."""
    seen = False
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in itertools.islice(lines, PEEK):
            record = json.loads(line)
            seen |= MULTITURN in record
            if value := record.get(MULTITURN):
                return NESTED if isinstance(value[0], list) else FLAT
    return FLAT if seen else None


def record_schema(path: str | Path) -> tuple[pa.Schema, list[str]]:
    """The schema and the columns compare reads of a jsonl.gz file (published.read_records)."""
    kind = multiturn_type(path)
    schema = RECORD if kind is None else RECORD.append(pa.field(MULTITURN, kind))
    return schema, [*COLUMNS, EN, *([MULTITURN] if kind else [])]


def turns(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Assistant turns per multi-turn entry (1: single-turn, 2: two-turn), of either shape; null where
    the entry is null."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    rows = pc.list_parent_indices(column).to_numpy()
    messages = pc.list_flatten(column)
    if pa.types.is_list(messages.type):  # NESTED: a conversation per item
        rows, messages = rows[pc.list_parent_indices(messages).to_numpy()], pc.list_flatten(messages)
    assistant = pc.fill_null(pc.equal(pc.struct_field(messages, "role"), "assistant"), False)
    counts = np.bincount(rows[assistant.to_numpy(zero_copy_only=False)], minlength=len(column))
    return pa.array(counts, pa.int64(), mask=column.is_null().to_numpy(zero_copy_only=False))


def _add(totals: Counter, batch: pa.RecordBatch) -> pa.Array:
    """Add a batch to one side's totals; return its responses per row (0 where null)."""
    per_row = pc.fill_null(pc.list_value_length(batch.column(JA)), 0)
    notes = pc.list_flatten(batch.column(NOTES))
    scores, lengths = (
        pc.struct_field(notes, fields.SCORE),
        pc.struct_field(notes, fields.TOKENS),
    )
    parsed = pc.filter(scores, pc.not_equal(scores, SCORE_FAILED))
    totals.update(
        rows=batch.num_rows,
        responses=pc.sum(per_row).as_py() or 0,
        judgements=len(scores),
        judgements_failed=len(scores) - len(parsed),
        score_sum=pc.sum(parsed).as_py() or 0,
        token_sum=pc.sum(lengths).as_py() or 0,
        repetition_flags=pc.sum(pc.struct_field(notes, fields.REPETITION)).as_py() or 0,
    )
    for item in pc.value_counts(pc.floor(parsed)).to_pylist():
        totals[f"score:{int(item['values'])}"] += item["counts"]
    for low, label in zip(TOKEN_BINS, TOKEN_LABELS, strict=True):
        totals[f"tokens:{label}"] += pc.sum(pc.greater_equal(lengths, low)).as_py() or 0
    for item in pc.value_counts(per_row).to_pylist():
        totals[f"per_row:{item['values']}"] += item["counts"]
    totals["instructions_with_responses"] += pc.sum(pc.greater(per_row, 0)).as_py() or 0
    return per_row


def _add_en(totals: Counter, batch: pa.RecordBatch) -> pa.Array:
    """Add a batch's English responses to one side's totals; return their count per row (null where
    the batch has no such field or the row no value)."""
    if EN not in batch.schema.names:
        return pa.nulls(batch.num_rows, pa.int64())
    per_row = pc.cast(pc.list_value_length(batch.column(EN)), pa.int64())
    chars = pc.utf8_length(pc.struct_field(pc.list_flatten(batch.column(EN)), "content"))
    totals.update(
        instructions_with_responses_en=pc.sum(pc.greater(per_row, 0)).as_py() or 0,
        responses_en=pc.sum(per_row).as_py() or 0,
    )
    for low, label in zip(CHAR_BINS, CHAR_LABELS, strict=True):
        totals[f"chars_en:{label}"] += pc.sum(pc.greater_equal(chars, low)).as_py() or 0
    return per_row


def _add_turns(totals: Counter, batch: pa.RecordBatch) -> pa.Array:
    """Add a batch's multi-turn entries (by assistant turns) to one side's totals; return the turns
    per row (null: no entry)."""
    if MULTITURN not in batch.schema.names:
        return pa.nulls(batch.num_rows, pa.int64())
    per_row = turns(batch.column(MULTITURN))
    for item in pc.value_counts(per_row.drop_null()).to_pylist():
        totals[f"turns:{item['values']}"] += item["counts"]
    return per_row


def load_side(db: duckdb.DuckDBPyConnection, side: str, batches: Iterable[pa.RecordBatch]) -> Counter:
    """Store one summary row per record in table `side` of `db`; return the side's totals."""
    totals: Counter = Counter()
    db.execute(
        f"CREATE TABLE {side} ({ID} VARCHAR, empty BOOLEAN, duplicate VARCHAR, template VARCHAR, n BIGINT,"
        " en BIGINT, turns BIGINT)"
    )
    for batch in batches:
        counts = [_add(totals, batch), _add_en(totals, batch), _add_turns(totals, batch)]
        settled.tally(totals, batch)
        summary = pa.table([*(batch.column(c) for c in (ID, *FLAGS)), *counts], schema=SUMMARY)
        db.register("batch", summary)
        db.execute(f"INSERT INTO {side} SELECT * FROM batch")
        db.unregister("batch")
    # each low bin was counted as "at least low": make them [low, next low)
    for prefix, labels in (("tokens", TOKEN_LABELS), ("chars_en", CHAR_LABELS)):
        for label, upper in itertools.pairwise(labels):
            totals[f"{prefix}:{label}"] -= totals[f"{prefix}:{upper}"]
    return totals


JOINED = f"""FROM ours o FULL OUTER JOIN published p ON o.{ID} = p.{ID}"""
BOTH = f"o.{ID} IS NOT NULL AND p.{ID} IS NOT NULL"
# per flag (and responses per row): the SQL of "the two sides differ" on a shared row
DIFFER = {
    fields.EMPTY: "coalesce(o.empty, false) <> coalesce(p.empty, false)",
    fields.DUPLICATE: "o.duplicate IS DISTINCT FROM p.duplicate",
    fields.TEMPLATE: "o.template IS DISTINCT FROM p.template",
    "responses_per_row": "o.n IS DISTINCT FROM p.n",
    "responses_en_present": "(coalesce(o.en, 0) > 0) <> (coalesce(p.en, 0) > 0)",
    "two_turn": "(coalesce(o.turns, 0) >= 2) <> (coalesce(p.turns, 0) >= 2)",
}
SET = {  # per flag: the SQL of "set" on a side (x: o or p)
    fields.EMPTY: "coalesce({x}.empty, false)",
    fields.DUPLICATE: "{x}.duplicate IS NOT NULL",
    fields.TEMPLATE: "{x}.template IS NOT NULL",
}


def join_counts(db: duckdb.DuckDBPyConnection) -> dict:
    """Row overlap, and per flag the shared rows that differ (set on one side only, or set to
    different values) with a few example conversation_ids."""
    for side in SIDES:
        if repeated := repeated_ids(db, side, limit=EXAMPLES):
            raise SourceError(f"the {side} file repeats conversation_ids, e.g. {repeated}")
    counts = dict(
        zip(
            ("both", "only_ours", "only_published"),
            db.sql(
                f"SELECT count(*) FILTER ({BOTH}), count(*) FILTER (p.{ID} IS NULL), "
                f"count(*) FILTER (o.{ID} IS NULL) {JOINED}"
            ).fetchall()[0],
            strict=True,
        )
    )
    differ = {}
    for name, condition in DIFFER.items():
        kinds = {"differ": condition}  # the total; for a flag, broken down by kind below
        if name in SET:
            ours, theirs = SET[name].format(x="o"), SET[name].format(x="p")
            kinds = {
                "differ": condition,
                "set_ours_only": f"{ours} AND NOT {theirs}",
                "set_published_only": f"{theirs} AND NOT {ours}",
                "set_both_differ": f"{ours} AND {theirs} AND {condition}",
            }
        differ[name] = {
            kind: _count_and_examples(db, f"{BOTH} AND ({where})") for kind, where in kinds.items()
        }
    return {"rows": counts, "differ": differ}


def _count_and_examples(db: duckdb.DuckDBPyConnection, where: str) -> tuple[int, list[str]]:
    [(count,)] = db.sql(f"SELECT count(*) {JOINED} WHERE {where}").fetchall()
    query = f"SELECT o.{ID} {JOINED} WHERE {where} ORDER BY o.{ID} LIMIT {EXAMPLES}"
    return count, [cid for (cid,) in db.sql(query).fetchall()]


REDACTED = ("conversations", "rows_ours", "with_responses_ours", "rows_published", "with_responses_published")


def redacted_counts(db: duckdb.DuckDBPyConnection, redacted: pa.Array) -> dict[str, int]:
    """Of the conversations LMSYS redacted (`redacted`: their ids), those each side holds as a row and
    those it gives Japanese responses."""
    db.register("redacted", pa.table({ID: redacted}))
    query = f"""SELECT count(*), count(o.{ID}), count(*) FILTER (o.n > 0), count(p.{ID}),
        count(*) FILTER (p.n > 0) FROM (SELECT DISTINCT {ID} FROM redacted) r
        LEFT JOIN ours o ON r.{ID} = o.{ID} LEFT JOIN published p ON r.{ID} = p.{ID}"""
    return dict(zip(REDACTED, db.sql(query).fetchall()[0], strict=True))


def compare(
    ours: Iterable[pa.RecordBatch], published: Iterable[pa.RecordBatch], redacted: pa.Array
) -> tuple[dict, dict]:
    """The per-side totals and the join counts of two streams of records (COLUMNS, and OPTIONAL where
    present; two_turn_ids where both have the multi-turn field); `redacted`: the ids of the
    conversations LMSYS redacted."""
    with (
        tempfile.TemporaryDirectory(prefix="compare-") as scratch,
        duckdb.connect(
            str(Path(scratch) / "rows.duckdb"), config={**DUCKDB, "temp_directory": f"{scratch}/spill"}
        ) as db,
    ):
        totals = {
            side: load_side(db, side, batches) for side, batches in zip(SIDES, (ours, published), strict=True)
        }
        joined = {**join_counts(db), "redacted": redacted_counts(db, redacted)}
        if settled.has_multiturn(totals):
            joined["two_turn_ids"] = settled.two_turn_ids(db)
        return totals, joined


def _side_metrics(totals: Counter) -> dict:
    """One side's metrics; a mean over nothing is left out, never null."""
    found = {k: totals[k] for k in ("rows", "responses", "judgements_failed", "repetition_flags")}
    scored = totals["judgements"] - totals["judgements_failed"]
    if totals["rows"]:
        found["responses_per_row"] = round(totals["responses"] / totals["rows"], 4)
    if scored:
        found["mean_preference_score"] = round(totals["score_sum"] / scored, 4)
    if totals["judgements"]:
        found["mean_response_token_length"] = round(totals["token_sum"] / totals["judgements"], 2)
    found.update({k: totals[k] for k in ("instructions_with_responses", "instructions_with_responses_en")})
    found["responses_en"] = totals["responses_en"]
    found["multiturn"] = _multiturn(totals)
    return found


def _multiturn(totals: Counter) -> dict:
    """One side's multi-turn entries: how many, single-turn, two-turn, any other number of assistant
    turns, and the two-turn share of the entries (left out when there are none)."""
    by_turns = {int(k.split(":")[1]): n for k, n in totals.items() if k.startswith("turns:")}
    entries = sum(by_turns.values())
    found = {"entries": entries, "single_turn": by_turns.get(1, 0), "two_turn": by_turns.get(2, 0)}
    found["other"] = entries - found["single_turn"] - found["two_turn"]
    if entries:
        found["share_two_turn"] = round(found["two_turn"] / entries, 6)
    return found


FIGURES = {  # a published card figure -> the side metric it is
    "instructions": "instructions_with_responses",
    "responses": "responses",
    "instructions_en": "instructions_with_responses_en",
    "responses_en": "responses_en",
}


def figures(sides: dict[str, dict], card: dict[str, int | None] | None) -> dict:
    """The card's figures ([I]: instructions with at least one response) counted on each side, and
    the card's own where `card` is given (None: the published file is not the card's release)."""
    found = {}
    for figure in CARD:
        row = {
            side: sides[side]["multiturn"]["two_turn"]
            if figure == "multiturn"
            else sides[side][FIGURES[figure]]
            for side in SIDES
        }
        if card and card.get(figure) is not None:
            row["card"] = card[figure]
        found[figure] = row
    return found


def metrics(
    totals: dict[str, Counter],
    joined: dict,
    card: dict[str, int | None] | None = None,
    repetition_threshold: int | None = None,
    max_tokens: int | None = None,
) -> dict:
    """compare@M's DVC metrics: row overlap, agreement on the shared rows, each side's figures, the
    card's figures side by side, the redacted conversations each side answers, and what the published
    file settles (settled.figures; the variant's repetition_threshold and max_tokens beside them)."""
    both = joined["rows"]["both"]
    sides = {side: _side_metrics(totals[side]) for side in SIDES}
    found = {
        "compared": True,
        "rows": {"ours": totals["ours"]["rows"], "published": totals["published"]["rows"], **joined["rows"]},
        **sides,
        "figures": figures(sides, card),
        "redacted": joined["redacted"],
        "differ": {name: {k: n for k, (n, _) in kinds.items()} for name, kinds in joined["differ"].items()},
        **settled.figures(totals, joined, repetition_threshold, max_tokens),
    }
    if both:  # agreement over no shared row is undefined: left out
        found["agreement"] = {
            name: round(1 - kinds["differ"][0] / both, 6) for name, kinds in joined["differ"].items()
        }
    return found


def _bins(totals: Counter) -> dict[str, list[tuple[str | int, int]]]:
    """(label, count) per bin of the three distributions of one side."""
    most = max((int(k.split(":")[1]) for k in totals if k.startswith("per_row:")), default=0)
    return {
        "scores": [(int(SCORE_FAILED), totals["judgements_failed"])]
        + [(k, totals[f"score:{k}"]) for k in range(11)],
        "response_tokens": [(label, totals[f"tokens:{label}"]) for label in TOKEN_LABELS],
        "responses_per_row": [(k, totals[f"per_row:{k}"]) for k in range(most + 1)],
        "response_en_chars": [(label, totals[f"chars_en:{label}"]) for label in CHAR_LABELS],
    }


PLOTS = {  # plot table -> (its bin field, its count field)
    "scores": (fields.SCORE, "responses"),
    "response_tokens": ("tokens", "responses"),
    "responses_per_row": ("responses", "rows"),
    "response_en_chars": ("characters", "responses_en"),
}


RANGES = {  # plot table of ranges -> each range's label -> its lower bound
    "response_tokens": {label: low for low, label in TOKEN_RANGES},
    "response_en_chars": {label: low for low, label in CHAR_RANGES},
}


def plot_tables(totals: dict[str, Counter]) -> dict[str, list[dict]]:
    """Per distribution, a row per bin and side (`source`: ours or published, which the charts colour
    by). A bin that is a number is written as one (preference_score -1: failed judgements); a range
    is its label and its lower bound (`low`), which the charts sort by."""
    bins = {side: _bins(totals[side]) for side in SIDES}
    tables = {}
    for name, (field, count) in PLOTS.items():
        labels = max((bins[side][name] for side in SIDES), key=len)  # responses per row: the longer
        lows = RANGES.get(name, {})
        tables[name] = [
            {
                "source": side,
                field: label,
                **({LOW: lows[label]} if lows else {}),
                count: dict(bins[side][name]).get(label, 0),
            }
            for label, _ in labels
            for side in SIDES
        ]
    return tables
