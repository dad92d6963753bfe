"""translate: join the first-turn table with the released Japanese instructions, translate the
ones the release lacks (translator LLM) and flag empty, duplicate, template and failed ones."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from stages.core import annotate
from stages.core.cli import run, start, timed
from stages.core.errors import PipelineError, SourceError
from stages.core.io import read_table, write_table
from stages.core.params import Params
from stages.core.translator import EMPTY_SOURCE, translate_missing

LOG = logging.getLogger("stages.translate")


def fill_translations(first: pa.Table, released: pa.Table, params: Params) -> pa.Table:
    """The first-turn rows with `instruction_ja` (null where the translation failed),
    `instruction_source` (released or llm) and `translation_status` (null for released ones)."""
    table = first.join(released, "conversation_id", join_type="left outer").sort_by([("row", "ascending")])
    found, how = pc.is_valid(table["instruction_ja"]), params.translate.missing
    missing = table.filter(pc.invert(found))
    LOG.info("released translations for %d of %d conversations", len(table) - len(missing), len(table))
    if missing.num_rows and how == "error":
        ids = ", ".join(missing["conversation_id"].to_pylist()[:5])
        raise PipelineError(
            f"{missing.num_rows} conversations have no released translation (e.g. {ids}); "
            "set translate.missing to llm or drop"
        )
    if how == "drop":
        table, found = table.filter(found), pc.filter(found, found)
    llm = translate_missing(missing, params) if how == "llm" else {}
    ids, texts = table["conversation_id"].to_pylist(), table["instruction_ja"].to_pylist()
    pairs = [(text, None) if text is not None else llm[cid] for cid, text in zip(ids, texts, strict=True)]
    return (
        table.drop_columns(["instruction_ja"])
        .append_column("instruction_ja", pa.array([p[0] for p in pairs], pa.string()))
        .append_column("instruction_source", pc.if_else(found, "released", "llm"))
        .append_column("translation_status", pa.array([p[1] for p in pairs], pa.string()))
    )


def check_failure_rate(table: pa.Table, params: Params) -> int:
    """The number of failed LLM translations; stop when their share of those asked is above the ceiling."""
    statuses = table["translation_status"].to_pylist()
    asked = sum(s not in (None, EMPTY_SOURCE) for s in statuses)
    failed = int(pc.sum(table["translation_failed"]).as_py() or 0)
    ceiling = params.translate.max_failure_rate
    if asked and failed / asked > ceiling:
        raise PipelineError(
            f"translate: {failed} of {asked} LLM translations failed ({failed / asked:.1%} > "
            f"translate.max_failure_rate={ceiling}); the log says why. Fix translate.llm or "
            "translate.prompt, or raise translate.max_failure_rate (finished translations are kept "
            "and not asked again)"
        )
    return failed


def main() -> None:
    params, _ = start("translate", __doc__)
    paths = params.paths
    with timed(LOG, "translate") as counts:
        first = read_table(paths.first_turn)
        if pc.count_distinct(first["conversation_id"]).as_py() != first.num_rows:
            raise SourceError(
                f"{paths.first_turn} repeats conversation_ids: re-run fetch, which keeps the first"
            )
        first = first.append_column("row", pa.array(range(first.num_rows), pa.int64()))
        table = fill_translations(first, read_table(paths.instructions), params).drop_columns(["row"])
        table = annotate.with_flags(table, annotate.compile_templates(params.translate.templates))
        counts["translation_failed"] = check_failure_rate(table, params)
        write_table(table, paths.translated)
        counts.update(rows_in=first.num_rows, rows_out=table.num_rows)


if __name__ == "__main__":
    run(main)
