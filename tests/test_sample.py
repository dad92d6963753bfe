"""`make sample` rewrites the bundled sample byte for byte (the model: tests/test_tiny_model.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "tiny-chat" not in p.parts
    }


def test_make_sample_rewrites_the_committed_sample_byte_for_byte(tmp_path):
    out = tmp_path / "sample"
    shutil.copytree(SAMPLE, out, ignore=shutil.ignore_patterns("tiny-chat"))
    for shard in (out / "lmsys-chat-1m" / "data").glob("*.parquet"):
        shard.write_bytes(b"stale")  # rewritten from the seed, not kept
    subprocess.run([sys.executable, "scripts/make_sample.py", "--out", str(out)], cwd=ROOT, check=True)
    # the encrypted subsets keep their ciphertext when the plaintext under the key is unchanged
    # (gpg output is random); everything else is written from the seed
    assert _files(out) == _files(SAMPLE)
