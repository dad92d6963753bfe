"""decrypt: derive the key from the fetched LMSYS-Chat-1M files (a digest, or the release's key
script: run only when its bytes match decrypt.key.sha256, sandboxed) and decrypt the released
Japanese instructions (python-gnupg) into a private Parquet table (conversation_id, instruction_ja)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.config.cli import run, start_subsets, timed
from stages.core.rows.records import instruction_rows
from stages.core.storage.atomic import atomic_path, private_tempdir
from stages.core.storage.crypto import decrypt_file, derive_key
from stages.core.storage.parquet import PARQUET_OPTIONS

LOG = logging.getLogger("stages.decrypt")
ROW_GROUP = 16_384  # rows held and written at a time
SCHEMA = pa.schema([("conversation_id", pa.string()), ("instruction_ja", pa.string())])


def write_instructions(rows: Iterable[dict], out: Path) -> int:
    """Write the rows to `out` in row groups of ROW_GROUP rows, atomically; return how many."""
    count, rows = 0, iter(rows)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, SCHEMA, **PARQUET_OPTIONS) as writer:
        while batch := list(itertools.islice(rows, ROW_GROUP)):
            writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
            count += len(batch)
    return count


def main() -> None:
    params, subsets = start_subsets("decrypt", __doc__)
    spec, paths = params.decrypt, params.paths
    key = derive_key(paths.source, spec.key, released_root=paths.released)
    for subset in subsets:
        encrypted = Path(paths.released) / spec.file.format(subset=subset)
        with timed(LOG, f"decrypt@{subset} {encrypted.name}") as counts:
            out = Path(paths.instructions_of(subset))
            out.parent.mkdir(parents=True, exist_ok=True)
            with private_tempdir(out.parent, f"decrypt-{subset}") as tmp:
                plain = Path(tmp) / "instructions.jsonl.gz"
                decrypt_file(encrypted, plain, key)
                counts["rows_out"] = write_instructions(instruction_rows(plain), out)


if __name__ == "__main__":
    run(main)
