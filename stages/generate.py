"""generate@<variant>: n Japanese (and n_en English) responses per non-empty, non-duplicate
instruction with the variant's generator; skipped instructions get null."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from stages.core.cli import run, start, timed
from stages.core.engines import ChatRequest, make_engine
from stages.core.io import iter_aligned, sha256_file
from stages.core.prompts import with_system
from stages.core.responses import RESPONSES, as_rows, request_seed
from stages.core.shards import fingerprint, run_sharded, shard_count

LOG = logging.getLogger("stages.generate")
COLUMNS = [
    "instruction",
    "instruction_ja",
    "empty_user_instruction_ja",
    "duplicate_user_instruction_ja",
]


def eligible(row: dict) -> bool:
    """Empty and duplicate instructions get no responses."""
    return not row["empty_user_instruction_ja"] and row["duplicate_user_instruction_ja"] is None


def responses(engine, rows: list[dict], field: str, n: int, spec, seed: int, purpose: str) -> list:
    """n completions for each row's `field` (None where the row is skipped or n is 0)."""
    todo = [r for r in rows if eligible(r)] if n else []
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
        key = fingerprint(sha256_file(paths.translated), spec, params.engine, params.seed)

        def shard(part: pa.Table, _: int) -> pa.Table:
            rows = part.to_pylist()
            for row in rows:
                row["generate"] = (
                    not row["empty_user_instruction_ja"] and row["duplicate_user_instruction_ja"] is None
                )
            ja = responses(engine, rows, "instruction_ja", spec.n_ja, spec, params.seed, "ja")
            en = responses(engine, rows, "instruction", spec.n_en, spec, params.seed, "en")
            counts["instructions_generated_now"] += sum(map(eligible, rows))
            return pa.table(
                {
                    "conversation_id": part["conversation_id"],
                    "responses_ja": pa.array(ja, RESPONSES),
                    "responses_en": pa.array(en, RESPONSES),
                }
            )

        total = shard_count(paths.translated, spec.shard_size)
        with make_engine(spec.llm, params.engine) as engine:
            counts["rows"] = run_sharded(
                iter_aligned((paths.translated, COLUMNS), rows=spec.shard_size),
                shard,
                out=Path(paths.generated) / f"{name}.parquet",
                checkpoints=paths.checkpoints,
                stage=f"generate@{name}",
                key=key,
                total=total,
            )


if __name__ == "__main__":
    run(main)
