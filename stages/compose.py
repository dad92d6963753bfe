"""Compose conf/ (Hydra) into params.yaml, the only file stages read; validate it first.

python -m stages.compose                  # production release config
python -m stages.compose profile=sample   # bundled sample, CPU, offline
python -m stages.compose models.gemma3.generate.n_ja=4 --out params.yaml
python -m stages.compose --check          # is params.yaml a composition of conf/? (exit 2 if not)
python -m stages.compose --drop-overrides # production, even if params.yaml records overrides

Before writing, compose reads the overrides the file records and refuses (exit 2) to drop one or
change its value unless `--drop-overrides` says so: a lasting change belongs in conf/.

`dvc exp run -S key=value` composes conf/ itself and writes params.yaml without our header; `--check`
accepts such a file when it equals the composition of its profile with its differing values as
overrides, and names those overrides.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from stages.core.config.cli import run, summary
from stages.core.config.compose import check_params, compose_params, dropped_or_refuse
from stages.core.config.params import PARAMS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=sample")
    parser.add_argument("--out", type=Path, default=PARAMS_FILE)
    parser.add_argument("--check", action="store_true", help="check --out instead of writing it")
    parser.add_argument(
        "--drop-overrides", action="store_true", help="write --out even if that drops overrides it records"
    )
    args = parser.parse_args()
    if args.check:
        overrides = check_params(args.out)
        print(f"{args.out} is the composition of conf/ with {' '.join(overrides) or 'no overrides'}")
        sys.exit(0)
    text = compose_params(args.overrides)
    dropped = dropped_or_refuse(args.out, args.overrides, args.drop_overrides)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({shlex.join(args.overrides) or 'production'})")
    if dropped:
        print(dropped)


if __name__ == "__main__":
    run(main)
