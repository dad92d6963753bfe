"""compare@<variant>: the variant's release against its published public file (fetched at the pinned
revision, sha256 checked): rows in both or one only, agreement of empty_user_instruction_ja,
duplicate_user_instruction_ja, is_template_instruction and responses per row on the shared rows, and
each side's responses, preference_score and response_token_length. Writes a report, DVC metrics and
plot tables (ours and published side by side). Nothing depends on it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core import comparison, published
from stages.core.cli import run, start, timed
from stages.core.errors import SourceError
from stages.core.io import atomic_path, sha256_file, write_json
from stages.core.params import Params

LOG = logging.getLogger("stages.compare")
BATCH_ROWS = 4096  # rows of our release read at a time


def our_release(params: Params, name: str) -> tuple[Path, Iterator[pa.RecordBatch]]:
    """The variant's released public file (Parquet if package wrote it, else jsonl.gz) and its records."""
    stem = params.release.file.format(name=params.models[name].release_name)
    directory = Path(params.paths.release) / name
    parquet, jsonl = directory / f"{stem}.parquet", directory / f"{stem}.jsonl.gz"
    if parquet.is_file():
        return parquet, pq.ParquetFile(parquet).iter_batches(BATCH_ROWS, columns=comparison.COLUMNS)
    if jsonl.is_file():
        return jsonl, published.read_records(jsonl, comparison.COLUMNS)
    raise SourceError(f"{directory} holds neither {parquet.name} nor {jsonl.name}: run package@{name}")


def main() -> None:
    params, name = start("compare", __doc__, variant=True)
    paths = params.paths
    with timed(LOG, f"compare@{name}") as counts:
        local, record = published.fetch(params.published, params.models[name].release_name, paths.published)
        ours, batches = our_release(params, name)
        totals, joined = comparison.compare(batches, published.read_records(local, comparison.COLUMNS))
        found, tables = comparison.metrics(totals, joined), comparison.plot_tables(totals)
        for table, rows in tables.items():
            write_json(rows, Path(paths.metrics) / "plots" / name / f"compare_{table}.json")
        write_json(found, Path(paths.metrics) / f"compare-{name}.json")
        text = comparison.report(
            name, {"path": str(ours), "sha256": sha256_file(ours)}, record, found, joined, tables
        )
        with atomic_path(Path(paths.metrics) / f"compare-{name}.md") as tmp:
            tmp.write_text(text, encoding="utf-8")
        counts.update({f"rows_{k}": v for k, v in found["rows"].items()})


if __name__ == "__main__":
    run(main)
