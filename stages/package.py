"""package@<variant>: the release directory: public jsonl.gz and Parquet records with the
published field names, the Japanese instructions gpg-encrypted, a manifest and metrics."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa

from stages.core import release
from stages.core.cli import start, timed
from stages.core.crypto import derive_key, encrypt_file
from stages.core.io import align, read_table, sha256_file, write_json, write_jsonl_gz, write_table
from stages.core.previous import previous_ciphertext

LOG = logging.getLogger("stages.package")
TABLE_COLUMNS = [
    "conversation_id",
    "instruction_ja",
    "empty_user_instruction_ja",
    "duplicate_user_instruction_ja",
    "is_template_instruction",
]


def load_rows(paths, name: str) -> list[dict]:
    generated, scored = Path(paths.generated) / f"{name}.parquet", Path(paths.scored) / f"{name}.parquet"
    table = read_table(paths.translated, columns=TABLE_COLUMNS)
    table = align(table, read_table(generated), ["responses_ja", "responses_en"], str(generated))
    table = align(table, read_table(scored), ["annotations", "multiturn"], str(scored))
    return table.to_pylist()


def main() -> None:
    params, name = start("package", __doc__, variant=True)
    variant, paths = params.models[name], params.paths
    out = Path(paths.release) / name
    out.mkdir(parents=True, exist_ok=True)
    with timed(LOG, f"package@{name}") as counts:
        rows = load_rows(paths, name)
        public = [
            release.release_record(r, variant.generate.n_en > 0, variant.second_turn is not None)
            for r in rows
        ]
        stem, spec = params.release.file.format(name=variant.release_name), params.release
        if "jsonl.gz" in spec.formats:
            write_jsonl_gz(public, out / f"{stem}.jsonl.gz")
        if "parquet" in spec.formats:
            write_table(pa.Table.from_pylist(public), out / f"{stem}.parquet")
        with tempfile.TemporaryDirectory(prefix="package-") as tmp:
            plain = Path(tmp) / "instructions.jsonl.gz"
            write_jsonl_gz((release.instruction_record(r) for r in rows), plain)
            plain_sha256 = sha256_file(plain)
            key = derive_key(paths.source, params.decrypt.key)
            dirs = [f"{paths.release}/{v}" for v in [name, *sorted(set(params.models) - {name})]]
            previous = previous_ciphertext(dirs, spec.instructions_file, plain_sha256, key, Path(tmp))
            if previous is not None:
                shutil.copyfile(previous, out / spec.instructions_file)
            else:
                encrypt_file(plain, out / spec.instructions_file, key)
        files = {
            p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(out.iterdir())
            if p.name != "manifest.json"
        }
        files[spec.instructions_file]["plaintext_sha256"] = plain_sha256
        metrics = release.release_metrics(rows)
        write_json(
            {"variant": name, "release_name": variant.release_name, "files": files, "metrics": metrics},
            out / "manifest.json",
        )
        write_json(metrics, Path(paths.metrics) / f"package-{name}.json")
        counts.update(rows_in=len(rows), rows_out=len(public))


if __name__ == "__main__":
    main()
