"""score@<variant>: one 0-10 judgement per Japanese response (-1 where unparsable), the best
response, and for variants with a second turn, a two-turn continuation from the best response."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from stages.core import judge
from stages.core.cli import start, timed
from stages.core.engines import ChatRequest, Engine, make_engine
from stages.core.io import align, read_table, sha256_file, write_table
from stages.core.params import Params
from stages.core.responses import ANNOTATION, MESSAGE, request_seed
from stages.core.second_turn import best_answers, continue_conversations
from stages.core.shards import fingerprint, run_sharded

LOG = logging.getLogger("stages.score")


def judge_rows(engine: Engine, rows: list[dict], params: Params, name: str) -> list[list[dict] | None]:
    """Judge every response of every row (one batched engine call); rows without responses get None."""
    spec = params.models[name].score
    requests = [
        ChatRequest(
            judge.judge_messages(spec.prompt, r["instruction_ja"], response["content"]),
            seed=request_seed(params.seed, r["conversation_id"], "judge"),
        )
        for r in rows
        for response in r["responses_ja"] or []
    ]
    verdicts = iter(c[0].text for c in engine.chat(requests, spec.sampling))
    return [
        None
        if r["responses_ja"] is None
        else judge.annotations(
            r["responses_ja"], [next(verdicts) for _ in r["responses_ja"]], spec.repetition_min_tokens
        )
        for r in rows
    ]


def main() -> None:
    params, name = start("score", __doc__, variant=True)
    variant, paths = params.models[name], params.paths
    generated = Path(paths.generated) / f"{name}.parquet"
    with timed(LOG, f"score@{name}") as counts:
        table = align(
            read_table(paths.translated, columns=["conversation_id", "instruction_ja"]),
            read_table(generated),
            ["responses_ja"],
            str(generated),
        )
        key = fingerprint(
            sha256_file(generated), sha256_file(paths.translated), variant.score, params.engine, params.seed
        )

        def shard(part: pa.Table, _: int) -> pa.Table:
            notes = judge_rows(engine, part.to_pylist(), params, name)
            best = [
                None if n is None else judge.best_index([x["preference_score"] for x in n]) for n in notes
            ]
            return pa.table(
                {
                    "conversation_id": part["conversation_id"],
                    "annotations": pa.array(notes, pa.list_(ANNOTATION)),
                    "best_index": pa.array(best, pa.int64()),
                }
            )

        with make_engine(variant.score.llm, params.engine) as engine:
            scored = run_sharded(
                table,
                shard,
                shard_size=variant.score.shard_size,
                key=key,
                checkpoints=paths.checkpoints,
                stage=f"score@{name}",
            )
        scored = scored.append_column(
            "multiturn",
            pa.array(second_turns(table, scored["best_index"].to_pylist(), params, name), pa.list_(MESSAGE)),
        )
        write_table(scored, Path(paths.scored) / f"{name}.parquet")
        counts.update(
            rows_in=table.num_rows, judged=sum(len(n or []) for n in scored["annotations"].to_pylist())
        )


def second_turns(table: pa.Table, best: list[int | None], params: Params, name: str) -> list | None:
    """The generator's two-turn continuation from each best response (None without one)."""
    variant = params.models[name]
    turns = best_answers(table.to_pylist(), best) if variant.second_turn else []
    LOG.info("second turn for %d conversations with a best response", len(turns))
    if not turns:
        return [None] * table.num_rows
    with make_engine(variant.generate.llm, params.engine) as engine:
        dialogues = continue_conversations(engine, turns, variant.second_turn, variant.generate, params.seed)
    return [dialogues.get(c) for c in table["conversation_id"].to_pylist()]


if __name__ == "__main__":
    main()
