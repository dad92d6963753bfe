"""The benchmark scripts run end to end (on small data: speed is what they print, not what we test)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
RUN_BY = {"scale_data.py": "scale.py"}  # benchmarks run by another benchmark, not by a test here
# the rehearsal's faults at a tiny size: enough that a few requests of each kind get one
TINY_FAULTS = "transient_429=0.05,transient_500=0.05,persistent_500=0.05,context_400=0.05"
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
    """At 40,000 rows against 4,000, no CPU stage's peak RSS grows beyond the margin; the no-op
    `dvc repro` of the finished chain is measured (its outs are all there to commit)."""
    done = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--rows", "40000", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    growth = dict(re.findall(r"^(\w+) .* growth ([+-]\d+)%\)$", done.stdout, flags=re.MULTILINE))
    assert set(growth) == {"fetch", "translate", "package"}, done.stdout
    assert {stage: int(g) for stage, g in growth.items() if int(g) > GROWTH_MARGIN} == {}, done.stdout
    assert re.search(r"^worst ratio \d+\.\d\d peak_rss_mb \d+$", done.stdout, flags=re.MULTILINE)
    noop = (
        r"^no-op dvc repro: \d+\.\d\d s  one-stage project \d+\.\d\d s \(medians of \d+\)  "
        r"ratio \d+\.\d\d$"
    )
    assert re.search(noop, done.stdout, flags=re.MULTILINE), done.stdout


def benchmark(*args: str, timeout: float = 600) -> str:
    """Run `python benchmarks/<args>` from the repository root; its stdout, once it exited 0."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_benchmark_is_run_by_a_test_here():
    """A benchmark with a main that no test runs breaks silently (the rehearsal once did)."""
    mains = {p.name for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    here = Path(__file__).read_text(encoding="utf-8")
    assert {name for name in mains if f'"benchmarks/{name}"' not in here} == set(RUN_BY)


def test_cache_benchmark_runs_at_a_tiny_size(tmp_path):
    out = benchmark("benchmarks/cache.py", "--entries", "4000", "--probe", "2000", "--workdir", str(tmp_path))
    assert "two writers:" in out and "integrity ok, entries 10,000" in out, out
    assert re.search(r"^with cache: miss [\d.]+ us, hit [\d.]+ us$", out, flags=re.MULTILINE), out
    assert re.fullmatch(r"ratio -?\d+\.\d\d", out.splitlines()[-1]), out


def test_fake_vllm_serves_until_interrupted_and_one_choice_ignores_n():
    server = subprocess.Popen(
        [sys.executable, "benchmarks/fake_vllm.py", "--port", "0", "--model", "m", "--one-choice"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = re.search(r"on (http://\S+) ", server.stdout.readline())[1]
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 8}
        ask = urllib.request.Request(
            f"{url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(ask, timeout=30) as reply:
            assert len(json.load(reply)["choices"]) == 1
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=30)
    assert server.returncode == 0 and "'completions': 1" in out, out


def test_rehearsal_counts_every_injected_fault(tmp_path):
    """At a tiny size, without Ray (tests/test_executors.py runs generate on Ray): every fault the
    servers injected is counted, a dead base_url stops generate at once naming it, and a server that
    ignores n still yields n responses per instruction."""
    out = benchmark(
        "benchmarks/rehearsal.py",
        *("--instructions", "40", "--responses", "2", "--faults", TINY_FAULTS, "--no-ray"),
        *("--workdir", str(tmp_path)),
    )
    faults = re.search(r"^faults injected (\d+) counted (\d+) match$", out, flags=re.MULTILINE)
    assert faults and int(faults[1]) == int(faults[2]) > 0, out
    assert re.search(r"^transient faults injected [1-9]\d* retried away$", out, flags=re.MULTILINE), out
    dead = re.search(
        r"^dead server (\S+) exit_status (\d+) wall_s ([\d.]+) url_named yes$", out, re.MULTILINE
    )
    assert dead and int(dead[2]) == 2 and float(dead[3]) < 30, out
    log = (tmp_path / "dead-server/generate.log").read_text()
    assert "Traceback" not in log and any(
        line.startswith("error:") and dead[1] in line for line in log.splitlines()
    )
    one = re.search(r"^one-choice server responses (\d+) expected (\d+) match$", out, flags=re.MULTILINE)
    assert one and int(one[1]) == int(one[2]) > 0, out
    assert re.fullmatch(r"ratio \d+\.\d\d", out.splitlines()[-1]), out


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


def test_vllm_generate_benchmark_runs_on_the_sample(tmp_path):
    """On the real vLLM (its CPU build, `make check-vllm`; skipped without vllm): one round, short
    replies; the stage's replies equal bare LLM.chat's (the same seeds)."""
    pytest.importorskip("vllm")
    out = benchmark(
        "benchmarks/vllm_generate.py", "--rounds", "1", "--max-tokens", "16", "--workdir", str(tmp_path)
    )
    assert re.search(r"^requests: [\d,]+ in \d+ engine calls, max_tokens 16,", out, flags=re.MULTILINE), out
    assert re.search(r"^shard drain: [+-]\d+\.\d\d s", out, flags=re.MULTILINE), out
    assert "replies equal to bare: yes" in out and re.fullmatch(r"ratio \d+\.\d\d", out.splitlines()[-1]), out
