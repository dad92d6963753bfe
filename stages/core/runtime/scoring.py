"""score@<variant>'s passes: the judge over every Japanese response, the second turn from the best
response, or the published judgements taken as they are (generate.source published, no rejudge);
each on an engine pool of its own or on one it is given."""

from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from pathlib import Path

from stages.core.config.cli import timed
from stages.core.config.params import Params, ParamsError
from stages.core.engines import STRUCTURED_OUTPUT
from stages.core.rows.judge import judge_table
from stages.core.rows.prompts import template
from stages.core.rows.responses import JUDGED, SCORED
from stages.core.rows.second_turn import second_turn_table
from stages.core.runtime.executors import Executor, engine_pool
from stages.core.runtime.shards import shard_count
from stages.core.storage.parquet import iter_aligned
from stages.core.storage.resume import code_digest, digest, recipe

LOG = logging.getLogger("stages.score")


def files_of(params: Params, name: str) -> tuple[Path, Path, Path]:
    """generate's out, the judge pass's out and score's out of variant `name`."""
    paths, variant = params.paths, params.models[name]
    scored = Path(paths.scored_of(name))
    judged = scored if variant.second_turn is None else Path(paths.checkpoints) / f"score@{name}.parquet"
    return Path(paths.generated_of(name)), judged, scored


def from_published(params: Params, name: str) -> bool:
    """Whether score@`name` takes the published file's judgements (generate.source published, no rejudge)."""
    variant = params.models[name]
    return variant.generate.source == "published" and not variant.score.rejudge


def metrics_of(params: Params, name: str) -> Path:
    """data/metrics/score-<variant>.json: what the judge and the second turn asked of their engines."""
    return Path(params.paths.metrics_of(f"score@{name}"))


def check_mode(params: Params, name: str) -> None:
    """Refuse, before any work, a judge mode that the engine backend cannot serve (where a judge runs)."""
    mode, backend = params.models[name].score.mode, params.engine.backend
    if mode == "structured" and backend not in STRUCTURED_OUTPUT and not from_published(params, name):
        raise ParamsError(
            f"models.{name}.score.mode='structured' needs structured output, which engine.backend="
            f"{backend!r} does not have: use engine.backend {' or '.join(STRUCTURED_OUTPUT)}, or score.mode "
            "parse or logprob"
        )


def judge_pass(params: Params, name: str, pool: Executor | None = None) -> None:
    """Judge every Japanese response of variant `name` (on `pool`, or on an engine of its own)."""
    check_mode(params, name)
    variant, paths = params.models[name], params.paths
    generated, judged, _ = files_of(params, name)
    size = variant.score.shard_size
    with (
        timed(LOG, f"score@{name}") as counts,
        nullcontext(pool)
        if pool
        else engine_pool(variant.score.llm, params.engine, params.paths.response_cache) as pool,
    ):
        key = digest(
            "score",
            recipe(variant.score),
            template(variant.score.prompt).template,
            pool.identity(),
            params.seed,
            code_digest("stages.score"),
        )
        counts["rows"] = pool.run_sharded(
            functools.partial(judge_table, spec=variant.score, seed=params.seed),
            iter_aligned(
                (paths.translated_of(variant.subset), ["instruction_ja"]),
                (generated, ["responses_ja"]),
                rows=size,
            ),
            out=judged,
            schema=SCORED,
            checkpoints=paths.shards,
            stage=f"score@{name}",
            role="judge",
            key=key,
            metrics=metrics_of(params, name),
            statuses=("judge_status",),
            ceiling=(f"models.{name}.score.max_failure_rate", variant.score.max_failure_rate),
            total=shard_count(generated, size),
        )


def second_turn_pass(params: Params, name: str, pool: Executor) -> None:
    """The generator's two-turn continuation from each best response, on `pool` (the generator's): for
    the conversations the annotation table says are two-turn in the published file, and by the hash for
    those it has no published answer for (stages/core/rows/second_turn.py)."""
    variant, paths = params.models[name], params.paths
    generated, judged, scored = files_of(params, name)
    size = variant.score.shard_size
    with timed(LOG, f"second-turn@{name}") as counts:
        key = digest(
            "second-turn",
            recipe(variant.second_turn),
            template(variant.second_turn.prompt).template,
            variant.generate.system_prompt,
            pool.identity(),
            params.seed,
            code_digest("stages.score"),
        )
        counts["rows"] = pool.run_sharded(
            functools.partial(
                second_turn_table, spec=variant.second_turn, generate=variant.generate, seed=params.seed
            ),
            iter_aligned(
                (paths.translated_of(variant.subset), ["instruction_ja"]),
                (generated, ["responses_ja"]),
                (judged, JUDGED),
                (paths.annotations_of(name), ["two_turn"]),  # the published two-turn ids, where taken
                rows=size,
            ),
            out=scored,
            schema=SCORED,
            checkpoints=paths.shards,
            stage=f"second-turn@{name}",
            role="second_turn",
            carry=judged,
            key=key,
            metrics=metrics_of(params, name),
            statuses=("multiturn_status",),
            ceiling=(f"models.{name}.second_turn.max_failure_rate", variant.second_turn.max_failure_rate),
            total=shard_count(generated, size),
        )
