"""fetch: copy LMSYS-Chat-1M and the released encrypted instructions (checksums verified), then
write the filtered first-turn table and a manifest with per-rule row counts."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core.cli import start, timed
from stages.core.first_turn import write_first_turns
from stages.core.io import write_json
from stages.core.source import fetch_files

LOG = logging.getLogger("stages.fetch")


def main() -> None:
    params, _ = start("fetch", __doc__)
    spec, paths = params.fetch, params.paths
    with timed(LOG, "fetch") as counts:
        source = fetch_files(spec.source, paths.source)
        released = fetch_files(spec.released, paths.released)
        counts["files"] = len(source) + len(released)
    files = [Path(paths.source) / item["path"] for item in source]
    with timed(LOG, "filter first turns") as counts:
        rows = write_first_turns(files, spec.filter, Path(paths.first_turn))
        counts.update(rows_in=rows["rows_in"], rows_out=rows["rows_out"])
    write_json(
        {"rows": dict(sorted(rows.items())), "source": source, "released": released},
        Path(paths.metrics) / "fetch.json",
    )


if __name__ == "__main__":
    main()
