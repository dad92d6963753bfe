"""translate: join the first-turn table with the released Japanese instructions, translate the
ones the release lacks (translator LLM) and flag empty, duplicate and template instructions."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from stages.core import annotate
from stages.core.cli import run, start, timed
from stages.core.engines import ChatRequest, make_engine
from stages.core.io import read_table, sha256_file, write_table
from stages.core.params import Params
from stages.core.prompts import user_turn
from stages.core.shards import fingerprint, run_sharded, slices

LOG = logging.getLogger("stages.translate")


def translate_missing(table: pa.Table, params: Params) -> pa.Table:
    """Translate rows whose `instruction_ja` is null with the translator LLM, shard by shard."""
    spec = params.translate
    key = fingerprint(
        sha256_file(params.paths.first_turn),
        sha256_file(params.paths.instructions),
        spec,
        params.engine,
        params.seed,
    )

    def shard(rows: pa.Table, _: int) -> pa.Table:
        originals = rows["instruction"].to_pylist()
        todo = [t for t in originals if t and t.strip()]  # an empty turn translates to empty
        requests = [ChatRequest(user_turn(spec.prompt, text=t), seed=params.seed) for t in todo]
        done = iter(c[0].text.strip() for c in engine.chat(requests, spec.sampling))
        texts = [next(done) if t and t.strip() else "" for t in originals]
        return pa.table({"conversation_id": rows["conversation_id"], "instruction_ja": texts})

    out = Path(params.paths.checkpoints) / "translate.parquet"
    with make_engine(spec.llm, params.engine) as engine:
        run_sharded(
            slices(table, spec.shard_size),
            shard,
            out=out,
            checkpoints=params.paths.checkpoints,
            stage="translate",
            key=key,
        )
    return read_table(out)


def fill_translations(first: pa.Table, released: pa.Table, params: Params) -> pa.Table:
    table = first.join(released, "conversation_id", join_type="left outer").sort_by([("row", "ascending")])
    found = pc.is_valid(table["instruction_ja"])
    missing = table.filter(pc.invert(found))
    LOG.info(
        "released translations for %d of %d conversations", table.num_rows - missing.num_rows, table.num_rows
    )
    source = pc.if_else(found, "released", params.translate.missing)
    table = table.append_column("instruction_source", source)
    if missing.num_rows == 0 or params.translate.missing == "drop":
        return table.filter(found)
    if params.translate.missing == "error":
        ids = ", ".join(missing["conversation_id"].to_pylist()[:5])
        raise ValueError(
            f"{missing.num_rows} conversations have no released translation (e.g. {ids}); "
            "set translate.missing to llm or drop"
        )
    llm = dict(zip(*translate_missing(missing, params).to_pydict().values(), strict=True))
    merged = [
        t if t is not None else llm[c]
        for c, t in zip(
            table["conversation_id"].to_pylist(), table["instruction_ja"].to_pylist(), strict=True
        )
    ]
    return table.set_column(table.column_names.index("instruction_ja"), "instruction_ja", pa.array(merged))


def main() -> None:
    params, _ = start("translate", __doc__)
    paths = params.paths
    with timed(LOG, "translate") as counts:
        first = read_table(paths.first_turn)
        first = first.append_column("row", pa.array(range(first.num_rows), pa.int64()))
        table = fill_translations(first, read_table(paths.instructions), params).drop_columns(["row"])
        ids, texts = table["conversation_id"].to_pylist(), table["instruction_ja"].to_pylist()
        templates = annotate.compile_templates(params.translate.templates)
        table = (
            table.append_column("empty_user_instruction_ja", pa.array(annotate.empty_flags(texts)))
            .append_column(
                "duplicate_user_instruction_ja", pa.array(annotate.duplicate_of(ids, texts), pa.string())
            )
            .append_column(
                "is_template_instruction",
                pa.array(
                    [annotate.template_category(t, templates) for t in table["instruction"].to_pylist()],
                    pa.string(),
                ),
            )
        )
        write_table(table, paths.translated)
        counts.update(rows_in=first.num_rows, rows_out=table.num_rows)


if __name__ == "__main__":
    run(main)
