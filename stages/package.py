"""package@<variant>: the release directory: public jsonl.gz and Parquet records with the
published field names, the Japanese instructions gpg-encrypted, a manifest and metrics.

Rows are streamed in batches: memory does not grow with the size of the release."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core import release
from stages.core.cli import run, start, timed
from stages.core.crypto import derive_key, encrypt_file
from stages.core.io import (
    PARQUET_OPTIONS,
    RowGroups,
    atomic_path,
    engine_roles,
    iter_aligned,
    jsonl_gz_writer,
    sha256_file,
    staged_dir,
    write_json,
)
from stages.core.params import Params
from stages.core.previous import previous_ciphertext

LOG = logging.getLogger("stages.package")
FLAGS = [
    "instruction_ja",
    "empty_user_instruction_ja",
    "duplicate_user_instruction_ja",
    "is_template_instruction",
    "translation_failed",
]
ROW_GROUP = 2048  # rows per row group of the public Parquet file, whatever release.batch_rows is
GENERATED = ["responses_ja", "responses_en", "status_ja", "status_en"]
SCORED = ["annotations", "multiturn", "judge_status", "multiturn_status"]


def write_release(params: Params, name: str, out: Path, plain: Path) -> Counter:
    """Write the public files to `out` and the plaintext instructions to `plain`; return the counts."""
    variant, paths, spec = params.models[name], params.paths, params.release
    with_en, with_second_turn = variant.generate.n_en > 0, variant.second_turn is not None
    schema = release.public_schema(with_en, with_second_turn)
    stem, totals = spec.file.format(name=variant.release_name), Counter()
    gz = {"level": spec.gzip_level, "threads": spec.gzip_threads}  # same bytes whatever the threads
    with contextlib.ExitStack() as stack:
        write_plain = stack.enter_context(jsonl_gz_writer(plain, **gz))  # hashed in the manifest
        write_json_line = parquet = None
        if "jsonl.gz" in spec.formats:
            write_json_line = stack.enter_context(jsonl_gz_writer(out / f"{stem}.jsonl.gz", **gz))
        if "parquet" in spec.formats:
            tmp = stack.enter_context(atomic_path(out / f"{stem}.parquet"))
            parquet = RowGroups(
                stack.enter_context(pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS)), ROW_GROUP
            )
            stack.callback(parquet.close)
        for part in iter_aligned(
            (paths.translated, FLAGS),
            (Path(paths.generated) / f"{name}.parquet", GENERATED),
            (Path(paths.scored) / f"{name}.parquet", SCORED),
            rows=spec.batch_rows,
        ):
            rows = part.to_pylist()
            release.add_metrics(totals, rows)
            rows = [r for r in rows if not r["translation_failed"]]  # no instruction: not released
            public = [release.release_record(r, with_en, with_second_turn) for r in rows]
            for row, record in zip(rows, public, strict=True):
                write_plain(release.instruction_record(row))
                if write_json_line:
                    write_json_line(record)
            if parquet:
                parquet.write(pa.Table.from_pylist(public, schema=schema))
    return totals


def main() -> None:
    params, name = start("package", __doc__, variant=True)
    variant, paths, spec = params.models[name], params.paths, params.release
    with (
        timed(LOG, f"package@{name}") as counts,
        tempfile.TemporaryDirectory(prefix="package-") as tmp,
        staged_dir(Path(paths.release) / name) as out,  # all or nothing: the old release stays until done
    ):
        plain = Path(tmp) / "instructions.jsonl.gz"
        totals = write_release(params, name, out, plain)
        plain_sha256, key = sha256_file(plain), derive_key(paths.source, params.decrypt.key)
        dirs = [f"{paths.release}/{v}" for v in [name, *sorted(set(params.models) - {name})]]
        previous = previous_ciphertext(dirs, spec.instructions_file, plain_sha256, key, Path(tmp))
        if previous is not None:
            shutil.copyfile(previous, out / spec.instructions_file)  # inside the staged directory
        else:
            encrypt_file(plain, out / spec.instructions_file, key)
        files = {
            p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(out.iterdir())
            if p.name != "manifest.json"
        }
        files[spec.instructions_file]["plaintext_sha256"] = plain_sha256
        metrics = release.release_metrics(totals)
        manifest = {
            "variant": name,
            "release_name": variant.release_name,
            "producers": release.producers(
                engine_roles(
                    [Path(paths.generated) / f"{name}.parquet", Path(paths.scored) / f"{name}.parquet"]
                )
            ),
            "files": files,
            "metrics": metrics,
        }
        write_json(manifest, out / "manifest.json")
        write_json(metrics, Path(paths.metrics) / f"package-{name}.json")
        counts.update(rows_in=totals["instructions"], rows_out=totals["instructions"])


if __name__ == "__main__":
    run(main)
