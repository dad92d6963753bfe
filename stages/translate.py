"""translate@<subset>: the subset's released Japanese instructions joined with their first turns,
flagged empty, duplicate, template and failed; data/metrics/translate-<subset>.json.
`python -m stages.translate [subset ...]` (default: every one of decrypt.subsets).

The release decides membership: every released row with a first turn is written, moderation-flagged
or not. Rows of the subset's filter (ja: not flagged; ja+unsafe: all) that the release lacks are
listed by id in Paths.not_released_of(subset) and, with translate.missing drop (faithful), not
written; llm or deepl (an extension of the dataset) translates them. Released rows without a first
turn (fetch's filter dropped them) are counted and logged. Metrics: rows by instruction_source, the
release's rows as the filter sees them, failed translations, DeepL's billed characters.

Neither table is loaded whole: the join streams in bounded memory (stages/core/rows/translation.py)."""

from __future__ import annotations

from stages.core.config.cli import run, start_subsets
from stages.core.runtime.deepl_translate import auth_key
from stages.core.runtime.translating import translate_subset


def main() -> None:
    params, subsets = start_subsets("translate", __doc__)
    if params.translate.missing == "deepl":
        auth_key(params.translate.deepl)  # a missing key stops the stage before any work
    for subset in subsets:
        translate_subset(params, subset)


if __name__ == "__main__":
    run(main)
