"""score@<variant>: one 0-10 judgement per Japanese response (-1 where unparsable or not judged),
the best response, and for variants with a second turn, a two-turn continuation from it.

With models.<variant>.generate.source `published` and score.rejudge false, no model is loaded: the
judgements, and the multi-turn conversations, are those of the variant's published file (status
published).

Each model is loaded once: when the judge is the generator (Gemma-2), one engine serves both
passes; when they differ, the judge pass runs in its own process (or its own Ray replicas), so its
GPU memory is back before the generator loads."""

from __future__ import annotations

from stages.core.config.cli import run, start, timed
from stages.core.config.params import Params
from stages.core.release import comparison, published
from stages.core.runtime.executors import engine_pool, in_own_process
from stages.core.runtime.scoring import (
    LOG,
    check_mode,
    files_of,
    from_published,
    judge_pass,
    metrics_of,
    second_turn_pass,
)
from stages.core.storage.jsonl import write_json
from stages.core.storage.parquet import value_counts
from stages.core.storage.resume import recipe


def take_published(params: Params, name: str) -> None:
    """Write score's out from the variant's published file: its annotations, the best response by
    the judge's rule and its multi-turn conversations; no model is loaded."""
    variant, paths = params.models[name], params.paths
    *_, scored = files_of(params, name)
    with timed(LOG, f"score@{name} from the published file") as counts:
        local, record = published.fetch(params.published, variant.release_name, paths.published)
        counts["rows"] = published.write_scored(
            paths.translated_of(variant.subset),
            local,
            scored,
            record=comparison.record_schema(local)[0],
            multiturn=variant.second_turn is not None,
            rows=variant.score.shard_size,
            producer=published.producer(record),
        )
        counts.update(value_counts(scored, ["multiturn_status"]))
    figures = {"rows": counts["rows"], "requests": 0, "source": "published"}
    write_json({"judge": figures}, metrics_of(params, name))


def main() -> None:
    params, name = start("score", __doc__, variant=True, check=check_mode)
    variant = params.models[name]
    if from_published(params, name):
        take_published(params, name)
        return
    if variant.second_turn is None:
        judge_pass(params, name)
        return
    judge, generator = variant.score.llm, variant.generate.llm
    if recipe(judge) == recipe(generator):  # one model: one load serves both passes
        with engine_pool(generator, params.engine, params.paths.response_cache) as pool:
            judge_pass(params, name, pool)
            second_turn_pass(params, name, pool)
        return
    if params.engine.executor == "local":
        in_own_process(judge_pass, params, name, what=f"score@{name}: the judge pass ({judge.model})")
    else:  # Ray: the judge's replicas end (and free their GPUs) when its pool closes
        judge_pass(params, name)
    with engine_pool(generator, params.engine, params.paths.response_cache) as pool:
        second_turn_pass(params, name, pool)


if __name__ == "__main__":
    run(main)
