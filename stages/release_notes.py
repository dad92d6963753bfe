"""Release notes between two git revisions (tags) of this repository, in Markdown: the parameters that
changed (`dvc params diff`), the figures that changed (`dvc metrics diff`) and the outputs that changed
(`dvc diff`); with --plots DIR also `dvc plots diff` as an HTML page that draws offline (its scripts
inlined: stages/core/release/page.py).

    python -m stages.release_notes v0.1 v0.2 [--out NOTES.md] [--plots DIR]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from stages.core.config.cli import LOG_FORMAT, run, summary
from stages.core.config.errors import PipelineError
from stages.core.release.notes import DVC, LOG, release_notes
from stages.core.release.page import ensure_page


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("old", help="the earlier revision, e.g. v0.1")
    parser.add_argument("new", help="the later revision, e.g. v0.2 (or HEAD)")
    parser.add_argument("--out", type=Path, help="write the notes here (default: standard output)")
    parser.add_argument("--plots", type=Path, help="also write `dvc plots diff` HTML into this directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    notes = release_notes(args.old, args.new)
    if args.plots:
        page = ensure_page()  # written on first use
        command = ["dvc", "plots", "diff", args.old, args.new, "-o", str(args.plots)]
        command += ["--html-template", str(page)]
        done = subprocess.run([*DVC, *command[1:]], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PipelineError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
        notes += f"Plots: `{args.plots / 'index.html'}`.\n"
    if args.out:
        args.out.write_text(notes, encoding="utf-8")
        LOG.info("wrote %s", args.out)
    else:
        sys.stdout.write(notes)


if __name__ == "__main__":
    run(main)
