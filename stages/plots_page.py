"""Write the offline page template of DVC's plots (.dvc/plots/page.html: Vega, Vega-Lite and vega-embed
inlined from vl-convert-python, git-ignored) and point this clone's DVC at it (.dvc/config.local:
plots.html_template), so that `dvc plots show` and `dvc plots diff` write pages that draw without a
network. `make demo` runs it; run it from the repository root.

    python -m stages.plots_page
"""

from __future__ import annotations

import argparse
import logging

from stages.core.config.cli import LOG_FORMAT, run, summary
from stages.core.release.page import LOG, PAGE, ensure_page, use_page


def main() -> None:
    argparse.ArgumentParser(description=summary(__doc__)).parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    page = ensure_page(PAGE)
    setting = use_page(page)
    LOG.info("set plots.html_template %s in .dvc/config.local: `dvc plots diff vA vB` draws offline", setting)


if __name__ == "__main__":
    run(main)
