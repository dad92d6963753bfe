"""Plot data of a release (DVC plots): the score histogram, response token lengths, responses per
instruction and failure counts. Small JSON tables under paths.metrics, committed with dvc.lock, so that
`dvc plots diff vA vB` draws two releases side by side without pulling any data.

Counts are taken from the public records as they are released (package hands each batch to `add`),
with Arrow compute (no Python rows): what is plotted is what was released. A bin that is a number is
written as one (preference_score -1, the failed judgements, to 10; responses 0, 1, ...), so the charts
sort it as a number; a range of lengths is its label ("64-127") and its lower bound (`low`), which the
charts sort by (dvc.yaml's templates, .dvc/plots/)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from stages.core.rows import fields
from stages.core.rows.scores import SCORE_FAILED
from stages.core.storage.jsonl import write_json

# response_token_length bins: [low, next low); the last is open (the default repetition rule: > 2000,
# docs/assumptions.md)
TOKEN_BINS = (0, 64, 128, 256, 512, 1024, 2048)
FAILURES = (  # release metrics that count requests or rows without a usable answer
    "translation_failed",
    "generate_skipped_too_long",
    "generate_failed_requests",
    "judgements_failed",
    "judge_skipped_too_long",
    "judge_failed_requests",
    "second_turn_skipped_too_long",
    "second_turn_failed_requests",
)
FILES = ("scores", "response_tokens", "responses_per_instruction", "failures")
SCORE_BINS = (int(SCORE_FAILED), *range(11))  # a parsed score s counts in bin floor(s)
LOW = "low"  # a range's lower bound, in the plot tables of ranges


def ranges(bins: tuple[int, ...]) -> list[tuple[int, str]]:
    """(lower bound, label) of each range [low, next low); the last is open: 2048 -> "2048+"."""
    return [
        (low, f"{low}+" if high is None else f"{low}-{high - 1}")
        for low, high in zip(bins, [*bins[1:], None], strict=True)
    ]


def new_totals() -> dict[str, Counter]:
    return {name: Counter() for name in FILES}


def add(totals: dict[str, Counter], batch: pa.RecordBatch | pa.Table) -> None:
    """Count one batch of public records into `totals` (see new_totals)."""
    annotations = pc.list_flatten(batch.column(fields.NOTES))
    scores = pc.struct_field(annotations, fields.SCORE)
    failed = pc.equal(scores, SCORE_FAILED)
    totals["scores"][int(SCORE_FAILED)] += pc.sum(failed).as_py() or 0
    # a parsed score s counts in bin floor(s): 7.5 (logprob-weighted) is in 7
    parsed = pc.floor(pc.filter(scores, pc.invert(failed)))
    for item in pc.value_counts(parsed).to_pylist():
        totals["scores"][int(item["values"])] += item["counts"]
    lengths = pc.struct_field(annotations, fields.TOKENS)
    for (low, label), high in zip(ranges(TOKEN_BINS), [*TOKEN_BINS[1:], None], strict=True):
        inside = pc.greater_equal(lengths, low)
        if high is not None:
            inside = pc.and_(inside, pc.less(lengths, high))
        totals["response_tokens"][label] += pc.sum(inside).as_py() or 0
    per_row = pc.fill_null(pc.list_value_length(batch.column(fields.RESPONSES)), 0)
    for item in pc.value_counts(per_row).to_pylist():
        totals["responses_per_instruction"][item["values"]] += item["counts"]


def plot_tables(totals: dict[str, Counter], metrics: dict) -> dict[str, list[dict]]:
    """The rows of each plot table from the counts and the release metrics (every bin, zeros too)."""
    most = max(totals["responses_per_instruction"], default=0)
    return {
        "scores": [{fields.SCORE: k, "responses": totals["scores"][k]} for k in SCORE_BINS],
        "response_tokens": [
            {"tokens": label, LOW: low, "responses": totals["response_tokens"][label]}
            for low, label in ranges(TOKEN_BINS)
        ],
        "responses_per_instruction": [
            {"responses": k, "instructions": totals["responses_per_instruction"][k]} for k in range(most + 1)
        ],
        "failures": [{"failure": k, "count": int(metrics.get(k, 0))} for k in FAILURES],
    }


def write_plots(totals: dict[str, Counter], metrics: dict, out_dir: Path) -> None:
    """Write each plot table to `out_dir/<name>.json` (the files dvc.yaml's plots name)."""
    for name, rows in plot_tables(totals, metrics).items():
        write_json(rows, out_dir / f"{name}.json")
