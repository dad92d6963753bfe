"""translate@<subset>'s work: the release's rows joined with their first turns, the rows it lacks listed
and (an extension) translated by the LLM or DeepL, the failure ceiling, the metrics."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from stages.core.config.cli import timed
from stages.core.config.errors import PipelineError, SourceError
from stages.core.config.params import Params
from stages.core.rows import annotate
from stages.core.rows.translation import ID, TranslationJoin, llm_rows
from stages.core.runtime.deepl_translate import translate_with_deepl
from stages.core.runtime.translator import EMPTY_SOURCE, translate_missing
from stages.core.storage.jsonl import merge_json, write_lines
from stages.core.storage.parquet import engines_of

LOG = logging.getLogger("stages.translate")
BACKENDS = {"llm": "LLM", "deepl": "DeepL"}  # translate.missing -> how messages name it


def fill_missing(
    missing: pa.Table, rows_in: int, params: Params, counts: Counter, stage: str = "translate"
) -> tuple[pa.Table, dict[bytes, bytes]]:
    """The translator's answers (join.LLM_ROWS) for the first-turn rows the release lacks: the LLM's
    or DeepL's (`counts` gets DeepL's), none with translate.missing=drop, an error with fail; and
    the translator's identity (the out's metadata: the translate role in a release's manifest)."""
    how = params.translate.missing
    LOG.info("released translations for %d of %d conversations", rows_in - missing.num_rows, rows_in)
    if missing.num_rows and how == "fail":
        ids = ", ".join(missing[ID].slice(0, 5).to_pylist())
        raise PipelineError(
            f"{missing.num_rows} conversations have no released translation (e.g. {ids}); "
            "set translate.missing to drop (faithful), llm or deepl (an extension)"
        )
    if how == "drop" or missing.num_rows == 0:
        return llm_rows(missing, {}), {}
    rows = missing.select([ID, "instruction", "empty_first_turn"])
    if how == "deepl":
        answers = translate_with_deepl(rows, params, counts, stage)
    else:
        answers = translate_missing(rows, params, stage)
    out = Path(params.paths.stage_out(stage))
    return llm_rows(missing, answers), engines_of(out) if out.exists() else {}


def check_failure_rate(llm: pa.Table, params: Params) -> int:
    """The number of failed translations; stop when their share of those asked is above the ceiling."""
    asked = llm.num_rows - int(pc.sum(pc.equal(llm["translation_status"], EMPTY_SOURCE)).as_py() or 0)
    failed = llm["instruction_ja"].null_count
    ceiling, how = params.translate.max_failure_rate, params.translate.missing
    if asked and failed / asked > ceiling:
        fix = "translate.deepl" if how == "deepl" else "translate.llm or translate.prompt"
        raise PipelineError(
            f"translate: {failed} of {asked} {BACKENDS[how]} translations failed ({failed / asked:.1%} > "
            f"translate.max_failure_rate={ceiling}); the log says why. Fix {fix}, or raise "
            "translate.max_failure_rate (finished translations are kept and not asked again)"
        )
    return failed


def translate_metrics(counts: Counter, answered: int, how: str) -> dict:
    """data/metrics/translate.json: rows by instruction_source, failed translations, DeepL's traffic
    in this run (characters billed, texts sent and answered from the response cache)."""
    rows = {"rows_released": counts["rows_out"] - answered, "rows_llm": 0, "rows_deepl": 0}
    if how in ("llm", "deepl"):
        rows[f"rows_{how}"] = answered
    return {**rows, "deepl_billed_characters": 0, **counts}


def translate_subset(params: Params, subset: str) -> None:
    """translate@<subset>: its released instructions joined with their first turns, the rows the
    release lacks listed (and, as an extension, translated), the flags added; its metrics."""
    paths, how = params.paths, params.translate.missing
    templates = annotate.compile_templates(params.translate.templates)
    out = Path(paths.translated_of(subset))
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        timed(LOG, f"translate@{subset}") as counts,
        TranslationJoin(
            paths.first_turn, paths.instructions_of(subset), out, without_flagged=subset == "ja"
        ) as join,
    ):
        if repeated := join.repeated_ids():
            raise SourceError(
                f"{paths.first_turn} repeats conversation_ids (e.g. {', '.join(repeated)}): "
                "re-run fetch, which keeps the first"
            )
        counts.update(join.release_counts())
        if dropped := counts["release_rows_without_first_turn"]:
            LOG.warning(
                "translate@%s: %d released rows have no first turn (fetch's filter dropped them, e.g. %s):"
                " they are not in this release (release_rows_without_first_turn)",
                subset,
                dropped,
                ", ".join(join.released_without_first_turn()),
            )
        missing = join.missing()
        write_lines(missing[ID].to_pylist(), Path(paths.not_released_of(subset)))
        counts["rows_not_released"] = missing.num_rows
        stage = f"translate@{subset}"
        llm, translator = fill_missing(missing, join.rows_in, params, counts, stage=stage)
        counts["translation_failed"] = check_failure_rate(llm, params)
        source = "deepl" if how == "deepl" else "llm"  # instruction_source of the rows it answered
        written = join.write(llm, templates, source, metadata=translator if llm.num_rows else {})
        counts.update(rows_in=join.rows_in, rows_out=written)
    merge_json(translate_metrics(counts, llm.num_rows, how), paths.metrics_of(f"translate@{subset}"))
