"""generate@<variant>: n Japanese (and n_en English) responses per non-empty, non-duplicate,
translated instruction with the variant's generator; skipped instructions get null, and each
request's status (ok, skipped_too_long, failed) is kept.

First it writes the variant's annotations (its flags and two-turn ids: the published file's where
models.<variant>.annotations is `published` and the file has the row, ours elsewhere), and skips the
instructions they flag empty or duplicate.

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
from stages.core.storage.source import NoMatchError

LOG = logging.getLogger("stages.generate")
COLUMNS = [  # the columns of the translated table that generate reads (and its resume key covers)
    "instruction",
    "instruction_ja",
    "translation_failed",
    "redacted",  # generate.skip_redacted
]
FLAGS = [fields.EMPTY, fields.DUPLICATE]  # ... and of the annotation table: the rows not asked


def fetch_published(params: Params, name: str) -> tuple[Path, dict]:
    """The local copy of the variant's published file and its record (published.fetch); a file the
    publisher never released is named, with the switches that do without it."""
    variant = params.models[name]
    try:
        return published.fetch(params.published, variant.release_name, params.paths.published)
    except NoMatchError as err:
        raise NoMatchError(
            f"generate@{name}: {err}: the publisher released no file for release_name "
            f"{variant.release_name!r}. A variant of your own has no published annotations or responses: set "
            f"`annotations: ours` (models.{name}.annotations), generate.source: engine and `compare: false` "
            f"in conf/model/{name}.yaml, then python -m stages.compose"
        ) from err


def annotate(params: Params, name: str, local: Path | None) -> None:
    """Write the variant's annotation table (stages/core/release/flags.py): the flags and two-turn ids
    of the published file (`local`, where models.<name>.annotations is published) where it has the row,
    ours else."""
    # imported here, not at module level: the table is no checkpoint, its rows reach generate's shards
    # through their input digests, so its code (and compare's, which it reads the file's shape with)
    # stays out of generate's resume key (a module-level import would be in it: storage/meaning.py)
    from stages.core.release import flags

    variant, paths = params.models[name], params.paths
    with timed(LOG, f"generate@{name}: annotations ({variant.annotations})") as counts:
        found = flags.write_annotations(
            paths.translated_of(variant.subset),
            local,
            paths.annotations_of(name),
            rows=variant.generate.shard_size,
        )
        counts.update({f"annotated_by:{by}": n for by, n in found.items()})


def take_published(params: Params, name: str, out: Path, fetched: tuple[Path, dict]) -> None:
    """Write the variant's published responses (`fetched`: its published file) as generate's table; no
    model is loaded."""
    variant, paths = params.models[name], params.paths
    with timed(LOG, f"generate@{name} from the published file") as counts:
        local, record = fetched
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
    theirs = params.models[name].annotations == "published"
    fetched = fetch_published(params, name) if theirs or spec.source == "published" else None
    annotate(params, name, fetched[0] if theirs else None)
    if spec.source == "published":
        take_published(params, name, out, fetched)
        return
    with (
        timed(LOG, f"generate@{name}") as counts,
        engine_pool(spec.llm, params.engine, params.paths.response_cache) as pool,
    ):
        key = digest("generate", recipe(spec), pool.identity(), params.seed, code_digest("stages.generate"))
        counts["rows"] = pool.run_sharded(
            functools.partial(generate_table, spec=spec, seed=params.seed),
            iter_aligned((translated, COLUMNS), (paths.annotations_of(name), FLAGS), rows=spec.shard_size),
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
