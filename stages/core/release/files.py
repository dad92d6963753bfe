"""The files of a release directory: the public jsonl.gz and Parquet records, the gpg-encrypted
Japanese instructions (the previous ciphertext kept where the plaintext is unchanged), written from
translate's, generate's (responses and annotations) and score's outs a batch at a time, and the
licence texts the published repository ships, copied unchanged from fetch's out (package@<variant>)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from stages.core.config.errors import SourceError
from stages.core.config.params import Params
from stages.core.config.release_params import ReleaseParams
from stages.core.release import flags, plots
from stages.core.rows import fields
from stages.core.rows import records as release
from stages.core.storage.crypto import derive_key, encrypt_file
from stages.core.storage.jsonl import jsonl_gz_table_writer, sha256_file
from stages.core.storage.parquet import in_thread, iter_aligned, parquet_table_writer
from stages.core.storage.previous import previous_ciphertext

LOG = logging.getLogger("stages.package")
PUBLIC_FORMATS = ("parquet", "jsonl.gz")  # a reader's preference among the public files
TRANSLATED = ["instruction_ja", "translation_failed"]
# the flags the release carries, and whose they are: generate's annotation table (the publisher's or ours)
FLAGS = [fields.EMPTY, fields.DUPLICATE, fields.TEMPLATE, flags.BY]
ROW_GROUP = 2048  # rows per row group of the public Parquet file, whatever release.batch_rows is
GENERATED = ["responses_ja", "responses_en", "status_ja", "status_en"]
SCORED = ["annotations", "multiturn", "judge_status", "multiturn_status"]
RELEASE_OWN = ("README.md", "manifest.json")  # the card and the manifest, package's own


def write_release(params: Params, name: str, out: Path, plain: Path) -> tuple[Counter, dict[str, Counter]]:
    """Write the public files to `out` and the plaintext instructions to `plain`; return the counts
    (metrics) and the plot counts."""
    variant, spec = params.models[name], params.release
    with_en, with_second_turn = variant.generate.n_en > 0, variant.second_turn is not None
    stem, totals, drawn = params.release_stem(name), Counter(), plots.new_totals()
    copy_licence_texts(params, name, out)
    with contextlib.ExitStack() as stack:
        # each file is written in a thread of its own (JSON text, Parquet encoding and gzip all
        # release the GIL), fed the same batches in the same order: the bytes do not change
        write_plain = stack.enter_context(in_thread(stack.enter_context(_jsonl_gz(spec, plain))))
        public = []  # a writer per public format
        if "jsonl.gz" in spec.formats:
            jsonl = stack.enter_context(_jsonl_gz(spec, out / f"{stem}.jsonl.gz"))
            public.append(stack.enter_context(in_thread(jsonl)))
        if "parquet" in spec.formats:
            schema = release.public_schema(with_en, with_second_turn)
            parquet = stack.enter_context(parquet_table_writer(out / f"{stem}.parquet", schema, ROW_GROUP))
            public.append(stack.enter_context(in_thread(parquet)))
        for part in released_rows(params, name):
            part, failed = release.released(part)
            release.add_metrics(totals, part, failed)
            flags.count(totals, part)
            write_plain(release.instruction_table(part))
            records = release.public_table(part, with_en, with_second_turn)
            plots.add(drawn, records)
            for write in public:
                write(records)
    return totals, drawn


def licence_texts(released_root: str | Path) -> list[Path]:
    """The licence texts every release carries: the files fetch took from the root of the released
    repository (fetch.released.include lists only licence texts there: the Llama 3.1 licence and its
    use policy, Notice, the Gemma Terms of Use; the sample's placeholders in the demo), by name."""
    root = Path(released_root)
    return sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []


def copy_licence_texts(params: Params, name: str, out: Path) -> None:
    """Copy `licence_texts` into the release directory `out`, unchanged (the manifest lists them); a
    name that a file of the release already has is refused, naming it."""
    variant, spec = params.models[name], params.release
    stem = params.release_stem(name)
    taken = {
        *RELEASE_OWN,
        *(f"{stem}.{suffix}" for suffix in spec.formats),
        spec.instructions_file.format(subset=variant.subset),
    }
    for path in licence_texts(params.paths.released):
        if path.name in taken:
            raise SourceError(
                f"{path}: a root file of the released repository is copied into the release as a licence "
                f"text, but package@{name} writes a file of that name: narrow fetch.released.include"
            )
        shutil.copyfile(path, out / path.name)


def released_rows(params: Params, name: str) -> Iterator[pa.Table]:
    """translate's rows with variant `name`'s flags (its annotation table), responses and scores,
    `release.batch_rows` at a time."""
    paths = params.paths
    return iter_aligned(
        (paths.translated_of(params.models[name].subset), TRANSLATED),
        (paths.annotations_of(name), FLAGS),
        (paths.generated_of(name), GENERATED),
        (paths.scored_of(name), SCORED),
        rows=params.release.batch_rows,
    )


def _jsonl_gz(spec: ReleaseParams, path: Path) -> contextlib.AbstractContextManager:
    """A table writer of gzip JSON lines at the release's level (the same bytes whatever the threads)."""
    return jsonl_gz_table_writer(path, level=spec.gzip_level, threads=spec.gzip_threads)


def encrypted_instructions(params: Params, name: str, plain: Path, out: Path, scratch: Path) -> str:
    """Write the encrypted instructions file of variant `name` into `out`; return its plaintext's
    sha256. gpg output is random: when an existing release of the same subset (this variant's, or
    another's) holds this very plaintext under this key, its ciphertext is reused."""
    variant, paths = params.models[name], params.paths
    target = out / params.release.instructions_file.format(subset=variant.subset)
    plain_sha256 = sha256_file(plain)
    key = derive_key(paths.source, params.decrypt.key, released_root=paths.released)
    same_subset = sorted(
        v for v, spec in params.models.items() if spec.subset == variant.subset and v != name
    )
    dirs = [paths.release_of(v) for v in [name, *same_subset]]
    previous = previous_ciphertext(dirs, target.name, plain_sha256, key, scratch)
    if previous is not None:
        shutil.copyfile(previous, target)  # inside the staged directory
    else:
        encrypt_file(plain, target, key)
    return plain_sha256


def public_file(
    params: Params,
    name: str,
    directory: str | Path | None = None,
    formats: tuple[str, ...] = PUBLIC_FORMATS,
    hint: str = "",
) -> Path:
    """The variant's public release file in `directory` (default: package@<name>'s out), the first
    of `formats` there; SourceError naming each file looked for, and `hint`, when none is."""
    directory = Path(directory or params.paths.release_of(name))
    paths = [directory / f"{params.release_stem(name)}.{suffix}" for suffix in formats]
    found = next((path for path in paths if path.is_file()), None)
    if found is None and len(paths) == 1:
        raise SourceError(f"{paths[0]} does not exist: {hint}")
    if found is None:
        raise SourceError(f"{directory} holds neither {' nor '.join(path.name for path in paths)}: {hint}")
    return found
