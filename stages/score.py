"""score@<variant>: one 0-10 judgement per Japanese response (-1 where unparsable), the best
response, and for variants with a second turn, a two-turn continuation from the best response."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from stages.core import judge
from stages.core.cli import start, timed
from stages.core.engines import ChatRequest, make_engine
from stages.core.io import align, read_table, sha256_file, write_table
from stages.core.params import Params
from stages.core.responses import ANNOTATION, MESSAGE, request_seed
from stages.core.second_turn import continue_conversations
from stages.core.shards import fingerprint, run_sharded

LOG = logging.getLogger("stages.score")


def annotate(engine, rows: list[dict], params: Params, name: str) -> list[list[dict] | None]:
    """Judge every response of every row; rows without responses get None."""
    spec = params.models[name].score
    pairs = [(r, resp) for r in rows for resp in (r["responses_ja"] or [])]
    requests = [
        ChatRequest(
            judge.judge_messages(spec.prompt, r["instruction_ja"], resp["content"]),
            seed=request_seed(params.seed, r["conversation_id"], "judge"),
        )
        for r, resp in pairs
    ]
    verdicts = iter(engine.chat(requests, spec.sampling))
    out = []
    for r in rows:
        if r["responses_ja"] is None:
            out.append(None)
            continue
        notes = []
        for resp in r["responses_ja"]:
            text = next(verdicts)[0].text
            notes.append(
                {
                    "response_token_length": resp["completion_tokens"],
                    "judgement": text,
                    "repetition_flag": resp["completion_tokens"] >= spec.repetition_min_tokens,
                    "preference_score": judge.parse_score(text),
                }
            )
        out.append(notes)
    return out


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
            notes = annotate(engine, part.to_pylist(), params, name)
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
                desc=f"score@{name}",
                checkpoint_root=Path(paths.checkpoints) / f"score@{name}",
            )
        scored = scored.append_column(
            "multiturn", pa.array(second_turns(table, scored, params, name), pa.list_(MESSAGE))
        )
        write_table(scored, Path(paths.scored) / f"{name}.parquet")
        counts.update(
            rows_in=table.num_rows, judged=sum(len(n or []) for n in scored["annotations"].to_pylist())
        )


def second_turns(table: pa.Table, scored: pa.Table, params: Params, name: str) -> list[list[dict] | None]:
    variant = params.models[name]
    ids = scored["conversation_id"].to_pylist()
    if variant.second_turn is None:
        return [None] * len(ids)
    rows = {r["conversation_id"]: r for r in table.to_pylist()}
    turns = [
        (c, rows[c]["instruction_ja"], rows[c]["responses_ja"][b]["content"])
        for c, b in zip(ids, scored["best_index"].to_pylist(), strict=True)
        if b is not None
    ]
    LOG.info("second turn for %d conversations with a best response", len(turns))
    if not turns:
        return [None] * len(ids)
    with make_engine(variant.generate.llm, params.engine) as engine:
        dialogues = continue_conversations(engine, turns, variant.second_turn, variant.generate, params.seed)
    return [dialogues.get(c) for c in ids]


if __name__ == "__main__":
    main()
