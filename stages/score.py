"""score@<variant>: one 0-10 judgement per Japanese response (-1 where unparsable), the best
response, and for variants with a second turn, a two-turn continuation from the best response."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from stages.core import judge
from stages.core.cli import run, start, timed
from stages.core.engines import ChatRequest, Engine, make_engine
from stages.core.io import iter_aligned, sha256_file
from stages.core.params import Params
from stages.core.responses import ANNOTATION, MESSAGE, request_seed
from stages.core.second_turn import best_answers, continue_conversations
from stages.core.shards import fingerprint, run_sharded, shard_count

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


def judge_shard(engine: Engine, part: pa.Table, params: Params, name: str) -> pa.Table:
    notes = judge_rows(engine, part.to_pylist(), params, name)
    best = [None if n is None else judge.best_index([x["preference_score"] for x in n]) for n in notes]
    table = pa.table(
        {
            "conversation_id": part["conversation_id"],
            "annotations": pa.array(notes, pa.list_(ANNOTATION)),
            "best_index": pa.array(best, pa.int64()),
        }
    )
    if params.models[name].second_turn is None:  # no second pass: the column stays null
        table = table.append_column("multiturn", pa.nulls(table.num_rows, pa.list_(MESSAGE)))
    return table


def second_turn_shard(engine: Engine, part: pa.Table, params: Params, name: str) -> pa.Table:
    """The generator's two-turn continuation from each best response (null without one)."""
    variant, rows = params.models[name], part.to_pylist()
    turns = best_answers(rows, [r["best_index"] for r in rows])
    dialogues = continue_conversations(engine, turns, variant.second_turn, variant.generate, params.seed)
    multiturn = pa.array([dialogues.get(r["conversation_id"]) for r in rows], pa.list_(MESSAGE))
    return part.select(["conversation_id", "annotations", "best_index"]).append_column("multiturn", multiturn)


def main() -> None:
    params, name = start("score", __doc__, variant=True)
    variant, paths = params.models[name], params.paths
    generated, scored = Path(paths.generated) / f"{name}.parquet", Path(paths.scored) / f"{name}.parquet"
    inputs = [(paths.translated, ["instruction_ja"]), (generated, ["responses_ja"])]
    size = variant.score.shard_size
    total = shard_count(generated, size)
    with timed(LOG, f"score@{name}") as counts:
        key = fingerprint(
            sha256_file(generated), sha256_file(paths.translated), variant.score, params.engine, params.seed
        )
        judged = scored if variant.second_turn is None else Path(paths.checkpoints) / f"score@{name}.parquet"
        with make_engine(variant.score.llm, params.engine) as engine:
            counts["rows"] = run_sharded(
                iter_aligned(*inputs, rows=size),
                lambda part, _: judge_shard(engine, part, params, name),
                out=judged,
                checkpoints=paths.checkpoints,
                stage=f"score@{name}",
                key=key,
                total=total,
            )
        if variant.second_turn is None:
            return
        key = fingerprint(
            sha256_file(judged), variant.second_turn, variant.generate, params.engine, params.seed
        )
        with make_engine(variant.generate.llm, params.engine) as engine:
            run_sharded(
                iter_aligned(*inputs, (judged, ["annotations", "best_index"]), rows=size),
                lambda part, _: second_turn_shard(engine, part, params, name),
                out=scored,
                checkpoints=paths.checkpoints,
                stage=f"second-turn@{name}",
                key=key,
                total=total,
            )


if __name__ == "__main__":
    run(main)
