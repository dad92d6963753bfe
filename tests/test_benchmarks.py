"""The benchmark scripts run end to end (on small data: speed is what they print, not what we test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# percent of peak RSS from 4,000 to 40,000 rows. At this size a stage's batches are still filling up
# (fetch +53%, translate +32%, package +28% measured); the reader that held 65,536-row batches, i.e.
# whole inputs here, made package grow +224%.
GROWTH_MARGIN = 75


def test_fetch_filter_benchmark_reports_ratio_and_rss(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/fetch_filter.py",
            "--rows",
            "20000",
            "--shards",
            "2",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "data: 20,000 rows in 2 shards" in done.stdout
    assert re.search(
        r"fetch \+ filter \(stage\): +[\d.]+ s +peak RSS +[\d,]+ MB +\(20,000 rows in, [\d,]+ out\)",
        done.stdout,
    )
    assert re.search(r"ratio fetch\+filter / bare read: \d+\.\d\d", done.stdout)
    assert len(list((tmp_path / "lmsys-chat-1m/data").glob("train-*-of-00002-bench.parquet"))) == 2


def test_scale_benchmark_every_cpu_stage_keeps_flat_memory(tmp_path):
    """At 40,000 rows against 4,000, no CPU stage's peak RSS grows beyond the margin."""
    done = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--rows", "40000", "--no-dvc", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    growth = dict(re.findall(r"^(\w+) .* growth ([+-]\d+)%\)$", done.stdout, flags=re.MULTILINE))
    assert set(growth) == {"fetch", "translate", "package"}, done.stdout
    assert {stage: int(g) for stage, g in growth.items() if int(g) > GROWTH_MARGIN} == {}, done.stdout
    assert re.search(r"^worst ratio \d+\.\d\d peak_rss_mb \d+$", done.stdout, flags=re.MULTILINE)


def test_dvc_reads_its_yaml_files_with_the_c_parser():
    """DVC loads dvc.yaml, dvc.lock and params.yaml through ruamel.yaml's safe loader on every
    command; without ruamel.yaml.clib (an extra DVC does not ask for) that is pure Python, most of
    a no-op `dvc repro` of this DAG."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__module__ == "ruamel.yaml.clib._ruamel_yaml"
    lock = "stages:\n  fetch:\n    cmd: python -m stages.fetch\n    deps:\n    - path: stages/fetch.py\n"
    assert parse_yaml(lock, "dvc.lock") == {
        "stages": {"fetch": {"cmd": "python -m stages.fetch", "deps": [{"path": "stages/fetch.py"}]}}
    }
