"""Benchmark fetch+filter on generated LMSYS-shaped data against a bare pyarrow read of the same files.

    python benchmarks/fetch_filter.py [--rows 1000000] [--shards 6] [--workdir DIR]

Generates `--rows` conversations (seeded; unique texts, 1-3 turns, moderation entries per message)
in `--shards` Parquet files laid out like the Hub dataset, then runs, each in its own process:
  1. `python -m stages.fetch` (copy with sha256, filter, first-turn table), and
  2. `pyarrow.parquet.read_table` of the same files,
and prints both wall times, their ratio and each process's peak RSS.

Linux charges a child the peak RSS its parent had when it forked, so this parent stays small:
generation and composition run in children too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__" and "--generate" in sys.argv:  # the generating child only
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from scripts.make_sample import CATEGORIES

LANGUAGES = ["English"] * 70 + ["Japanese"] * 3 + ["German"] * 8 + ["Spanish"] * 7 + ["Chinese"] * 12
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "are",
    "this",
    "be",
    "at",
    "have",
    "from",
    "or",
    "by",
    "data",
    "model",
]
# rows per row group of the generated shards, the same at every size: Arrow decodes the nested
# `conversation` column a row group at a time, so fetch's peak follows the input's row groups (a
# shard of 16,667 rows at N=100,000 could not hold the 50,000-row groups of N=1M, and the growth
# from N/10 to N measured the inputs, not the stage)
ROW_GROUP = 10_000
POOL = 4096


def _pool(rng: np.random.Generator, low: int, high: int) -> pa.Array:
    """POOL random texts of `low`..`high` words."""
    lengths = rng.integers(low, high, POOL)
    words = rng.choice(WORDS, size=int(lengths.sum()))
    splits = np.split(words, np.cumsum(lengths)[:-1])
    return pa.array([" ".join(s) for s in splits])


def _texts(rng: np.random.Generator, pool: pa.Array, n: int, tag: str) -> pa.Array:
    """n texts from `pool`, each made unique by a suffix, so Parquet cannot dictionary-encode them away."""
    base = pool.take(pa.array(rng.integers(0, POOL, n)))
    suffix = pc.cast(pa.array(np.arange(n)), pa.string())
    return pc.binary_join_element_wise(base, pa.array([tag] * n), suffix, " ")


def _moderation(rng: np.random.Generator, n_messages: int, flagged_messages: np.ndarray) -> pa.StructArray:
    scores = rng.random((len(CATEGORIES), n_messages)) * 0.05
    cats = pa.StructArray.from_arrays(
        [pa.array(scores[i] > 0.049) for i in range(len(CATEGORIES))], CATEGORIES
    )
    vals = pa.StructArray.from_arrays([pa.array(scores[i]) for i in range(len(CATEGORIES))], CATEGORIES)
    return pa.StructArray.from_arrays(
        [cats, vals, pa.array(flagged_messages)], ["categories", "category_scores", "flagged"]
    )


def generate_shard(rows: int, seed: int, path: Path) -> None:
    rng = np.random.default_rng(seed)
    user, assistant = _pool(rng, 5, 120), _pool(rng, 20, 350)
    turns = rng.choice([1, 2, 3], size=rows, p=[0.6, 0.3, 0.1])
    n_messages = int(2 * turns.sum())
    offsets = pa.array(np.concatenate([[0], np.cumsum(2 * turns)]).astype(np.int32))
    is_user = np.tile([True, False], n_messages // 2)
    content = pc.if_else(
        pa.array(is_user),
        _texts(rng, user, n_messages, f"u{seed}"),
        _texts(rng, assistant, n_messages, f"a{seed}"),
    )
    role = pc.if_else(pa.array(is_user), "user", "assistant")
    message = pa.StructArray.from_arrays([content, role], ["content", "role"])
    flagged_rows = rng.random(rows) < 0.05
    flagged_messages = np.repeat(flagged_rows, 2 * turns) & (rng.random(n_messages) < 0.5)
    table = pa.table(
        {
            "conversation_id": pc.binary_join_element_wise(
                pa.array([f"{seed:02d}"] * rows), pc.cast(pa.array(np.arange(rows)), pa.string()), "-"
            ),
            "model": pa.array(rng.choice(["vicuna-13b", "koala-13b", "gpt-4"], rows)),
            "conversation": pa.ListArray.from_arrays(offsets, message),
            "turn": pa.array(turns.astype(np.int64)),
            "language": pa.array(rng.choice(LANGUAGES, rows)),
            "openai_moderation": pa.ListArray.from_arrays(
                offsets, _moderation(rng, n_messages, flagged_messages)
            ),
            "redacted": pa.array(rng.random(rows) < 0.1),
        }
    )
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP)


def child(args: list[str], cwd: Path) -> tuple[float, float]:
    """Run a child process; return (wall seconds, its peak RSS in MB)."""
    began = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    error = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{error[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given; a temporary dir otherwise")
    parser.add_argument("--generate", nargs=3, metavar=("ROWS", "SEED", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        rows, seed, path = args.generate
        return generate_shard(int(rows), int(seed), Path(path))
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        source = work / "lmsys-chat-1m" / "data"
        source.mkdir(parents=True, exist_ok=True)
        began, per_shard, files = time.perf_counter(), -(-args.rows // args.shards), []
        for s in range(args.shards):
            files.append(source / f"train-{s:05d}-of-{args.shards:05d}-bench.parquet")
            if not files[-1].exists():
                rows = min(per_shard, args.rows - s * per_shard)
                child([sys.executable, __file__, "--generate", str(rows), str(s), str(files[-1])], ROOT)
        size = sum(f.stat().st_size for f in files)
        print(
            f"data: {args.rows:,} rows in {args.shards} shards, {size / 1e6:,.0f} MB "
            f"(generated in {time.perf_counter() - began:.0f} s)"
        )
        child(
            [
                sys.executable,
                "-m",
                "stages.compose",
                "profile=sample",
                f"fetch.source.uri={source.parent.as_uri()}",  # outside the repository: a file:// URL
                f"fetch.released.uri={(ROOT / 'data/sample/lmsys-chat-1m-synth').as_uri()}",
                "--out",
                str(work / "params.yaml"),
            ],
            ROOT,
        )
        bare_code = "import sys, pyarrow.parquet as pq; pq.read_table(sys.argv[1:])"
        bare_s, bare_mb = child([sys.executable, "-c", bare_code, *map(str, files)], work)
        fetch_s, fetch_mb = child([sys.executable, "-m", "stages.fetch"], work)
        counts = json.loads((work / "data/metrics/fetch.json").read_text())["rows"]
        print(f"bare pyarrow read_table:  {bare_s:7.1f} s  peak RSS {bare_mb:7,.0f} MB")
        print(
            f"fetch + filter (stage):   {fetch_s:7.1f} s  peak RSS {fetch_mb:7,.0f} MB  "
            f"({counts['rows_in']:,} rows in, {counts['rows_out']:,} out)"
        )
        print(f"ratio fetch+filter / bare read: {fetch_s / bare_s:.2f}")


if __name__ == "__main__":
    main()
