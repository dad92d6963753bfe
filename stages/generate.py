"""generate@<variant>: n Japanese (and n_en English) responses per non-empty, non-duplicate,
translated instruction with the variant's generator; skipped instructions get null, and each
request's status (ok, skipped_too_long, failed) is kept.

With models.<variant>.generate.source `published`, no model is loaded: the responses are those of the
variant's published file (status published; not_published where the file lacks the row)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from stages.core.config.cli import run, start, timed
from stages.core.config.params import Params
from stages.core.release import published
from stages.core.rows import fields
from stages.core.rows.responses import GENERATED, generate_table
from stages.core.runtime.executors import engine_pool
from stages.core.runtime.shards import shard_count
from stages.core.storage.jsonl import write_json
from stages.core.storage.parquet import iter_aligned, value_counts
from stages.core.storage.resume import code_digest, digest, recipe

LOG = logging.getLogger("stages.generate")
COLUMNS = [  # the columns of the translated table that generate reads (and its resume key covers)
    "instruction",
    "instruction_ja",
    fields.EMPTY,
    fields.DUPLICATE,
    "translation_failed",
    "redacted",  # generate.skip_redacted
]


def take_published(params: Params, name: str, out: Path) -> None:
    """Write the variant's published responses as generate's table; no model is loaded."""
    variant, paths = params.models[name], params.paths
    with timed(LOG, f"generate@{name} from the published file") as counts:
        local, record = published.fetch(params.published, variant.release_name, paths.published)
        counts["rows"] = published.write_generated(
            paths.translated_of(variant.subset),
            local,
            out,
            with_en=variant.generate.n_en > 0,
            rows=variant.generate.shard_size,
            producer=published.producer(record),
        )
        counts.update(value_counts(out, ["status_ja", "status_en"]))
    figures = {"rows": counts["rows"], "requests": 0, "source": "published"}
    write_json({"generate": figures}, metrics_of(params, name))


def metrics_of(params: Params, name: str) -> Path:
    """data/metrics/generate-<variant>.json: what generate asked of its engines (request_metrics)."""
    return Path(params.paths.metrics_of(f"generate@{name}"))


def main() -> None:
    params, name = start("generate", __doc__, variant=True)
    spec, paths = params.models[name].generate, params.paths
    translated = paths.translated_of(params.models[name].subset)
    out = Path(paths.generated_of(name))
    if spec.source == "published":
        take_published(params, name, out)
        return
    with (
        timed(LOG, f"generate@{name}") as counts,
        engine_pool(spec.llm, params.engine, params.paths.response_cache) as pool,
    ):
        key = digest("generate", recipe(spec), pool.identity(), params.seed, code_digest("stages.generate"))
        counts["rows"] = pool.run_sharded(
            functools.partial(generate_table, spec=spec, seed=params.seed),
            iter_aligned((translated, COLUMNS), rows=spec.shard_size),
            out=out,
            schema=GENERATED,
            checkpoints=paths.shards,
            stage=f"generate@{name}",
            role="generate",
            key=key,
            metrics=metrics_of(params, name),
            statuses=("status_ja", "status_en"),
            ceiling=(f"models.{name}.generate.max_failure_rate", spec.max_failure_rate),
            total=shard_count(translated, spec.shard_size),
        )
        counts.update(value_counts(out, ["status_ja", "status_en"]))


if __name__ == "__main__":
    run(main)
