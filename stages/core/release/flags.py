"""A variant's annotations (generate@<variant>'s second out, paths.annotations_of): for every translated
row, in translated order, the three flags the release carries (empty_user_instruction_ja,
duplicate_user_instruction_ja, is_template_instruction), whether its published conversation is two-turn,
and whose they are.

With models.<variant>.annotations `published` the publisher's annotations are inputs: where the variant's
published file has the row, its flags are taken as they are (categories included) and `two_turn` says
whether its synthesized_multiturn_conversation has a second turn (null where the file has no such field);
the rows the file lacks keep ours, from translate's table. With `ours`, every row keeps ours and
`two_turn` is null. generate skips the rows these flags say are empty or duplicate, score's second turn
follows `two_turn` where it is set (the hash elsewhere), package writes these flags.

The published records are joined onto the translated rows by published.write_joined (bounded memory), then
merged with translate's flags a batch at a time."""

from __future__ import annotations

import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from stages.core.release import comparison
from stages.core.release.published import ID, MULTITURN, Taking, conversation, write_joined
from stages.core.rows import fields
from stages.core.storage.parquet import iter_aligned, parquet_table_writer

FLAGS = [fields.DUPLICATE, fields.EMPTY, fields.TEMPLATE]
TWO_TURN, BY = "two_turn", "annotated_by"
PUBLISHED, OURS = "published", "ours"  # the values of annotated_by
SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (fields.DUPLICATE, pa.string()),
        (fields.EMPTY, pa.bool_()),
        (fields.TEMPLATE, pa.string()),
        # the published conversation has a second turn; null: not published, or no such field in the file
        (TWO_TURN, pa.bool_()),
        (BY, pa.string()),  # published: the flags are the published file's; ours: translate's
    ]
)
ROW_GROUP = 16_384  # rows per row group of the out, whatever `rows` is (the same bytes)
TAKEN = "published."  # the prefix of the published flags in the joined table
JOINED = pa.schema(
    [(ID, pa.string()), *((TAKEN + f, SCHEMA.field(f).type) for f in FLAGS), *list(SCHEMA)[4:]]
)


def published_row(record: dict, multiturn: bool) -> dict:
    """The annotations of a published record: its flags unchanged and, where the file has the
    multi-turn field (`multiturn`), whether its conversation has a second turn (none: single-turn)."""
    two_turn = None
    if multiturn:
        stored = conversation(record.get(MULTITURN))
        two_turn = bool(stored) and len(stored[0]) > 1
    return {
        ID: record[ID],
        **{TAKEN + f: record.get(f) for f in FLAGS},
        TWO_TURN: two_turn,
        BY: PUBLISHED,
    }


def _merged(part: pa.Table) -> pa.Table:
    """The out's rows of a batch of translated flags with the published ones joined (JOINED)."""
    theirs = pc.equal(part[BY], PUBLISHED)
    flags = [pc.if_else(theirs, part[TAKEN + f], part[f]) for f in FLAGS]
    return pa.table([part[ID], *flags, part[TWO_TURN], part[BY]], schema=SCHEMA)


def _ours(part: pa.Table) -> pa.Table:
    """The out's rows of a batch of translated flags, every one ours."""
    n = part.num_rows
    extra = [pa.nulls(n, pa.bool_()), pa.array([OURS] * n, pa.string())]
    return pa.table([part[ID], *(part[f] for f in FLAGS), *extra], schema=SCHEMA)


def write_annotations(translated: str | Path, published: Path | None, out: str | Path, rows: int) -> Counter:
    """Write the annotation table of every translated row to `out`: the published file's (`published`,
    its local copy) where it has the row, ours elsewhere; every row ours where `published` is None.
    `rows` sets the peak memory. Return the rows by annotated_by."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = Counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".joined") as tmp:
        inputs = [(translated, FLAGS)]
        if published is not None:
            record = comparison.record_schema(published)[0]
            multiturn = MULTITURN in record.names
            taking = Taking(
                [ID, *FLAGS, *([MULTITURN] if multiturn else [])],
                JOINED,
                partial(published_row, multiturn=multiturn),
                lacking={BY: OURS},
                record=record,
            )
            joined = Path(tmp) / "published.parquet"
            write_joined(translated, published, joined, taking, rows, roles={})
            inputs.append((joined, JOINED.names[1:]))
        with parquet_table_writer(out, SCHEMA, ROW_GROUP) as write:
            for part in iter_aligned(*inputs, rows=rows):
                table = _merged(part) if published is not None else _ours(part)
                counts.update({i["values"]: i["counts"] for i in pc.value_counts(table[BY]).to_pylist()})
                write(table)
    return counts


def count(totals: Counter, part: pa.Table) -> None:
    """Add a batch of released rows' annotated_by to the release counts: annotations_published (the
    rows whose flags are the publisher's) and annotations_ours."""
    for by in (PUBLISHED, OURS):
        totals[f"annotations_{by}"] += pc.sum(pc.cast(pc.equal(part[BY], by), pa.int64())).as_py() or 0


def card_line(setting: str, metrics: dict, second_turn: bool) -> str:
    """The card's sentence on whose flags the release carries (`models.<v>.annotations`, the counts)."""
    published, ours = metrics.get(f"annotations_{PUBLISHED}", 0), metrics.get(f"annotations_{OURS}", 0)
    flags = f"`{fields.TEMPLATE}` (its category), `{fields.DUPLICATE}` and `{fields.EMPTY}`"
    if not published:
        return (
            f"Flags: {flags} are this project's, computed by translate's rules, on all {ours:,} rows "
            f"(`annotations: {setting}`)."
            + (" `second_turn.share` picks the two-turn conversations." if second_turn else "")
        )
    return (
        f"Flags: {flags} are the publisher's, as its published file has them, on {published:,} rows "
        f"(`annotations_published`), and this project's, computed by translate's rules, on the {ours:,} "
        f"rows that file lacks (`annotations_ours`; `annotations: {setting}`)."
        + (
            " On the publisher's rows a conversation is two-turn exactly where the published file's is; on "
            "ours, `second_turn.share` picks them."
            if second_turn
            else ""
        )
    )
