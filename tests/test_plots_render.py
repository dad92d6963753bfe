"""The plots pages draw offline: `dvc plots show` (after `python -m stages.plots_page`) and
`release_notes --plots` of a small real release, opened in headless Chromium with name resolution
off, draw every chart dvc.yaml declares, a bar per row of its table, bins in numeric order, the
comparison with the published file coloured by source; the page asks the network for nothing. DVC's
own page (its scripts from a CDN) stays blank there, which the same checks catch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from dvc_render.base import Renderer

from stages.core.config.compose import compose_params
from tests.conftest import SAMPLE, FakeEngine, run_stage

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
)
VARIANTS = ("gemma3", "gemma2", "llama31")
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
DVC = [sys.executable, "-m", "dvc"]
BROWSER = [  # headless, no background traffic, and no name resolution: the page gets no network
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=20000",  # ms of page time for the scripts to draw
]
BAR_START = re.compile(r"^M(-?[\d.e-]+),(-?[\d.e-]+)h(-?[\d.e-]+)")  # a bar's path: x, y, width
EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)  # http://, https://, //
CSS_URL = re.compile(r"url\(\s*['\"]?\s*(?:[a-z][a-z0-9+.-]*:)?//|@import", re.IGNORECASE)
LOADS = {"src", "href", "xlink:href", "srcset", "data", "action", "formaction", "poster", "background"}


@dataclass
class Chart:
    """What Chromium drew in one of DVC's chart divs."""

    bars: list[tuple[dict[str, str], str, float, float]] = field(
        default_factory=list
    )  # fields, fill, y, width
    legends: list[str] = field(default_factory=list)  # aria-labels


class Page(HTMLParser):
    """A page's DOM: the charts drawn in the divs named `ids`, and every attribute of an element that
    loads or links an external URL (script contents are not elements)."""

    def __init__(self, ids: set[str]):
        super().__init__()
        self.ids, self.charts, self.external = ids, {}, []
        self._chart: Chart | None = None

    def handle_data(self, data: str) -> None:
        if self.lasttag == "style" and CSS_URL.search(data):
            self.external.append(f"<style> {data.strip()[:80]}")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.external += [
            f"<{tag} {k}={v}>"
            for k, v in attrs
            if v and ((k in LOADS and EXTERNAL.match(v)) or (k == "style" and CSS_URL.search(v)))
        ]
        if tag == "div" and found.get("id") in self.ids:
            self._chart = self.charts[found["id"]] = Chart()
        elif self._chart is None:
            return
        role, label = found.get("aria-roledescription"), found.get("aria-label") or ""
        if role == "bar" and (start := BAR_START.match(found.get("d") or "")):
            fields = dict(part.split(": ", 1) for part in label.split("; "))
            self._chart.bars.append((fields, found.get("fill", ""), float(start[2]), float(start[3])))
        elif role == "legend":
            self._chart.legends.append(label)


