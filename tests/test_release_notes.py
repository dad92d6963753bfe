"""Plot tables of a release, the charts dvc.yaml declares over them, the offline page template of
DVC's plots, and release notes between two tags (tests/test_plots_render.py draws the pages)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from dvc_render import VegaRenderer, render_html
from dvc_render.vega_templates import get_template

from stages.core.config.errors import PipelineError
from stages.core.release import comparison, page, plots
from stages.core.release import notes as release_notes
from stages.core.rows.responses import ANNOTATION, MESSAGE

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / ".dvc" / "plots"


def _release(path: Path, rows: list[tuple[list[float], list[int]] | None]) -> Path:
    """A public Parquet file: per row, (scores, token lengths) of its responses, or None (no responses)."""
    schema = pa.schema(
        [
            ("synthesized_assistant_responses", pa.list_(MESSAGE)),
            ("synthesized_response_scoring_annotations", pa.list_(ANNOTATION)),
        ]
    )
    records = []
    for row in rows:
        if row is None:
            records.append(
                {"synthesized_assistant_responses": None, "synthesized_response_scoring_annotations": None}
            )
            continue
        scores, lengths = row
        records.append(
            {
                "synthesized_assistant_responses": [{"role": "assistant", "content": "x"} for _ in scores],
                "synthesized_response_scoring_annotations": [
                    {
                        "response_token_length": n,
                        "judgement": "",
                        "repetition_flag": n > 2000,
                        "preference_score": s,
                    }
                    for s, n in zip(scores, lengths, strict=True)
                ],
            }
        )
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path


def test_plot_tables_count_what_the_release_holds(tmp_path: Path):
    parquet = _release(
        tmp_path / "r.parquet",
        [([7.0, 7.5, -1.0], [10, 64, 2048]), None, ([10.0], [3000]), ([0.0, 9.99], [127, 128])],
    )
    totals = plots.new_totals()
    for batch in pq.ParquetFile(parquet).iter_batches(batch_size=2):  # counts add up across batches
        plots.add(totals, batch)
    tables = plots.plot_tables(totals, {"judgements_failed": 1, "translation_failed": 4})
    scores = {r["preference_score"]: r["responses"] for r in tables["scores"]}
    # bins are numbers (the charts sort them as numbers); -1: the failed judgements
    assert scores == Counter({-1: 1, 7: 2, 10: 1, 0: 1, 9: 1}) | dict.fromkeys([1, 2, 3, 4, 5, 6, 8], 0)
    assert list(scores) == [-1, *range(11)]  # every bin, in order, zeros included
    tokens = {(r["low"], r["tokens"]): r["responses"] for r in tables["response_tokens"]}
    assert tokens == {
        (0, "0-63"): 1,
        (64, "64-127"): 2,
        (128, "128-255"): 1,
        (256, "256-511"): 0,
        (512, "512-1023"): 0,
        (1024, "1024-2047"): 0,
        (2048, "2048+"): 2,
    }
    assert tables["responses_per_instruction"] == [
        {"responses": 0, "instructions": 1},
        {"responses": 1, "instructions": 1},
        {"responses": 2, "instructions": 1},
        {"responses": 3, "instructions": 1},
    ]
    failures = {r["failure"]: r["count"] for r in tables["failures"]}
    assert failures["translation_failed"] == 4 and failures["judgements_failed"] == 1
    assert failures["generate_failed_requests"] == 0  # absent from the metrics: zero, never null
    plots.write_plots(plots.new_totals(), {}, tmp_path / "plots")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(f"{n}.json" for n in plots.FILES)


def test_release_notes_list_changed_params_figures_and_outputs(monkeypatch):
    answers = {
        ("params", "diff"): {"params.yaml": {"models.gemma3.generate.n_ja": {"old": 10, "new": 4}}},
        ("metrics", "diff"): {
            "data/metrics/package-gemma3.json": {
                "responses_ja": {"old": 3140, "new": 1256, "diff": -1884},
                "mean_preference_score": {"old": 5.25, "new": 5.5, "diff": 0.25},
            }
        },
        ("diff",): {
            "added": [],
            "deleted": [],
            "modified": [{"path": "data/release/gemma3/"}, {"path": "data/generated/gemma3.parquet"}],
            "renamed": [],
        },
    }
    monkeypatch.setattr(release_notes, "dvc_json", lambda *args: answers[args[:-2]])
    notes = release_notes.release_notes("v0.1", "v0.2")
    assert notes.startswith("# Release notes: v0.1 → v0.2\n")
    assert "| `params.yaml` | `models.gemma3.generate.n_ja` | `10` | `4` |" in notes
    assert "| `data/metrics/package-gemma3.json` | `responses_ja` | 3,140 | 1,256 | -1,884 |" in notes
    assert "| `data/metrics/package-gemma3.json` | `mean_preference_score` | 5.25 | 5.5 | 0.25 |" in notes
    assert "- **modified**: `data/generated/gemma3.parquet`\n- **modified**: `data/release/gemma3/`" in notes


def test_release_notes_name_the_failing_dvc_command(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a DVC repository
    with pytest.raises(PipelineError, match=r"`dvc params diff v0\.1 v0\.2 --json` failed"):
        release_notes.release_notes("v0.1", "v0.2")


def test_plot_files_are_declared_for_every_variant_in_dvc_yaml():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = [next(iter(entry)) for entry in stages["package"]["do"]["plots"]]
    assert declared == [f"${{paths.metrics}}/plots/${{key}}/{name}.json" for name in plots.FILES]
    assert json.dumps(declared)  # plain strings


def test_each_chart_has_its_template_and_the_fields_of_its_table():
    """dvc.yaml's charts: a template of .dvc/plots/ (or DVC's own), x and y fields of the table that
    plots.py or comparison.py writes, `low` in a table of ranges, both sources in compare's."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    compared = comparison.plot_tables({side: Counter() for side in comparison.SIDES})
    written = {
        "package": plots.plot_tables(plots.new_totals(), {}),
        "compare": {f"compare_{name}": rows for name, rows in compared.items()},
    }
    used = set()
    for stage, tables in written.items():
        for entry in stages[stage]["do"]["plots"]:
            ((path, props),) = entry.items()
            rows, template = tables[Path(path).stem], props["template"]
            used.add(template)
            assert get_template(template, str(TEMPLATES)).content  # found and parsed as DVC finds it
            assert rows and all(props["x"] in row and props["y"] in row for row in rows), path
            assert all(plots.LOW in row for row in rows) == template.startswith("ranges"), path
            by_source = {row.get("source") for row in rows} == set(comparison.SIDES)
            assert by_source == template.endswith("_by_source"), path
    assert {p.stem for p in TEMPLATES.glob("*.json")} == used - {"bar_horizontal"}  # none unused


