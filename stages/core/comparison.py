"""compare@M's logic: a release and its variant's published file, each read a batch at a time into
per-side totals (responses, scores, token lengths) and one small summary row per conversation, which
DuckDB (under a memory limit, spilling to a scratch directory) joins by conversation_id. Memory does
not grow with the size of either file."""

from __future__ import annotations

import itertools
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.errors import SourceError
from stages.core.join import DUCKDB
from stages.core.plots import TOKEN_BINS
from stages.core.published import ID, JA, NOTES
from stages.core.responses import SCORE_FAILED

SIDES = ("ours", "published")
FLAGS = ("empty_user_instruction_ja", "duplicate_user_instruction_ja", "is_template_instruction")
COLUMNS = [ID, *FLAGS, JA, NOTES]  # what compare reads of a record
SUMMARY = pa.schema(
    [
        (ID, pa.string()),
        ("empty_user_instruction_ja", pa.bool_()),
        ("duplicate_user_instruction_ja", pa.string()),
        ("is_template_instruction", pa.string()),
        ("responses", pa.int64()),
    ]
)
EXAMPLES = 3  # conversation_ids the report shows per kind of disagreement
TOKEN_LABELS = [
    f"{low}+" if high is None else f"{low}-{high - 1}"
    for low, high in zip(TOKEN_BINS, [*TOKEN_BINS[1:], None], strict=True)
]


def _add(totals: Counter, batch: pa.RecordBatch) -> pa.Array:
    """Add a batch to one side's totals; return its responses per row (0 where null)."""
    per_row = pc.fill_null(pc.list_value_length(batch.column(JA)), 0)
    notes = pc.list_flatten(batch.column(NOTES))
    scores, lengths = (
        pc.struct_field(notes, "preference_score"),
        pc.struct_field(notes, "response_token_length"),
    )
    parsed = pc.filter(scores, pc.not_equal(scores, SCORE_FAILED))
    totals.update(
        rows=batch.num_rows,
        responses=pc.sum(per_row).as_py() or 0,
        judgements=len(scores),
        judgements_failed=len(scores) - len(parsed),
        score_sum=pc.sum(parsed).as_py() or 0,
        token_sum=pc.sum(lengths).as_py() or 0,
        repetition_flags=pc.sum(pc.struct_field(notes, "repetition_flag")).as_py() or 0,
    )
    for item in pc.value_counts(pc.floor(parsed)).to_pylist():
        totals[f"score:{int(item['values'])}"] += item["counts"]
    for low, label in zip(TOKEN_BINS, TOKEN_LABELS, strict=True):
        totals[f"tokens:{label}"] += pc.sum(pc.greater_equal(lengths, low)).as_py() or 0
    for item in pc.value_counts(per_row).to_pylist():
        totals[f"per_row:{item['values']}"] += item["counts"]
    return per_row


def load_side(db: duckdb.DuckDBPyConnection, side: str, batches: Iterable[pa.RecordBatch]) -> Counter:
    """Store one summary row per record in table `side` of `db`; return the side's totals."""
    totals: Counter = Counter()
    db.execute(
        f"CREATE TABLE {side} ({ID} VARCHAR, empty BOOLEAN, duplicate VARCHAR, template VARCHAR, n BIGINT)"
    )
    for batch in batches:
        per_row = _add(totals, batch)
        summary = pa.table([*(batch.column(c) for c in (ID, *FLAGS)), per_row], schema=SUMMARY)
        db.register("batch", summary)
        db.execute(f"INSERT INTO {side} SELECT * FROM batch")
        db.unregister("batch")
    # each low bin was counted as "at least low": make them [low, next low)
    for label, upper in itertools.pairwise(TOKEN_LABELS):
        totals[f"tokens:{label}"] -= totals[f"tokens:{upper}"]
    return totals


def _repeated(db: duckdb.DuckDBPyConnection, side: str) -> list[str]:
    query = f"SELECT {ID} FROM {side} GROUP BY {ID} HAVING count(*) > 1 ORDER BY {ID} LIMIT {EXAMPLES}"
    return [cid for (cid,) in db.sql(query).fetchall()]


JOINED = f"""FROM ours o FULL OUTER JOIN published p ON o.{ID} = p.{ID}"""
BOTH = f"o.{ID} IS NOT NULL AND p.{ID} IS NOT NULL"
# per flag (and responses per row): the SQL of "the two sides differ" on a shared row
DIFFER = {
    "empty_user_instruction_ja": "coalesce(o.empty, false) <> coalesce(p.empty, false)",
    "duplicate_user_instruction_ja": "o.duplicate IS DISTINCT FROM p.duplicate",
    "is_template_instruction": "o.template IS DISTINCT FROM p.template",
    "responses_per_row": "o.n IS DISTINCT FROM p.n",
}
SET = {  # per flag: the SQL of "set" on a side (x: o or p)
    "empty_user_instruction_ja": "coalesce({x}.empty, false)",
    "duplicate_user_instruction_ja": "{x}.duplicate IS NOT NULL",
    "is_template_instruction": "{x}.template IS NOT NULL",
}


def join_counts(db: duckdb.DuckDBPyConnection) -> dict:
    """Row overlap, and per flag the shared rows that differ (set on one side only, or set to
    different values) with a few example conversation_ids."""
    for side in SIDES:
        if repeated := _repeated(db, side):
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


