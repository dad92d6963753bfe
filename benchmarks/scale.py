"""Every CPU stage at production scale: time against a bare pyarrow read + write of the same data,
peak RSS at N and N/10 rows (flatness), and a no-op `dvc repro` against a one-stage project.

    python benchmarks/scale.py [--rows 1000000] [--stages fetch,translate,package] [--workdir DIR]

For each size it generates production-shaped inputs (seeded): LMSYS-Chat-1M shards for fetch
(benchmarks/fetch_filter.py's generator), a released translation of every kept first turn for
translate, and for package ten Japanese responses per instruction with their annotations. Each
stage runs as `python -m stages.<name>` in its own process, and so does each bare baseline (read
the stage's input columns with pyarrow, write a table of the same size), so every peak RSS is one
process's own. Package also writes its JSON lines gzip'd: its bare baseline, the write of the same
bytes, is the bare Parquet run plus the gzip alone of the same JSON text (same level and threads);
a second line gives the ratio against the Parquet run alone. The last line is
`worst ratio <x> peak_rss_mb <y>`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.fetch_filter import child  # noqa: E402

SHARDS = 6
NOOP_RUNS = 9
VARIANT = "gemma3"
# (input files, columns) a bare baseline reads for each stage; written back as one Parquet file
BARE = {
    "fetch": "lmsys-chat-1m/data/*.parquet",
    "translate": "data/interim/first-turn.parquet data/private/instructions-ja.parquet",
    "package": " ".join(
        [
            "data/private/translated-ja.parquet",
            f"data/generated/{VARIANT}.parquet",
            f"data/generated/{VARIANT}.annotations.parquet",
            f"data/scored/{VARIANT}.parquet",
        ]
    ),
}
BARE_CODE = """
import glob, sys, pyarrow as pa, pyarrow.parquet as pq
files = [f for pattern in sys.argv[1:] for f in sorted(glob.glob(pattern))]
tables = [pq.read_table(f) for f in files]
if len(tables) == 2:  # translate: the join it does
    tables = [tables[0].join(tables[1], "conversation_id", join_type="left outer")]
for i, table in enumerate(tables):
    pq.write_table(table, f"bare-{i}.parquet", compression="zstd")
"""

# package also gzips its JSON lines, which the bare run does not: this child times the gzip alone
# (zlib-ng threaded, the stage's level and thread count) of the same JSON text, taken by inflating
# the stage's own jsonl.gz; the inflating is timed apart and subtracted.
GZIP_CODE = """
import os, sys, time, yaml
from zlib_ng import gzip_ng_threaded, zlib_ng
release = yaml.safe_load(open("params.yaml"))["release"]
src = sorted(f for f in os.listdir(sys.argv[1]) if f.endswith(".jsonl.gz"))[0]
threads = release["gzip_threads"] or len(os.sched_getaffinity(0))
def text():
    inflate = zlib_ng.decompressobj(31)
    with open(os.path.join(sys.argv[1], src), "rb") as f:
        while piece := f.read(1 << 20):
            yield inflate.decompress(piece)
began = time.perf_counter()
for _ in text():
    pass
inflating = time.perf_counter() - began
began, level = time.perf_counter(), release["gzip_level"]
with gzip_ng_threaded.open("bare.jsonl.gz", "wb", level, threads=threads, block_size=1 << 20) as out:
    for piece in text():
        out.write(piece)
