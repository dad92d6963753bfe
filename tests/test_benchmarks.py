"""The benchmark scripts run end to end (on small data: speed is what they print, not what we test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
