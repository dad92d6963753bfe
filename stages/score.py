"""score@<variant>: one 0-10 judgement per Japanese response (-1 where unparsable or not judged),
the best response, and for variants with a second turn, a two-turn continuation from it."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core.cli import run, start, timed
from stages.core.engines import make_engine
from stages.core.io import iter_aligned
from stages.core.judge import judge_table
from stages.core.prompts import template
from stages.core.responses import JUDGED, SCORED
from stages.core.resume import code_digest, digest, recipe
from stages.core.second_turn import second_turn_table
from stages.core.shards import run_sharded, shard_count

LOG = logging.getLogger("stages.score")


def main() -> None:
    params, name = start("score", __doc__, variant=True)
    variant, paths = params.models[name], params.paths
    generated, scored = Path(paths.generated) / f"{name}.parquet", Path(paths.scored) / f"{name}.parquet"
    inputs = [(paths.translated, ["instruction_ja"]), (generated, ["responses_ja"])]
    size, code = variant.score.shard_size, code_digest("stages.score")
    common = {"schema": SCORED, "checkpoints": paths.checkpoints, "total": shard_count(generated, size)}
    judged = scored if variant.second_turn is None else Path(paths.checkpoints) / f"score@{name}.parquet"
    with timed(LOG, f"score@{name}") as counts, make_engine(variant.score.llm, params.engine) as engine:
        key = digest(
            "score",
            recipe(variant.score),
            template(variant.score.prompt).template,
            engine.identity(),
            params.seed,
            code,
        )
        counts["rows"] = run_sharded(
            iter_aligned(*inputs, rows=size),
            lambda part, _: judge_table(engine, part, variant.score, params.seed),
            out=judged,
            stage=f"score@{name}",
            key=key,
            **common,
        )
    if variant.second_turn is None:
        return
    with timed(LOG, f"second-turn@{name}"), make_engine(variant.generate.llm, params.engine) as engine:
        key = digest(
            "second-turn",
            recipe(variant.second_turn),
            template(variant.second_turn.prompt).template,
            variant.generate.system_prompt,
            engine.identity(),
            params.seed,
            code,
        )
        run_sharded(
            iter_aligned(*inputs, (judged, JUDGED), rows=size),
            lambda part, _: second_turn_table(
                engine, part, variant.second_turn, variant.generate, params.seed
            ),
            out=scored,
            stage=f"second-turn@{name}",
            key=key,
            **common,
        )


if __name__ == "__main__":
    run(main)