def render(page: Path, out: Path, ids: set[str]) -> tuple[Page, list[str]]:
    """Open `page` in headless Chromium (a fresh profile, no name resolution); return its DOM once the
    scripts ran, and the URLs the page asked the network for (from Chromium's net log)."""
    profile, log = out / "profile", out / "net.json"
    done = subprocess.run(
        [
            CHROMIUM,
            *BROWSER,
            f"--user-data-dir={profile}",
            f"--log-net-log={log}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Page(ids)
    dom.feed(done.stdout)
    return dom, page_requests(log)


def page_requests(net_log: Path) -> list[str]:
    """The URLs a file:// page requested over the network (Chromium's own traffic left out)."""
    log = json.loads(net_log.read_text(encoding="utf-8"))
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        params["url"]
        for event in log["events"]
        if event["type"] == start
        and (params := event.get("params", {})).get("network_isolation_key", "").startswith("file://")
        and not params["url"].startswith("file:")
    ]


def declared(repo: Path) -> dict[str, dict]:
    """Every chart dvc.yaml declares for the variants: DVC's div id -> its plot table, y field, template."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    metrics = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))["paths"]["metrics"]
    found = {}
    for stage in ("package", "compare"):
        for entry in stages[stage]["do"]["plots"]:
            ((path, props),) = entry.items()
            for key in VARIANTS:
                table = path.replace("${paths.metrics}", metrics).replace("${key}", key)
                rows = json.loads((repo / table).read_text(encoding="utf-8"))
                found[Renderer.remove_special_chars(table)] = {**props, "rows": rows}
    return found


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repository holding a small real release of every variant (the sample through fetch
    to compare with the FakeEngine, as in tests/test_compare.py), its tables committed, tagged v0.1
    and v0.2."""
    repo = tmp_path_factory.mktemp("plots")
    shutil.copytree(SAMPLE, repo / "data" / "sample")
    (repo / "params.yaml").write_text(compose_params(["profile=sample"]), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        engine = FakeEngine()

        def make_engine(llm, options):
            engine.llm, engine.options = llm, options
            return engine

        mp.setattr("stages.core.runtime.executors.make_engine", make_engine)
        for stage in ("fetch", "decrypt", "translate"):
            run_stage(mp, stage)
        for variant in VARIANTS:
            for stage in ("generate", "score", "package", "compare"):
                run_stage(mp, stage, variant)
    for name in (
        "dvc.yaml",
        ".dvc/config",
        *(str(p.relative_to(ROOT)) for p in ROOT.glob(".dvc/plots/*.json")),
    ):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    for args in (
        ["init", "-q"],
        ["add", "dvc.yaml", "params.yaml", ".dvc", "data/metrics"],
        ["commit", "-qm", "v0.1"],
        ["tag", "v0.1"],
        ["commit", "-qm", "v0.2", "--allow-empty"],
        ["tag", "v0.2"],
    ):
        subprocess.run([*GIT, *args], cwd=repo, check=True)
    return repo


def run(repo: Path, *command: str) -> str:
    """Run a command in `repo` with this checkout's stages importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _order(value: str, rows: list[dict], y: str) -> float:
    """Where a bin belongs on the axis: itself if a number, else its range's lower bound (low)."""
    try:
        return float(value)
    except ValueError:
        return next(row["low"] for row in rows if row[y] == value)


def check_charts(dom: Page, charts: dict[str, dict], revs: list[str]) -> dict[str, int]:
    """Every declared chart is drawn: a bar per row of its table and revision, some with a length
    where the table counts anything, the bins in numeric order top to bottom, compare's bars
    coloured by source (one colour each), the package's by revision. Returns the bars per chart."""
    assert sorted(dom.charts) == sorted(charts), "charts missing from the page"
    for name, chart in charts.items():
        drawn, y, expected = dom.charts[name], chart["y"], len(chart["rows"]) * len(revs)
        assert len(drawn.bars) == expected > 0, f"{name}: {len(drawn.bars)} bars drawn, {expected} rows"
        lengths = any(width != 0 for *_, width in drawn.bars)
        assert lengths == any(row[chart["x"]] for row in chart["rows"]), f"{name}: bar lengths"
        if chart["template"] == "bar_horizontal":  # failures: names, not bins
            continue
        top_down = [fields[y] for fields, _, top, _ in sorted(drawn.bars, key=lambda bar: bar[2])]
        bins = list(dict.fromkeys(top_down))
        assert bins == sorted(bins, key=lambda v: _order(v, chart["rows"], y)), f"{name}: {bins}"
        if chart["template"].endswith("_by_source"):
            fills = {
                side: {fill for fields, fill, *_ in drawn.bars if fields["source"] == side}
                for side in ("ours", "published")
            }
            assert all(len(f) == 1 for f in fills.values()) and fills["ours"] != fills["published"], name
            assert drawn.legends == [
                "Symbol legend titled 'source' for fill color with 2 values: ours, published"
            ]
        else:
            count = f"{len(revs)} value{'s' if len(revs) > 1 else ''}"
            assert drawn.legends == [
                f"Symbol legend titled 'rev' for fill color with {count}: {', '.join(revs)}"
            ]
    return {name: len(chart.bars) for name, chart in dom.charts.items()}


def test_dvc_plots_show_draws_every_chart_offline_and_dvcs_own_page_stays_blank(repo: Path, tmp_path: Path):
    charts = declared(repo)
    assert len(charts) == 24  # 8 charts (4 of package, 4 of compare) for each of 3 variants
    run(repo, *DVC, "plots", "show", "-o", str(tmp_path / "dvc"))  # DVC's own page: scripts from a CDN
    blank, requested = render(tmp_path / "dvc" / "index.html", tmp_path, set(charts))
    assert sum(len(c.bars) for c in blank.charts.values()) == 0 and len(blank.charts) == 24
    assert blank.external and all("cdn.jsdelivr.net" in url for url in requested) and len(requested) == 3
    with pytest.raises(AssertionError, match="0 bars drawn"):  # the check fails on a blank page
        check_charts(blank, charts, ["workspace"])

    run(repo, sys.executable, "-m", "stages.plots_page")
    assert "html_template = plots/page.html" in (repo / ".dvc/config.local").read_text(encoding="utf-8")
    run(repo, *DVC, "plots", "show", "-o", str(tmp_path / "offline"))
    dom, requested = render(tmp_path / "offline" / "index.html", tmp_path / "offline", set(charts))
    assert dom.external == [] and requested == []  # nothing loaded or linked from outside the page
    bars = check_charts(dom, charts, ["workspace"])
    assert sum(bars.values()) == sum(len(c["rows"]) for c in charts.values())

    (repo / ".dvc/plots/page.html").unlink()  # the setting stays: DVC names what is missing
    gone = subprocess.run([*DVC, "plots", "show", "-o", "x"], cwd=repo, capture_output=True, text=True)
    assert gone.returncode != 0 and "HTML template has to contain '{plot_divs}'" in gone.stderr


def test_release_notes_plots_draw_both_tags_offline(repo: Path, tmp_path: Path):
    charts = declared(repo)
    notes = run(
        repo, sys.executable, "-m", "stages.release_notes", "v0.1", "v0.2", "--plots", str(tmp_path / "p")
    )
    assert f"Plots: `{tmp_path / 'p' / 'index.html'}`" in notes
    page = (tmp_path / "p" / "index.html").read_text(encoding="utf-8")
    assert "{plot_divs}" not in page and "<script src" not in page
    dom, requested = render(tmp_path / "p" / "index.html", tmp_path, set(charts))
    assert dom.external == [] and requested == []
    bars = check_charts(dom, charts, ["v0.1", "v0.2"])
    assert len(bars) == 24 and all(bars.values())
