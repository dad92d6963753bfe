"""generate@<variant>: n Japanese (and n_en English) responses per non-empty, non-duplicate,
translated instruction with the variant's generator; skipped instructions get null, and each
request's status (ok, skipped_too_long, failed) is kept."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from stages.core.cli import run, start, timed
from stages.core.executors import engine_pool
from stages.core.io import iter_aligned, value_counts
from stages.core.responses import GENERATED, generate_table
from stages.core.resume import code_digest, digest, recipe
from stages.core.shards import shard_count

LOG = logging.getLogger("stages.generate")
COLUMNS = [  # the columns of the translated table that generate reads (and its resume key covers)
    "instruction",
    "instruction_ja",
    "empty_user_instruction_ja",
    "duplicate_user_instruction_ja",
    "translation_failed",
]


def main() -> None:
    params, name = start("generate", __doc__, variant=True)
    spec, paths = params.models[name].generate, params.paths
    out = Path(paths.generated) / f"{name}.parquet"
    with (
        timed(LOG, f"generate@{name}") as counts,
        engine_pool(spec.llm, params.engine, params.paths.response_cache) as pool,
    ):
        key = digest("generate", recipe(spec), pool.identity(), params.seed, code_digest("stages.generate"))
        counts["rows"] = pool.run_sharded(
            functools.partial(generate_table, spec=spec, seed=params.seed),
            iter_aligned((paths.translated, COLUMNS), rows=spec.shard_size),
            out=out,
            schema=GENERATED,
            checkpoints=paths.shards,
            stage=f"generate@{name}",
            role="generate",
            key=key,
            total=shard_count(paths.translated, spec.shard_size),
        )
        counts.update(value_counts(out, ["status_ja", "status_en"]))


if __name__ == "__main__":
    run(main)
