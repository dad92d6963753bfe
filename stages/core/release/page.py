"""The HTML page template of `dvc plots show/diff` and `release_notes --plots`: writes PAGE with Vega,
Vega-Lite and vega-embed inlined from vl-convert-python's offline bundle, so the page draws without a
network. DVC fills its `{plot_divs}`; it has no `{scripts}`, the place of DVC's CDN script tags.

PAGE is generated on first use (and by `python -m stages.plots_page`), git-ignored, and written again
when the installed vl-convert-python differs from the one its second line names."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

from stages.core.config.errors import PipelineError
from stages.core.config.project import distribution_version
from stages.core.release.notes import DVC
from stages.core.storage.atomic import atomic_path

LOG = logging.getLogger("stages.plots_page")
PAGE = Path(".dvc/plots/page.html")  # relative to the repository root
BUNDLER = "vl-convert-python"
VEGA_LITE_MAJOR = "5"  # DVC's templates (and ours, .dvc/plots/*.json) are Vega-Lite v5 specs
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what DVC replaces anywhere in the page
END_OF_SCRIPT = re.compile(r"</(script)", re.IGNORECASE)
PAGE_HTML = """<!DOCTYPE html>
{stamp}
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>DVC plots</title>
<style>
  body {{ font-family: sans-serif; }}
  body > div {{ display: inline-block; vertical-align: top; margin: 12px; }}
</style>
<script type="text/javascript">
(function () {{
"use strict";
{bundle}
}})();
</script>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def _writer() -> str:
    """The start of a page's second line: which vl-convert-python wrote it."""
    return f"<!-- written by python -m stages.plots_page from {BUNDLER} {distribution_version(BUNDLER)}:"


def _bundle() -> tuple[str, str]:
    """The JavaScript bundle (it sets window.vegaEmbed, window.vega, window.vegaLite) and its versions."""
    try:
        import vl_convert
    except ImportError as err:
        raise PipelineError(
            f"the offline plots page needs {BUNDLER}, a dependency of this project: `make install` "
            f"or pip install '{BUNDLER}'"
        ) from err
    available = vl_convert.get_vegalite_versions()
    ours = [v for v in available if v.split(".")[0] == VEGA_LITE_MAJOR]
    if not ours:
        raise PipelineError(
            f"{BUNDLER} {distribution_version(BUNDLER)} bundles no Vega-Lite {VEGA_LITE_MAJOR}.x (only "
            f"{available}), the version of DVC's plots: pip install an earlier {BUNDLER}"
        )
    vega_lite = max(ours, key=lambda v: tuple(map(int, v.split("."))))
    versions = (
        f"Vega {vl_convert.get_vega_version()}, Vega-Lite {vega_lite}, "
        f"vega-embed {vl_convert.get_vega_embed_version()}"
    )
    return vl_convert.javascript_bundle(vl_version=vega_lite), versions


def page_html() -> str:
    """The page template: the inlined scripts and DVC's `{plot_divs}` (and `{refresh_tag}`)."""
    bundle, versions = _bundle()
    if found := [p for p in PLACEHOLDERS if p in bundle]:
        raise PipelineError(f"{BUNDLER}'s bundle holds {found}, which DVC would replace in the page")
    bundle = END_OF_SCRIPT.sub(r"<\\/\1", bundle)  # the same JavaScript, not the end of the element
    return PAGE_HTML.format(stamp=f"{_writer()} {versions} -->", bundle=bundle)


def is_current(path: Path) -> bool:
    """Whether `path` is a page that the installed vl-convert-python wrote."""
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as lines:
        next(lines, None)
        return next(lines, "").startswith(_writer())


def _dvc_dir() -> Path:
    """The repository's .dvc/, PAGE's folder being relative to it: the working directory must be the root."""
    if not Path(".dvc").is_dir():
        raise PipelineError(f"no .dvc/ in {Path.cwd()}: run this from the repository root")
    return Path(".dvc")


def ensure_page(path: Path = PAGE) -> Path:
    """Write the page template at `path` unless it is current; return its absolute path."""
    if path == PAGE:
        _dvc_dir()
    if not is_current(path):
        text = page_html()
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        LOG.info("wrote %s: %s", path, text.splitlines()[1])
    return path.resolve()


def use_page(path: Path = PAGE) -> str:
    """Point this clone's DVC at the page template (`.dvc/config.local`, not committed): every
    `dvc plots show/diff` then writes a page that draws offline. Returns the setting's value."""
    value = str(path.resolve().relative_to(_dvc_dir().resolve()))  # DVC reads it relative to .dvc/
    command = ["dvc", "config", "--local", "plots.html_template", value]
    done = subprocess.run([*DVC, *command[1:]], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PipelineError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return value
