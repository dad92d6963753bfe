"""A killed stage leaves nothing behind for long: the next run of package sweeps the partial release
and the private (plaintext) temporary copies a killed run left, and writes a whole release."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_stage

ROOT = Path(__file__).resolve().parent.parent
VARIANT = "gemma3"


def _litter(workspace: Path) -> list[str]:
    """What a killed package run leaves: its staged release and its private temporary directory."""
    found = [
        *(workspace / "data/release").glob(f".{VARIANT}.*"),
        *(workspace / "data/private").glob(".package-*"),
    ]
    return sorted(str(p.relative_to(workspace)) for p in found)


@pytest.fixture
def scored(workspace, monkeypatch, fake_engine):
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    for stage in ("generate", "score"):
        run_stage(monkeypatch, stage, VARIANT)
    return workspace


def test_a_package_killed_mid_write_leaves_no_litter_after_the_next_run(scored):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "stages.package", VARIANT]
    proc = subprocess.Popen(command, cwd=scored, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _litter(scored):  # the staged release exists: the run is writing
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert _litter(scored)  # a killed process cleans nothing up
    done = subprocess.run(command, cwd=scored, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _litter(scored) == []
    release = scored / "data/release" / VARIANT
    manifest = (release / "manifest.json").read_text(encoding="utf-8")
    assert all((release / name).is_file() for name in ("README.md", "manifest.json"))
    assert all(
        f'"{p.name}"' in manifest for p in release.iterdir() if p.name not in ("README.md", "manifest.json")
    )
