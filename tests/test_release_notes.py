"""Plot tables of a release and release notes between two tags."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.config.errors import PipelineError
from stages.core.release import notes as release_notes
from stages.core.release import plots
from stages.core.rows.responses import ANNOTATION, MESSAGE


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
    assert scores == Counter({"failed": 1, "7": 2, "10": 1, "0": 1, "9": 1}) | dict.fromkeys(
        ["1", "2", "3", "4", "5", "6", "8"], 0
    )
    assert list(scores) == ["failed", *map(str, range(11))]  # every bin, in order, zeros included
    tokens = {r["tokens"]: r["responses"] for r in tables["response_tokens"]}
    assert tokens == {
        "0-63": 1,
        "64-127": 2,
        "128-255": 1,
        "256-511": 0,
        "512-1023": 0,
        "1024-2047": 0,
        "2048+": 2,
    }
    assert tables["responses_per_instruction"] == [
        {"responses": "0", "instructions": 1},
        {"responses": "1", "instructions": 1},
        {"responses": "2", "instructions": 1},
        {"responses": "3", "instructions": 1},
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
    import yaml

    stages = yaml.safe_load((Path(__file__).resolve().parent.parent / "dvc.yaml").read_text())["stages"]
    declared = [next(iter(entry)) for entry in stages["package"]["do"]["plots"]]
    assert declared == [f"${{paths.metrics}}/plots/${{key}}/{name}.json" for name in plots.FILES]
    assert json.dumps(declared)  # plain strings
