"""generate@<variant>: n Japanese (and n_en English) responses per non-empty, non-duplicate,
translated instruction with the variant's generator; skipped instructions get null, and each
request's status (ok, skipped_too_long, failed) is kept."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from stages.core.cli import run, start, timed
from stages.core.engines import make_engine
from stages.core.io import iter_aligned
from stages.core.responses import GENERATED, RESPONSES, respond
from stages.core.resume import code_digest, digest, recipe
from stages.core.shards import run_sharded, shard_count

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
    with timed(LOG, f"generate@{name}") as counts, make_engine(spec.llm, params.engine) as engine:

        def shard(part: pa.Table, _: int) -> pa.Table:
            rows = part.to_pylist()
            ja, status_ja = respond(engine, rows, "ja", spec.n_ja, spec, params.seed, counts)
            en, status_en = respond(engine, rows, "en", spec.n_en, spec, params.seed, counts)
            return pa.table(
                [
                    part["conversation_id"],
                    pa.array(ja, RESPONSES),
                    pa.array(en, RESPONSES),
                    status_ja,
                    status_en,
                ],
                schema=GENERATED,
            )

        key = digest("generate", recipe(spec), engine.identity(), params.seed, code_digest("stages.generate"))
        counts["rows"] = run_sharded(
            iter_aligned((paths.translated, COLUMNS), rows=spec.shard_size),
            shard,
            out=Path(paths.generated) / f"{name}.parquet",
            schema=GENERATED,
            checkpoints=paths.checkpoints,
            stage=f"generate@{name}",
            key=key,
            total=shard_count(paths.translated, spec.shard_size),
        )


if __name__ == "__main__":
    run(main)