def compare(ours: Iterable[pa.RecordBatch], published: Iterable[pa.RecordBatch]) -> tuple[dict, dict]:
    """The per-side totals and the join counts of two streams of records (COLUMNS)."""
    with (
        tempfile.TemporaryDirectory(prefix="compare-") as scratch,
        duckdb.connect(
            str(Path(scratch) / "rows.duckdb"), config={**DUCKDB, "temp_directory": f"{scratch}/spill"}
        ) as db,
    ):
        totals = {
            side: load_side(db, side, batches) for side, batches in zip(SIDES, (ours, published), strict=True)
        }
        return totals, join_counts(db)


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
    return found


def metrics(totals: dict[str, Counter], joined: dict) -> dict:
    """compare@M's DVC metrics: row overlap, agreement on the shared rows, and each side's figures."""
    both = joined["rows"]["both"]
    found = {
        "rows": {"ours": totals["ours"]["rows"], "published": totals["published"]["rows"], **joined["rows"]},
        **{side: _side_metrics(totals[side]) for side in SIDES},
        "differ": {name: {k: n for k, (n, _) in kinds.items()} for name, kinds in joined["differ"].items()},
    }
    if both:  # agreement over no shared row is undefined: left out
        found["agreement"] = {
            name: round(1 - kinds["differ"][0] / both, 6) for name, kinds in joined["differ"].items()
        }
    return found


def _bins(totals: Counter) -> dict[str, list[tuple[str, int]]]:
    """(label, count) per bin of the three distributions of one side."""
    most = max((int(k.split(":")[1]) for k in totals if k.startswith("per_row:")), default=0)
    return {
        "scores": [("failed", totals["judgements_failed"])]
        + [(str(k), totals[f"score:{k}"]) for k in range(11)],
        "response_tokens": [(label, totals[f"tokens:{label}"]) for label in TOKEN_LABELS],
        "responses_per_row": [(str(k), totals[f"per_row:{k}"]) for k in range(most + 1)],
    }


PLOTS = {  # plot table -> (its bin field, its count field)
    "scores": ("preference_score", "responses"),
    "response_tokens": ("tokens", "responses"),
    "responses_per_row": ("responses", "rows"),
}


TITLES = {
    "scores": "preference_score",
    "response_tokens": "response_token_length",
    "responses_per_row": "responses",
}


def plot_tables(totals: dict[str, Counter]) -> dict[str, list[dict]]:
    """Per distribution, a row per bin and side (`source`: ours or published); `bar` ("7 ours") is
    the bar's label, so that DVC draws the two sides of a bin next to each other."""
    bins = {side: _bins(totals[side]) for side in SIDES}
    tables = {}
    for name, (field, count) in PLOTS.items():
        labels = max((bins[side][name] for side in SIDES), key=len)  # responses per row: the longer
        tables[name] = [
            {
                "source": side,
                field: label,
                "bar": f"{label} {side}",
                count: dict(bins[side][name]).get(label, 0),
            }
            for label, _ in labels
            for side in SIDES
        ]
    return tables


SIDE_ROWS = [  # the report's per-side table: (label, metric key)
    ("rows", "rows"),
    ("responses", "responses"),
    ("responses per row", "responses_per_row"),
    ("mean preference_score", "mean_preference_score"),
    ("judgements failed (score -1)", "judgements_failed"),
    ("mean response_token_length", "mean_response_token_length"),
    ("repetition_flag set", "repetition_flags"),
]
KINDS = [
    ("differ", "differ"),
    ("set_ours_only", "set in ours only"),
    ("set_published_only", "set in published only"),
    ("set_both_differ", "set in both, to different values"),
]


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join("–" if c is None else str(c) for c in row) + " |" for row in rows]


def report(name: str, ours: dict, published: dict, found: dict, joined: dict, tables: dict) -> str:
    """compare@M's report (Markdown): the two files, the overlap, the agreement on shared rows with
    example conversation_ids, and the distributions side by side."""
    where = f"{published['uri']}/{published['path']}" + (
        f" @ {published['revision']}" if published["revision"] else ""
    )
    lines = [f"# compare@{name}: our release and the published file", ""]
    lines += _table(
        ["", "ours", "published"],
        [["file", f"`{ours['path']}`", f"`{where}`"], ["sha256", ours["sha256"], published["sha256"]]]
        + [[label, found["ours"].get(key), found["published"].get(key)] for label, key in SIDE_ROWS],
    )
    rows = found["rows"]
    lines += ["", "## Rows (by conversation_id)", ""]
    lines += _table(["in both", "in ours only", "in published only"],
                    [[rows["both"], rows["only_ours"], rows["only_published"]]])  # fmt: skip
    lines += ["", f"## Agreement on the {rows['both']} shared rows", ""]
    agreement = found.get("agreement", {})
    body = []
    for field, kinds in joined["differ"].items():
        for kind, label in KINDS:
            if kind in kinds:
                count, examples = kinds[kind]
                share = agreement.get(field) if kind == "differ" else None
                body.append([field if kind == "differ" else "", share, label, count, ", ".join(examples)])
    lines += _table(["field", "agreement", "rows that", "count", "examples (conversation_id)"], body)
    for table, (field, count) in PLOTS.items():
        by_label: dict[str, dict] = {}
        for row in tables[table]:
            by_label.setdefault(row[field], {})[row["source"]] = row[count]
        lines += ["", f"## {count} by {TITLES[table]}", ""]
        lines += _table(
            [field, "ours", "published"], [[k, v["ours"], v["published"]] for k, v in by_label.items()]
        )
    return "\n".join(lines) + "\n"
