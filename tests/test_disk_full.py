"""A write that fails (a full disk, a file size limit) ends the stage with one line naming the file
and the space left, never a hang, and the previous file or release stays whole.

Each write runs in a subprocess with a timeout, so a regression (the writer spinning forever) fails
the test instead of hanging the suite."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_stage

TIMEOUT = 60  # seconds; a healthy run of any script here takes about 2
RELEASE = "data/release/gemma3"

# a zlib-ng writer over a disk with 64 bytes free: its own thread fails on the first compressed block
FULL_DISK = """
import errno, io, sys, types
from zlib_ng import gzip_ng_threaded
from stages.core.storage import jsonl, parquet

class Full(io.RawIOBase):
    def __init__(self, room):
        self.room = room
    def writable(self):
        return True
    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return len(data)

real_open = gzip_ng_threaded.open
jsonl.gzip_ng_threaded = types.SimpleNamespace(open=lambda tmp, *a, **k: real_open(Full(64), *a, **k))
"""

# package's shape: an ExitStack of writers, one of which fails before zlib-ng's error comes out
OTHER_WRITER_FIRST = """
import contextlib
from pathlib import Path
from stages.core.config.cli import run

def main():
    with contextlib.ExitStack() as stack:
        write = stack.enter_context(jsonl.jsonl_gz_writer(Path(sys.argv[1]), threads=2))
        write({"text": "x" * (3 << 20)})  # three blocks: zlib-ng's thread meets the full disk
        raise OSError(errno.ENOSPC, "No space left on device")  # the Parquet writer's, say

run(main)
"""

# the gzip writer's error comes first, out of a writer thread (package's in_thread)
WRITER_THREAD = """
import contextlib
from pathlib import Path
import pyarrow as pa
from stages.core.config.cli import run

def main():
    with contextlib.ExitStack() as stack:
        write = stack.enter_context(jsonl.jsonl_gz_table_writer(Path(sys.argv[1]), threads=2))
        hand_over = stack.enter_context(parquet.in_thread(write))
        for _ in range(8):
            hand_over(pa.table({"text": ["x" * 4096] * 256}))

run(main)
"""

# the same writes against a real file size limit (EFBIG from the kernel): nothing patched
LIMITED = {
    "write_table": "parquet.write_table(pa.table({'x': [os.urandom(64).hex() for _ in range(5000)]}), out)",
    "write_jsonl_gz": "jsonl.write_jsonl_gz(({'x': os.urandom(64).hex()} for _ in range(5000)), out)",
    "write_json": "jsonl.write_json({'x': [os.urandom(64).hex() for _ in range(5000)]}, out)",
    "parquet_table_writer": """
with parquet.parquet_table_writer(out, pa.schema([('x', pa.string())]), 1000) as write:
    for _ in range(5):
        write(pa.table({'x': [os.urandom(64).hex() for _ in range(1000)]}))""",
}
LIMITED_SCRIPT = """
import os, sys
import pyarrow as pa
from stages.core.storage import jsonl, parquet
from stages.core.config.cli import run

out = sys.argv[1]

def main():
{body}

run(main)
"""


def _limit_file_size(limit: int):
    """A preexec_fn: writes past `limit` bytes of a file fail with EFBIG (not a signal)."""

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def _run(args: list[str], cwd: Path = ROOT, limit: int | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's stages, whatever the cwd
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            preexec_fn=None if limit is None else _limit_file_size(limit),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the write hung for {TIMEOUT} s instead of failing")


def _one_line(result: subprocess.CompletedProcess, path: Path) -> str:
    """The error line of a stage that failed as expected: exit 2, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: cannot write {path}: ") and " free on its disk" in line, line
    return line


@pytest.mark.parametrize("script", [OTHER_WRITER_FIRST, WRITER_THREAD], ids=["other-first", "in-thread"])
def test_a_full_disk_under_zlib_ng_is_one_line_not_a_hang(tmp_path, script):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(b"the previous file")
    line = _one_line(_run(["-c", FULL_DISK + script, str(path)]), path)
    assert "No space left on device" in line and line.endswith("free some space and run the stage again")
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl.gz"]  # no temporary file left
    assert path.read_bytes() == b"the previous file"


@pytest.mark.parametrize("writer", LIMITED)
def test_a_write_past_the_file_size_limit_is_one_line(tmp_path, writer):
    path = tmp_path / "out"
    path.write_bytes(b"the previous file")
    body = "\n".join(f"    {line}" for line in LIMITED[writer].strip().splitlines())
    result = _run(["-c", LIMITED_SCRIPT.format(body=body), str(path)], limit=64 << 10)
    assert "File too large" in _one_line(result, path)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert path.read_bytes() == b"the previous file"


def test_package_on_a_full_disk_fails_in_one_line_and_keeps_the_release(workspace, monkeypatch, fake_engine):
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "gemma3")
    release = workspace / RELEASE
    before = {p.name: p.read_bytes() for p in release.iterdir()}
    result = _run(["-m", "stages.package", "gemma3"], cwd=workspace, limit=16 << 10)  # every file > 16 KiB
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert "cannot write" in line and "File too large" in line and " free on its disk" in line, line
    assert {p.name: p.read_bytes() for p in release.iterdir()} == before
    assert [p.name for p in release.parent.iterdir()] == ["gemma3"]  # no partial or old directory
