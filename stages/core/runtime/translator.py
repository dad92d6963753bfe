"""The translator LLM: Japanese translations of the first turns the release lacks, in resumable
shards. An empty or failed translation is a failed translation (asked again up to
`translate.retries` times with a new seed), never an empty instruction."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from stages.core.config.params import Params
from stages.core.config.translate_params import TranslateParams
from stages.core.engines import Engine
from stages.core.rows.prompts import template, user_turn
from stages.core.rows.requests import OK, ChatRequest
from stages.core.rows.responses import request_seed
from stages.core.runtime.executors import engine_pool
from stages.core.runtime.shards import slices
from stages.core.storage.parquet import read_table, value_counts
from stages.core.storage.resume import code_digest, digest, recipe

LOG = logging.getLogger(__name__)
EMPTY_OUTPUT = "empty_output"  # the translator answered with nothing
EMPTY_SOURCE = "empty_source"  # an empty first turn: nothing to translate, the instruction is empty
TRANSLATED = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("instruction_ja", pa.string()),  # null: the translation failed
        ("translation_status", pa.string()),  # ok, skipped_too_long, failed, empty_output
    ]
)


def translate_rows(
    engine: Engine, rows: list[dict], spec: TranslateParams, seed: int
) -> tuple[list[str | None], list[str]]:
    """Each row's translation (None when it failed after the retries) and its final status."""
    texts: list[str | None] = [None] * len(rows)
    statuses = [""] * len(rows)
    todo = list(range(len(rows)))
    for attempt in range(spec.retries + 1):
        requests = [
            ChatRequest(
                user_turn(spec.prompt, text=rows[i]["instruction"]),
                seed=request_seed(seed, rows[i]["conversation_id"], f"translate:{attempt}"),
            )
            for i in todo
        ]
        retry = []
        for i, reply in zip(todo, engine.chat(requests, spec.sampling), strict=True):
            text = reply.completions[0].text.strip() if reply.completions else ""
            statuses[i] = EMPTY_OUTPUT if reply.status == OK and not text else reply.status
            texts[i] = text or None
            if statuses[i] in ("failed", EMPTY_OUTPUT):
                retry.append(i)
        todo = retry
    return texts, statuses


def translate_table(engine: Engine, rows: pa.Table, spec: TranslateParams, seed: int) -> pa.Table:
    """One shard of the translator's out: each row's translation and its status."""
    texts, statuses = translate_rows(engine, rows.to_pylist(), spec, seed)
    return pa.table([rows["conversation_id"], texts, statuses], schema=TRANSLATED)


def split_empty(table: pa.Table) -> tuple[dict[str, tuple[str | None, str]], pa.Table]:
    """The answers for the empty first turns of `table` (nothing to translate: an empty
    instruction, EMPTY_SOURCE), and its other rows."""
    empty = table.filter(table["empty_first_turn"])["conversation_id"].to_pylist()
    return {cid: ("", EMPTY_SOURCE) for cid in empty}, table.filter(pc.invert(table["empty_first_turn"]))


def translate_missing(
    table: pa.Table, params: Params, stage: str = "translate"
) -> dict[str, tuple[str | None, str]]:
    """conversation_id -> (Japanese text or None, translation status) for each row of `table`:
    its non-empty first turns (`instruction`) go to the translator LLM, its empty ones stay empty.
    `stage` names the checkpoints (translate@<subset>: each subset keeps its own)."""
    spec = params.translate
    result, table = split_empty(table)
    if table.num_rows == 0:
        return result
    out = Path(params.paths.stage_out(stage))
    with engine_pool(spec.llm, params.engine, params.paths.response_cache) as pool:
        key = digest(
            "translate",
            recipe(spec.llm),
            template(spec.prompt).template,
            recipe(spec.sampling),
            spec.retries,
            pool.identity(),
            params.seed,
            code_digest(__name__),
        )
        pool.run_sharded(
            functools.partial(translate_table, spec=spec, seed=params.seed),
            slices(table.select(["conversation_id", "instruction"]), spec.shard_size),
            out=out,
            schema=TRANSLATED,
            checkpoints=params.paths.shards,
            stage=stage,
            role="translate",
            key=key,
            metrics=params.paths.metrics_of(stage),
            statuses=("translation_status",),  # translate's own ceiling: translate.max_failure_rate
            total=-(-table.num_rows // spec.shard_size),
        )
    LOG.info(
        "translator LLM on %d first turns: %s",
        table.num_rows,
        value_counts(out, ["translation_status"]),
    )
    result.update(read_answers(out))
    return result


def read_answers(out: str | Path) -> dict[str, tuple[str | None, str]]:
    """conversation_id -> (Japanese text or None, translation status) of a translator's out."""
    done = read_table(out).to_pydict()
    ids, texts, statuses = done["conversation_id"], done["instruction_ja"], done["translation_status"]
    return dict(zip(ids, zip(texts, statuses, strict=True), strict=True))