@pytest.fixture(scope="module")
def page_html() -> str:
    return page.page_html()  # vl-convert-python's bundle: about a second


def test_the_plots_page_inlines_its_scripts_and_dvc_fills_it(tmp_path: Path, page_html: str):
    template = tmp_path / "page.html"
    template.write_text(page_html, encoding="utf-8")
    chart = VegaRenderer(
        [{"preference_score": -1, "responses": 3, "rev": "v0.1"}],
        "data/metrics/plots/gemma3/scores.json",
        template="bins",
        template_dir=str(TEMPLATES),
        x="responses",
        y="preference_score",
    )
    html = Path(render_html([chart], tmp_path / "out" / "index.html", html_template=template)).read_text()
    assert "vegaEmbed('#data_metrics_plots_gemma3_scores_json', spec)" in html
    assert "cdn.jsdelivr.net" not in html and "<script src" not in html  # DVC's CDN scripts left out
    assert html.count("<script") == 2  # the inlined bundle and the chart's
    assert "window.vegaEmbed=" in html and "{plot_divs}" not in html
    assert html.splitlines()[1].startswith("<!-- written by python -m stages.plots_page from vl-convert")


def test_the_page_is_written_on_first_use_and_again_for_another_vl_convert(
    tmp_path: Path, monkeypatch, page_html: str
):
    written = []
    monkeypatch.setattr(page, "page_html", lambda: written.append(1) or page_html)
    path = tmp_path / ".dvc" / "plots" / "page.html"
    assert page.ensure_page(path) == path.resolve() and written == [1]
    page.ensure_page(path)
    assert written == [1]  # current: kept
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = lines[1].replace(page.BUNDLER, f"{page.BUNDLER} 0.1.0 (was)")
    path.write_text("".join(lines), encoding="utf-8")
    assert not page.is_current(path)
    page.ensure_page(path)
    assert written == [1, 1] and page.is_current(path)


def test_use_page_points_this_clones_dvc_at_the_page(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"no \.dvc/ in .*: run this from the repository root"):
        page.use_page()
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], check=True)
    assert page.use_page() == "plots/page.html"
    assert "html_template = plots/page.html" in (tmp_path / ".dvc" / "config.local").read_text()
    assert "html_template" not in (tmp_path / ".dvc" / "config").read_text()  # never committed
