"""compare@<variant>: the variant's release against its published public file (fetched at the pinned
revision, sha256 checked): rows in both or one only, agreement of empty_user_instruction_ja,
duplicate_user_instruction_ja, is_template_instruction, responses per row, English responses and two-turn
entries on the shared rows; each side's responses (Japanese and English), preference_score,
response_token_length, multi-turn entries and the card's figures; the redacted conversations (from the
translated subset) each side answers; and what the published file settles (core/release/settled.py):
the distinct template categories per side with their rows (translate.templates), the repetition flag
against response_token_length with the thresholds that separate flagged from unflagged responses
(models.<variant>.score.repetition_threshold beside them), the longest response per side
(models.<variant>.generate.sampling.max_tokens beside it) and, where both files have the multi-turn
field, the shared conversations two-turn on both sides, one or neither (models.<variant>.second_turn).
Writes a report, DVC metrics and plot tables (ours and published side by side). Nothing depends on it.
With models.<variant>.compare false, it fetches nothing and writes metrics saying "not compared" (and
empty plot tables)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core.config.cli import run, start, timed
from stages.core.config.params import Params
from stages.core.release import compare_report, comparison, published
from stages.core.release.files import public_file
from stages.core.release.published import ID
from stages.core.storage.atomic import atomic_path
from stages.core.storage.jsonl import sha256_file, write_json
from stages.core.storage.source import NoMatchError

LOG = logging.getLogger("stages.compare")
BATCH_ROWS = 4096  # rows of our release read at a time


def our_release(params: Params, name: str) -> tuple[Path, Iterator[pa.RecordBatch]]:
    """The variant's released public file (Parquet if package wrote it, else jsonl.gz) and its records."""
    path = public_file(params, name, hint=f"run package@{name}")
    if path.suffix != ".parquet":
        return path, records(path)
    found = pq.ParquetFile(path)
    columns = comparison.COLUMNS + [c for c in comparison.OPTIONAL if c in found.schema_arrow.names]
    return path, found.iter_batches(BATCH_ROWS, columns=columns)


def records(path: Path) -> Iterator[pa.RecordBatch]:
    """The records of a jsonl.gz file that compare reads (the multi-turn field in the file's shape)."""
    schema, columns = comparison.record_schema(path)
    return published.read_records(path, columns, schema)


def redacted_ids(params: Params, name: str) -> pa.Array:
    """The conversation_ids LMSYS redacted among the variant's translated instructions."""
    table = pq.read_table(params.paths.translated_of(params.models[name].subset), columns=[ID, "redacted"])
    return table.filter(pc.fill_null(table["redacted"], False))[ID].combine_chunks()


def not_compared(params: Params, name: str) -> None:
    """models.<name>.compare is false: metrics and report say so; the plot tables are empty."""
    for table in comparison.PLOTS:
        write_json([], Path(params.paths.plots_of(name)) / f"compare_{table}.json")
    write_json({"compared": False}, params.paths.metrics_of(f"compare@{name}"))
    with atomic_path(params.paths.report_of(f"compare@{name}")) as tmp:
        tmp.write_text(f"# compare@{name}: not compared (models.{name}.compare is false)\n", encoding="utf-8")


def main() -> None:
    params, name = start("compare", __doc__, variant=True)
    paths, variant = params.paths, params.models[name]
    if not variant.compare:
        LOG.info("compare@%s: models.%s.compare is false: not compared", name, name)
        not_compared(params, name)
        return
    with timed(LOG, f"compare@{name}") as counts:
        try:
            local, record = published.fetch(params.published, variant.release_name, paths.published)
        except NoMatchError as err:
            raise NoMatchError(
                f"compare@{name}: {err}: the publisher released no file for release_name "
                f"{variant.release_name!r}. A variant of your own has nothing to compare with: set "
                f"`compare: false` in conf/model/{name}.yaml (models.{name}.compare), then "
                "python -m stages.compose"
            ) from err
        ours, batches = our_release(params, name)
        totals, joined = comparison.compare(batches, records(local), redacted_ids(params, name))
        card = params.published.figures(variant.release_name)
        found = comparison.metrics(
            totals,
            joined,
            card,
            repetition_threshold=variant.score.repetition_threshold,
            max_tokens=variant.generate.sampling.max_tokens,
        )
        tables = comparison.plot_tables(totals)
        for table, rows in tables.items():
            write_json(rows, Path(paths.plots_of(name)) / f"compare_{table}.json")
        write_json(found, paths.metrics_of(f"compare@{name}"))
        text = compare_report.report(
            name, {"path": str(ours), "sha256": sha256_file(ours)}, record, found, joined, tables
        )
        with atomic_path(paths.report_of(f"compare@{name}")) as tmp:
            tmp.write_text(text, encoding="utf-8")
        counts.update({f"rows_{k}": v for k, v in found["rows"].items()})


if __name__ == "__main__":
    run(main)
