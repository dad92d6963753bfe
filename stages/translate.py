"""translate: join the first-turn table with the released Japanese instructions, translate the
ones the release lacks (translator LLM) and flag empty, duplicate, template and failed ones.

Neither table is loaded whole: the join streams in bounded memory (stages/core/join.py)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from stages.core import annotate
from stages.core.cli import run, start, timed
from stages.core.errors import PipelineError, SourceError
from stages.core.join import ID, TranslationJoin, llm_rows
from stages.core.params import Params
from stages.core.translator import EMPTY_SOURCE, translate_missing

LOG = logging.getLogger("stages.translate")


def fill_missing(missing: pa.Table, rows_in: int, params: Params) -> pa.Table:
    """The translator LLM's answers (join.LLM_ROWS) for the first-turn rows the release lacks:
    none with translate.missing=drop, an error naming the setting with translate.missing=error."""
    how = params.translate.missing
    LOG.info("released translations for %d of %d conversations", rows_in - missing.num_rows, rows_in)
    if missing.num_rows and how == "error":
        ids = ", ".join(missing[ID].slice(0, 5).to_pylist())
        raise PipelineError(
            f"{missing.num_rows} conversations have no released translation (e.g. {ids}); "
            "set translate.missing to llm or drop"
        )
    if how == "drop" or missing.num_rows == 0:
        return llm_rows(missing, {})
    return llm_rows(
        missing, translate_missing(missing.select([ID, "instruction", "empty_first_turn"]), params)
    )


def check_failure_rate(llm: pa.Table, params: Params) -> int:
    """The number of failed LLM translations; stop when their share of those asked is above the ceiling."""
    asked = llm.num_rows - int(pc.sum(pc.equal(llm["translation_status"], EMPTY_SOURCE)).as_py() or 0)
    failed = llm["instruction_ja"].null_count
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
    templates = annotate.compile_templates(params.translate.templates)
    with (
        timed(LOG, "translate") as counts,
        TranslationJoin(paths.first_turn, paths.instructions, paths.translated) as join,
    ):
        if repeated := join.repeated_ids():
            raise SourceError(
                f"{paths.first_turn} repeats conversation_ids (e.g. {', '.join(repeated)}): "
                "re-run fetch, which keeps the first"
            )
        missing = join.missing()
        llm = fill_missing(missing, join.rows_in, params)
        counts["translation_failed"] = check_failure_rate(llm, params)
        counts.update(rows_in=join.rows_in, rows_out=join.write(missing, llm, templates))


if __name__ == "__main__":
    run(main)
