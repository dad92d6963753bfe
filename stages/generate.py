"""generate@<variant>: n Japanese (and n_en English) responses per non-empty, non-duplicate
instruction with the variant's generator; skipped instructions get null."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from stages.core.cli import start, timed
from stages.core.engines import ChatRequest, make_engine
from stages.core.io import read_table, sha256_file, write_table
from stages.core.prompts import with_system
from stages.core.responses import RESPONSES, as_rows, request_seed
from stages.core.shards import fingerprint, run_sharded

LOG = logging.getLogger("stages.generate")
COLUMNS = [
    "conversation_id",
    "instruction",
    "instruction_ja",
    "empty_user_instruction_ja",
    "duplicate_user_instruction_ja",
]


def responses(engine, rows: list[dict], field: str, n: int, spec, seed: int, purpose: str) -> list:
    """n completions for each row's `field` (None where the row is skipped or n is 0)."""
    todo = [r for r in rows if r["generate"]] if n else []
    requests = [
        ChatRequest(
            with_system(spec.system_prompt, [{"role": "user", "content": r[field]}]),
            n=n,
            seed=request_seed(seed, r["conversation_id"], purpose),
        )
        for r in todo
    ]
    done = dict(zip((r["conversation_id"] for r in todo), engine.chat(requests, spec.sampling), strict=True))
    return [as_rows(done[r["conversation_id"]]) if r["conversation_id"] in done else None for r in rows]


def main() -> None:
    params, name = start("generate", __doc__, variant=True)
    spec, paths = params.models[name].generate, params.paths
    with timed(LOG, f"generate@{name}") as counts:
        table = read_table(paths.translated, columns=COLUMNS)
        eligible = pc.and_(
            pc.invert(table["empty_user_instruction_ja"]), pc.is_null(table["duplicate_user_instruction_ja"])
        )
        table = table.append_column("generate", eligible)
        key = fingerprint(sha256_file(paths.translated), spec, params.engine, params.seed)

        def shard(part: pa.Table, _: int) -> pa.Table:
            rows = part.to_pylist()
            ja = responses(engine, rows, "instruction_ja", spec.n_ja, spec, params.seed, "ja")
            en = responses(engine, rows, "instruction", spec.n_en, spec, params.seed, "en")
            return pa.table(
                {
                    "conversation_id": part["conversation_id"],
                    "responses_ja": pa.array(ja, RESPONSES),
                    "responses_en": pa.array(en, RESPONSES),
                }
            )

        with make_engine(spec.llm, params.engine) as engine:
            out = run_sharded(
                table,
                shard,
                shard_size=spec.shard_size,
                key=key,
                checkpoints=paths.checkpoints,
                stage=f"generate@{name}",
            )
        write_table(out, Path(paths.generated) / f"{name}.parquet")
        counts.update(rows_in=table.num_rows, generated_for=pc.sum(eligible).as_py() or 0)


if __name__ == "__main__":
    main()
