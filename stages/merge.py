"""merge@<variant>: <paths.merged>/<variant>.jsonl.gz, the variant's public release records in release
order, each with its Japanese instruction (translated_conversation) and its conversation's LMSYS-Chat-1M
columns (model, conversation, turn, language, openai_moderation, redacted): what the published merge
scripts make as <release_name>-lmsys-chat-1m-synth.jsonl.gz, and what the published SFT converter's
--exclude_pii reads. Counts in <paths.metrics>/merge-<variant>.json. It holds LMSYS-Chat-1M text:
private remote only. Optional: no stage depends on it (`dvc repro merge@<variant>` builds it)."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core.config.cli import run, start, timed
from stages.core.config.params import Params
from stages.core.release import merged
from stages.core.release.files import public_file
from stages.core.storage.jsonl import write_json

LOG = logging.getLogger("stages.merge")


def release_file(params: Params, name: str) -> Path:
    """The release's jsonl.gz that merge reads; SourceError when release.formats leaves it out."""
    hint = f"merge reads the jsonl.gz (release.formats must list it): run `dvc repro package@{name}`"
    return public_file(params, name, formats=("jsonl.gz",), hint=hint)


def main() -> None:
    params, name = start("merge", __doc__, variant=True)
    release, paths = release_file(params, name), params.paths
    lmsys = merged.lmsys_files(paths.source, params.fetch.source.include)
    out = Path(paths.merged) / f"{name}.jsonl.gz"
    with timed(LOG, f"merge@{name}") as counts:
        metrics = merged.write_merged(release, paths.translated_of(params.models[name].subset), lmsys, out)
        counts.update(rows_in=metrics["rows"], rows_out=metrics["rows"])
        counts.update(rows_without_lmsys=metrics["rows_without_lmsys"])
    if metrics["rows_without_lmsys"]:
        LOG.warning(
            "%d released conversations are not in %s: their LMSYS columns are null",
            metrics["rows_without_lmsys"],
            paths.source,
        )
    write_json(metrics, paths.metrics_of(f"merge@{name}"))


if __name__ == "__main__":
    run(main)
