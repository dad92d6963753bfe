"""fetch: copy LMSYS-Chat-1M and the released encrypted instructions (checksums verified), then
write the filtered first-turn table, a manifest of every file, and per-rule row counts
(data/metrics/fetch.json: `rows` by rule, and `max_instruction_chars`, the longest kept first turn).

Where a variant scores with the release's own judge prompt (models.<v>.score.prompt `published`), its
materials/judge_prompt.jsonl is read here: a shape this project cannot read stops the run before any
model is loaded. All or nothing: files are staged and take their place only when every check has passed."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core.config.cli import run, start, timed
from stages.core.config.params import Params
from stages.core.rows.first_turn import MAX_CHARS, write_first_turns
from stages.core.rows.prompts import OURS, PUBLISHED, PUBLISHED_FILE, JudgePromptError, read_judge_prompt
from stages.core.storage.atomic import staged_dir
from stages.core.storage.jsonl import write_json
from stages.core.storage.source import fetch_files

LOG = logging.getLogger("stages.fetch")


def check_judge_prompt(params: Params, released: list[dict], released_dir: Path) -> None:
    """Read the release's judge prompt where a variant scores with it (score.prompt `published`):
    JudgePromptError, one line with the fix, where it was not fetched or has a shape not read here."""
    keys = [f"models.{name}.score.prompt" for name, v in params.models.items() if v.score.prompt == PUBLISHED]
    if not keys:
        return
    fix = f"or set {', '.join(keys)} to {OURS} (our prompt, stages/prompts/{OURS}.txt; conf/judge/)"
    if PUBLISHED_FILE not in {item["path"] for item in released}:
        raise JudgePromptError(
            f"{', '.join(keys)}: {PUBLISHED}, but fetch.released.include took no {PUBLISHED_FILE} from "
            f"{params.fetch.released.uri}: add it to fetch.released.include (conf/source/), {fix}"
        )
    name = f"{params.fetch.released.uri.rstrip('/')}/{PUBLISHED_FILE}"  # as fetched, not the staged copy
    read_judge_prompt(released_dir / PUBLISHED_FILE, fix=fix.removeprefix("or "), name=name)


def main() -> None:
    params, _ = start("fetch", __doc__)
    spec, paths = params.fetch, params.paths
    with staged_dir(paths.source) as source_dir, staged_dir(paths.released) as released_dir:
        with timed(LOG, "fetch") as counts:
            source = fetch_files(spec.source, source_dir, paths.fetched)  # pinned files: downloaded once
            released = fetch_files(spec.released, released_dir, paths.fetched)
            counts.update(files=len(source) + len(released), bytes=sum(f["size"] for f in source + released))
        check_judge_prompt(params, released, released_dir)
        with timed(LOG, "filter first turns") as counts:
            files = [source_dir / item["path"] for item in source]
            names = [f"{spec.source.uri.rstrip('/')}/{item['path']}" for item in source]  # as in errors
            rows = write_first_turns(files, spec.filter, Path(paths.first_turn), names)
            counts.update(rows_in=rows["rows_in"], rows_out=rows["rows_out"])
    write_json(
        {
            key: {"uri": s.uri, "revision": s.revision, "files": files}
            for key, s, files in (("source", spec.source, source), ("released", spec.released, released))
        },
        paths.manifest,
    )
    longest = rows.pop(MAX_CHARS, 0)
    write_json({"rows": dict(sorted(rows.items())), MAX_CHARS: longest}, paths.metrics_of("fetch"))


if __name__ == "__main__":
    run(main)
