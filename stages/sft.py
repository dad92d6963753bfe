"""sft@<variant>: one SFT file per option set of `sft` that applies to the variant,
<paths.sft>/<variant>/<name>.jsonl.gz ({<output_key>: [...]} lines, the best response as score stored
it), and their counts in <paths.metrics>/sft-<variant>.json. The files hold LMSYS-derived
instructions: private remote only.

In the pipeline it reads the variant's release and the translated table. A licensee rebuilds the
same files, byte for byte and without DVC, from the public release files and the decrypted
instructions (plus LMSYS-Chat-1M for English sets and exclude_redacted):

  python -m stages.sft gemma2 --release-dir DIR \\
      --instructions lmsys-chat-1m-first-turn-user-instructions-ja.jsonl.gz [--lmsys DIR] [--set NAME]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.core.config.cli import LOG_FORMAT, run, summary, timed
from stages.core.config.errors import PipelineError
from stages.core.config.params import Params, load_params
from stages.core.release.files import public_file
from stages.core.rows import sft
from stages.core.rows.records import instruction_rows
from stages.core.storage.atomic import staged_dir
from stages.core.storage.jsonl import write_json

LOG = logging.getLogger("stages.sft")
BATCH_ROWS = 1000  # release records read at a time: the stage's memory
USER_COLUMNS = ["conversation_id", "instruction_ja", "instruction", "redacted"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.sft", description=summary(__doc__))
    parser.add_argument("variant", help="a key of `models` in params.yaml, e.g. gemma2")
    parser.add_argument("--release-dir", type=Path, help="the variant's public release files")
    parser.add_argument("--instructions", type=Path, help="the decrypted instructions (.jsonl.gz)")
    parser.add_argument("--lmsys", type=Path, help="LMSYS-Chat-1M as on the Hub (data/train-*.parquet)")
    parser.add_argument("--set", dest="sets", action="append", help="only this option set (repeatable)")
    parser.add_argument("--out", type=Path, help="where the files go (default: <paths.sft>/<variant>)")
    return parser.parse_args()


def sources(params: Params, args: argparse.Namespace, options: dict) -> list[tuple[str, object]]:
    """Where each record's instruction (and redacted flag) comes from, in release order."""
    if args.instructions is None:  # the pipeline: its private translated table
        if args.lmsys is not None:
            raise PipelineError("--lmsys goes with --instructions (rebuilding from the public files)")
        path = Path(params.paths.translated_of(params.models[args.variant].subset))
        return [(str(path), sft.table_rows(path, USER_COLUMNS, BATCH_ROWS))]
    found = [(str(args.instructions), instruction_rows(args.instructions))]
    if args.lmsys is not None:
        return [*found, (str(args.lmsys), sft.lmsys_rows(args.lmsys, params.fetch))]
    need = [k for k, o in options.items() if o.language == "en" or o.exclude_redacted]
    if need:
        raise PipelineError(
            f"sft option sets {need} need LMSYS-Chat-1M (its English first turns, its redacted flag): "
            "pass --lmsys DIR, or choose other sets with --set"
        )
    return found


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    params, name = load_params(), args.variant
    params.variant(name)
    options = sft.options_for(params, name, args.sets)
    release = public_file(params, name, args.release_dir, hint="pass --release-dir")
    records = sft.release_records(release, BATCH_ROWS)
    pairs = sft.merged(records, sources(params, args, options))
    with timed(LOG, f"sft@{name}") as counts, staged_dir(args.out or Path(params.paths.sft) / name) as out:
        metrics = sft.write_sft(pairs, options, out)
        counts.update(rows_in=metrics["rows_in"], files=len(options))
    for key, found in metrics["sets"].items():
        LOG.info("%s: %d written, left out %s", key, found["written"], found["skipped"])
    if args.instructions is None:
        write_json(metrics, params.paths.metrics_of(f"sft@{name}"))


if __name__ == "__main__":
    run(main)
