"""Production-shaped inputs for benchmarks/scale.py, written next to a finished earlier stage.

    python -m benchmarks.scale_data translate WORKDIR   # a released translation of every first turn
    python -m benchmarks.scale_data package WORKDIR     # 10 responses per instruction, and annotations

Seeded; streamed in pieces, so generating a million rows needs little memory. Texts come from a
pool and are made unique by a suffix, so Parquet cannot dictionary-encode them away.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from stages.core.release import flags
from stages.core.rows.responses import ANNOTATION, GENERATED, RESPONSE, SCORED
from stages.core.storage.jsonl import write_json
from stages.core.storage.parquet import PARQUET_OPTIONS

PIECE = 2000  # rows per written row group (as the sharded stages write them)
N_RESPONSES = 10
SENTENCE = "この応答は日本語で書かれた説明の一文で、長さは応答ごとに変わります。"
# what the responses and judgements say: not the instructions' text, which package's licence guard
# refuses in a public file (stages/core/release/leaks.py)
ANSWER = "The model answers in one sentence of its own, repeated to the length of each response."
POOL = 512


def _texts(
    rng: np.random.Generator, n: int, sentences: tuple[int, int], tag: str, sentence: str = SENTENCE
) -> pa.Array:
    pool = pa.array([sentence * int(k) for k in rng.integers(*sentences, POOL)])
    base = pool.take(pa.array(rng.integers(0, POOL, n)))
    return pc.binary_join_element_wise(
        base, pa.array([tag] * n), pc.cast(pa.array(np.arange(n)), pa.string()), " "
    )


def released(work: Path, paths: dict) -> None:
    """A translation of every first turn, in another order than the first-turn table's."""
    rng, ids = (
        np.random.default_rng(1),
        pq.read_table(work / paths["first_turn"], columns=["conversation_id"]),
    )
    ids = ids["conversation_id"].take(pa.array(rng.permutation(ids.num_rows)))
    schema = pa.schema([("conversation_id", pa.string()), ("instruction_ja", pa.string())])
    instructions = work / f"{paths['instructions']}-ja.parquet"  # decrypt@ja's out
    instructions.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(instructions, schema, **PARQUET_OPTIONS) as writer:
        for start in range(0, len(ids), PIECE):
            part = ids.slice(start, PIECE)
            writer.write_table(pa.table([part, _texts(rng, len(part), (1, 6), f"i{start}")], schema=schema))


def _listed(values: pa.Array, n: int) -> pa.ListArray:
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * N_RESPONSES + 1, N_RESPONSES, dtype=np.int32)), values
    )


def _generated(rng: np.random.Generator, ids: pa.Array, start: int) -> pa.Table:
    k = len(ids) * N_RESPONSES
    tokens = pa.array(rng.integers(10, 2500, k))
    responses = pa.StructArray.from_arrays(
        [
            _texts(rng, k, (3, 40), f"r{start}", ANSWER),
            pa.array(["stop"] * k),
            pa.array(np.full(k, 60)),
            tokens,
        ],
        fields=list(RESPONSE),
    )
    nulls = pa.nulls(len(ids), GENERATED.field("responses_en").type)
    return pa.table(
        [
            ids,
            _listed(responses, len(ids)),
            nulls,
            pa.array(["ok"] * len(ids)),
            pa.nulls(len(ids), pa.string()),
        ],
        schema=GENERATED,
    )


def _scored(rng: np.random.Generator, generated: pa.Table, start: int) -> pa.Table:
    n, k = generated.num_rows, generated.num_rows * N_RESPONSES
    tokens = pc.list_flatten(generated["responses_ja"]).combine_chunks().field("completion_tokens")
    notes = pa.StructArray.from_arrays(
        [
            tokens,
            _texts(rng, k, (2, 8), f"j{start}", ANSWER),
            pc.greater(tokens, 2000),
            pa.array(rng.integers(0, 11, k).astype(float)),
        ],
        fields=list(ANNOTATION),
    )
    status = _listed(pa.array(["ok"] * k), n)
    empty = pa.nulls(n, SCORED.field("multiturn").type)
    return pa.table(
        [
            generated["conversation_id"],
            _listed(notes, n),
            pa.array(rng.integers(0, N_RESPONSES, n)),
            status,
            empty,
            pa.nulls(n, pa.string()),
        ],
        schema=SCORED,
    )


def responses(work: Path, paths: dict, variant: str) -> None:
    """Ten responses per translated instruction, and one annotation per response."""
    rng = np.random.default_rng(2)
    translated = pq.ParquetFile(work / f"{paths['translated']}-ja.parquet")  # translate@ja's out
    for folder in (paths["generated"], paths["scored"]):
        (work / folder).mkdir(parents=True, exist_ok=True)
    with (
        pq.ParquetWriter(
            work / paths["generated"] / f"{variant}.parquet", GENERATED, **PARQUET_OPTIONS
        ) as gen,
        pq.ParquetWriter(work / paths["scored"] / f"{variant}.parquet", SCORED, **PARQUET_OPTIONS) as scored,
    ):
        start = 0
        for batch in translated.iter_batches(batch_size=PIECE, columns=["conversation_id"]):
            generated = _generated(rng, batch.column(0), start)
            gen.write_table(generated)
            scored.write_table(_scored(rng, generated, start))
            start += batch.num_rows
    # generate's other out, the annotation table package reads the flags from: translate's (annotations:
    # ours, as scale.py composes it), written by the code generate runs
    flags.write_annotations(
        work / f"{paths['translated']}-ja.parquet",
        None,
        work / paths["generated"] / f"{variant}.annotations.parquet",
        rows=PIECE,
    )
    # the metrics files generate and score also write (DVC outs of theirs: `dvc commit` wants them)
    metrics = work / paths["metrics"]
    metrics.mkdir(parents=True, exist_ok=True)
    requests = {"requests": start, "from_cache": 0, "sent": start}
    write_json({"generate": requests}, metrics / f"generate-{variant}.json")
    write_json({"judge": requests}, metrics / f"score-{variant}.json")


def main() -> None:
    stage, work = sys.argv[1], Path(sys.argv[2])
    paths = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))["paths"]
    if stage == "translate":
        released(work, paths)
    else:
        responses(work, paths, "gemma3")


if __name__ == "__main__":
    main()
