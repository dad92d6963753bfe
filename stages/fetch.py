"""fetch: copy LMSYS-Chat-1M and the released encrypted instructions (checksums verified), then
write the filtered first-turn table, a manifest of every file, and per-rule row counts
(data/metrics/fetch.json: `rows` by rule, and `max_instruction_chars`, the longest kept first turn).

All or nothing: files are staged and take their place only when every check has passed."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core.config.cli import run, start, timed
from stages.core.rows.first_turn import MAX_CHARS, write_first_turns
from stages.core.storage.io import staged_dir, write_json
from stages.core.storage.source import fetch_files

LOG = logging.getLogger("stages.fetch")


def main() -> None:
    params, _ = start("fetch", __doc__)
    spec, paths = params.fetch, params.paths
    with staged_dir(paths.source) as source_dir, staged_dir(paths.released) as released_dir:
        with timed(LOG, "fetch") as counts:
            source = fetch_files(spec.source, source_dir)
            released = fetch_files(spec.released, released_dir)
            counts.update(files=len(source) + len(released), bytes=sum(f["size"] for f in source + released))
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