open("bare-gzip.txt", "w").write(f"{time.perf_counter() - began - inflating:.3f} {level}")
"""


def generate(work: Path, rows: int) -> None:
    """LMSYS-shaped shards under `work`, composed params.yaml, and fetch's outputs."""
    source = work / "lmsys-chat-1m" / "data"
    source.mkdir(parents=True, exist_ok=True)
    per_shard = -(-rows // SHARDS)
    for s in range(SHARDS):
        path = source / f"train-{s:05d}-of-{SHARDS:05d}-bench.parquet"
        n = min(per_shard, rows - s * per_shard)
        child(
            [
                sys.executable,
                str(ROOT / "benchmarks/fetch_filter.py"),
                "--generate",
                str(n),
                str(s),
                str(path),
            ],
            ROOT,
        )
    overrides = [
        f"fetch.source.uri={source.parent.as_uri()}",  # outside the repository: a file:// URL
        f"fetch.released.uri={(ROOT / 'data/sample/lmsys-chat-1m-synth').as_uri()}",
        "decrypt.key.method=hash",  # the sample's key script expects its own two shards
        f"++decrypt.key.file=data/train-00000-of-{SHARDS:05d}-*.parquet",
        "decrypt.subsets=[ja]",  # one subset: translate's figures are one translate@ja
        *(f"models.{v}.subset=ja" for v in ("llama31", "gemma2", "gemma3")),
        f"models.{VARIANT}.annotations=ours",  # scale_data writes translate's flags, as generate would
    ]
    child(
        [
            sys.executable,
            "-m",
            "stages.compose",
            "profile=sample",
            *overrides,
            "--out",
            str(work / "params.yaml"),
        ],
        ROOT,
    )


def make_inputs(work: Path, stage: str) -> None:
    """The inputs `stage` reads that no earlier benchmarked stage wrote (released translations,
    responses and annotations), generated from the previous stage's output."""
    if stage in ("translate", "package"):
        child([sys.executable, "-m", "benchmarks.scale_data", stage, str(work)], ROOT)


def run_stage(work: Path, stage: str) -> tuple[float, float]:
    args = [sys.executable, "-m", f"stages.{stage}"] + ([VARIANT] if stage == "package" else [])
    return child(args, work)


def bare(work: Path, stage: str) -> tuple[float, float]:
    return child([sys.executable, "-c", BARE_CODE, *(str(work / p) for p in BARE[stage].split())], work)


def gzip_seconds(work: Path) -> tuple[float, int]:
    """Seconds to gzip package's JSON lines as package does, and the level."""
    child([sys.executable, "-c", GZIP_CODE, str(work / "data/release" / VARIANT)], work)
    seconds, level = (work / "bare-gzip.txt").read_text().split()
    return float(seconds), int(level)


def noop_repro(work: Path) -> tuple[float, float]:
    """Median seconds of a no-op `dvc repro package@<variant>` here, and of a one-stage project's."""
    dvc = [str(Path(sys.executable).parent / "dvc")]
    for name in ("dvc.yaml", "conf", "stages", ".dvcignore"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, work / name)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=work, check=True)
    chain = [
        "fetch",
        "decrypt@ja",
        "translate@ja",
        f"generate@{VARIANT}",
        f"score@{VARIANT}",
        f"package@{VARIANT}",
    ]
    subprocess.run([*dvc, "commit", "-f", *chain], cwd=work, check=True, capture_output=True)
    one = work / "one-stage"
    one.mkdir()
    (one / "in.txt").write_text("x\n")
    (one / "dvc.yaml").write_text(
        "stages:\n  copy:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n"
    )
    for args in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "repro", "-q"]):
        subprocess.run(args, cwd=one, check=True, capture_output=True)
    # interleaved, the median of NOOP_RUNS each: one run of under a second moves with the machine
    ours, theirs = [], []
    for _ in range(NOOP_RUNS):
        ours.append(child([*dvc, "repro", f"package@{VARIANT}"], work)[0])
        theirs.append(child([*dvc, "repro"], one)[0])
    return statistics.median(ours), statistics.median(theirs)


def measure(work: Path, rows: int, stages: list[str]) -> dict[str, tuple]:
    """stage -> (stage seconds, stage peak RSS MB, bare seconds, bare peak RSS MB, gzip seconds and
    level or None) at `rows`."""
    generate(work, rows)
    results = {}
    for stage in ["fetch", "translate", "package"]:
        make_inputs(work, stage)
        seconds, rss = run_stage(work, stage)
        if stage in stages:
            gzip = gzip_seconds(work) if stage == "package" else None
            results[stage] = (seconds, rss, *bare(work, stage), gzip)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stages", default="fetch,translate,package")
    parser.add_argument("--no-dvc", action="store_true", help="skip the no-op dvc repro comparison")
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given; a temporary dir otherwise")
    args = parser.parse_args()
    stages = args.stages.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        small = measure(work / "small", args.rows // 10, stages)
        began = time.perf_counter()
        large = measure(work / "large", args.rows, stages)
        print(f"data: {args.rows:,} LMSYS-shaped rows ({time.perf_counter() - began:.0f} s with all stages)")
        worst, peak = 0.0, 0.0
        for stage, (seconds, rss, bare_s, bare_rss, gzip) in large.items():
            # package writes the same bytes as the bare run writes plus its gzip'd JSON lines
            same_bytes = bare_s + (gzip[0] if gzip else 0.0)
            ratio, small_rss = seconds / same_bytes, small[stage][1]
            worst, peak = max(worst, ratio), max(peak, rss)
            print(
                f"{stage:<10} {seconds:7.1f} s  bare {same_bytes:6.1f} s  ratio {ratio:5.2f}  "
                f"peak RSS {rss:6,.0f} MB "
                f"(bare {bare_rss:6,.0f} MB; at {args.rows // 10:,} rows {small_rss:6,.0f} MB, "
                f"growth {rss / small_rss - 1:+.0%})"
            )
            if gzip:
                print(
                    f"{stage:<10} bare = Parquet {bare_s:.1f} s + gzip level {gzip[1]} of its JSON lines "
                    f"{gzip[0]:.1f} s; against the Parquet alone: ratio {seconds / bare_s:5.2f}"
                )
        if not args.no_dvc:
            try:
                ours, one = noop_repro(work / "large")
            except subprocess.CalledProcessError as err:  # e.g. an out of dvc.yaml the data lacks
                why = (err.stdout or b"").decode() + (err.stderr or b"").decode()
                sys.exit(f"no-op dvc repro: not measured, `{' '.join(err.cmd[1:3])}` failed:\n{why.strip()}")
            worst = max(worst, ours / one)
            print(
                f"no-op dvc repro: {ours:.2f} s  one-stage project {one:.2f} s "
                f"(medians of {NOOP_RUNS})  ratio {ours / one:.2f}"
            )
        print(f"worst ratio {worst:.2f} peak_rss_mb {peak:.0f}")


if __name__ == "__main__":
    main()
