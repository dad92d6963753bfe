"""The licence guard of `python -m stages.publish`: reads a release directory (its files, manifest.json
and dataset card) and dvc.yaml's private outs, and returns the files that may be published with their
sizes and sha256, or raises naming every file it refuses and why. Nothing is sent anywhere.

A file is published only when package@<variant> wrote it for the public: listed in manifest.json's
`files` with the size and sha256 recorded there (README.md and manifest.json are the two package writes
beside them), not a private out of dvc.yaml (nor a link to one), Parquet or JSON lines holding only the
columns the card declares and none of the plaintext instructions or LMSYS-Chat-1M's columns, the
encrypted instructions OpenPGP data that is not its own plaintext, and the card with its licences and
`configs` over files of the upload."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from stages.core.config.errors import PipelineError, SourceError
from stages.core.config.params import Params
from stages.core.release import card
from stages.core.release.merged import LMSYS
from stages.core.rows import fields
from stages.core.storage.io import read_jsonl_gz, sha256_file

# package@<variant> writes both beside the files that manifest.json's `files` lists
CARD, MANIFEST = "README.md", "manifest.json"
PLAINTEXT = "plaintext Japanese instructions (LMSYS-Chat-1M licence: only the encrypted file is published)"
PRIVATE_COLUMNS = {
    fields.INSTRUCTION: PLAINTEXT,
    "instruction_ja": PLAINTEXT,  # translate's column (stages/core/release/files.py FLAGS)
    **{column: "an LMSYS-Chat-1M column (its licence: private remote only)" for column in LMSYS},
}
GZIP_MAGIC = b"\x1f\x8b"
OPENPGP_PACKET = 0x80  # the first byte of OpenPGP data has its high bit set (RFC 4880, 4.2)


class RefusedError(PipelineError, PermissionError):
    """A release holds something that must not be published: every such file is named with why."""


@dataclass(frozen=True)
class Upload:
    """One file to publish: its path in the repository (its name in the release directory)."""

    name: str
    path: Path
    size: int
    sha256: str


def read_manifest(release: Path, variant: str) -> dict:
    """The release's manifest.json; SourceError saying how to get the release when it is not there."""
    fix = f"run `dvc repro package@{variant}` (to build it) or `dvc pull package@{variant}` first"
    if not release.is_dir():
        raise SourceError(f"{release} does not exist: {fix}")
    missing = [name for name in (MANIFEST, CARD) if not (release / name).is_file()]
    if missing:
        raise SourceError(f"{release} has no {' or '.join(missing)}: not a whole release; {fix}")
    manifest = json.loads((release / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("variant") != variant or not isinstance(manifest.get("files"), dict):
        raise SourceError(f"{release / MANIFEST} is not package@{variant}'s manifest: {fix}")
    return manifest


def private_outs(root: Path) -> dict[Path, str]:
    """Every out that dvc.yaml (in `root`) binds to the `private` remote, by resolved path, with its stage."""
    from dvc.repo import Repo

    if not (root / "dvc.yaml").is_file():
        raise SourceError(f"no dvc.yaml in {root}: run `python -m stages.publish` from the project's root")
    with Repo(str(root), uninitialized=True) as repo:
        return {
            Path(out.fs_path).resolve(): stage.addressing
            for stage in repo.index.stages
            for out in stage.outs
            if out.remote == "private"
        }


def _private(path: Path, private: dict[Path, str]) -> str | None:
    """Why `path` (as named, or where a link leads) is private, or None."""
    for where in {Path(os.path.abspath(path)), path.resolve()}:
        for out, stage in private.items():
            if where == out or out in where.parents:
                return f"a private out ({stage} in dvc.yaml, remote: private), never published"
    return None


def front_matter(path: Path) -> dict | None:
    """The YAML metadata of a dataset card as huggingface_hub reads it, or None when it has none."""
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(path) or None
    except (yaml.YAMLError, ValueError):  # not YAML, or not a mapping
        return None


def config_paths(meta: dict) -> list[str]:
    """The paths (or globs) of every config's data_files, in the forms the Hub accepts."""
    found = []
    for config in meta.get("configs") or []:
        files = config.get("data_files") if isinstance(config, dict) else None
        for item in files if isinstance(files, list) else [files]:
            paths = item.get("path") if isinstance(item, dict) else item
            found += [p for p in (paths if isinstance(paths, list) else [paths]) if isinstance(p, str)]
    return found


def card_refusals(path: Path, manifest: dict, names: set[str]) -> list[str]:
    """What keeps the dataset card (README.md) from being published: licence metadata, the licences of
    the models that produced the release, configs over files of the upload, declared features."""
    meta, text = front_matter(path), path.read_text(encoding="utf-8")
    if meta is None:
        return ["no YAML front matter (the Hub's dataset card metadata)"]
    why = []
    if not meta.get("license") or (meta["license"] == "other" and not meta.get("license_name")):
        why.append("no licence metadata (`license`, and `license_name` for `other`)")
    missing = [
        line.split(" (")[0] for line in card.licences(manifest.get("producers", {})) if line not in text
    ]
    if missing:
        why.append(f"its Licences section lacks: {'; '.join(missing)}")
    paths = config_paths(meta)
    if not paths:
        why.append("no `configs` with data_files: the Hub would not know which files to load")
    for pattern in paths:
        if not fnmatch.filter(sorted(names), pattern):
            why.append(f"`configs` points at {pattern}, which is not uploaded")
    if not declared(meta):
        why.append("no `dataset_info` features: the columns of the public files are declared nowhere")
    return why


def declared(meta: dict | None) -> set[str]:
    """The column names the card's `dataset_info` declares (any config)."""
    info = (meta or {}).get("dataset_info") or []
    configs = info if isinstance(info, list) else [info]
    return {f["name"] for c in configs if isinstance(c, dict) for f in c.get("features") or [] if "name" in f}


def _columns(path: Path) -> list[str]:
    """The top-level columns of a Parquet or gzip JSON lines file (every line's keys)."""
    if path.name.endswith(".parquet"):
        return pq.read_schema(path).names
    keys: dict[str, None] = {}
    for record in read_jsonl_gz(path):
        keys.update(dict.fromkeys(record if isinstance(record, dict) else ["<not an object>"]))
    return list(keys)


def column_refusal(path: Path, allowed: set[str]) -> str | None:
    """Why a public data file's columns keep it from being published, or None."""
    try:
        columns = _columns(path)
    except (pa.ArrowException, OSError, EOFError, ValueError) as err:  # ValueError: SourceError, bad UTF-8
        return f"not readable as {'Parquet' if path.suffix == '.parquet' else 'gzip JSON lines'} ({err})"
    private = [f"column {c}: {PRIVATE_COLUMNS[c]}" for c in columns if c in PRIVATE_COLUMNS]
    if private:
        return "holds " + "; ".join(private)
    undeclared = [c for c in columns if allowed and c not in allowed]
    return f"holds columns the card does not declare: {', '.join(undeclared)}" if undeclared else None


def encrypted_refusal(path: Path, entry: dict) -> str | None:
    """Why the encrypted instructions file is not what it claims (OpenPGP data, not its plaintext)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if "plaintext_sha256" not in entry:
        return "a .gpg file manifest.json does not record as the encrypted instructions"
    if entry["sha256"] == entry["plaintext_sha256"] or head == GZIP_MAGIC:
        return "not encrypted: it holds the plaintext instructions (gzip JSON lines) under the .gpg name"
    if not head or not head[0] & OPENPGP_PACKET:
        return "not OpenPGP data: the encrypted instructions must be gpg's output"
    return None


def _unlisted(path: Path, manifest: dict, private: dict[Path, str]) -> str | None:
    """Why an entry of the release directory is refused before it is read, or None."""
    variant = manifest["variant"]
    if (why := _private(path, private)) is not None:
        return why
    if not path.is_file():
        return f"not a regular file: package@{variant} writes none"
    if path.name not in manifest["files"] and path.name not in (CARD, MANIFEST):
        return (
            f"not written by package@{variant} (manifest.json does not list it): remove it, or rebuild "
            f"the release with `dvc repro package@{variant}`"
        )
    return None


def _content(upload: Upload, manifest: dict, allowed: set[str]) -> str | None:
    """Why a file listed in the manifest is refused for what it holds, or None (the card is checked apart)."""
    entry = manifest["files"].get(upload.name)
    if entry is None:  # README.md or manifest.json
        return None
    if (upload.sha256, upload.size) != (entry["sha256"], entry["size"]):
        variant = manifest["variant"]
        return f"differs from manifest.json's sha256 and size: changed after package@{variant} wrote it"
    if upload.name.endswith(".gpg"):
        return encrypted_refusal(upload.path, entry)
    if upload.name.endswith((".parquet", ".jsonl.gz")):
        return column_refusal(upload.path, allowed)
    return "a kind of file package@ does not publish (only .parquet, .jsonl.gz and the .gpg instructions)"


def publishable(params: Params, variant: str, root: Path) -> tuple[list[Upload], dict]:
    """The files of variant's release directory to publish (by name) and its manifest; RefusedError
    naming every refused file and why when any is, so that nothing is published."""
    release = root / params.paths.release_of(variant)
    manifest = read_manifest(release, variant)
    private = private_outs(root)
    # where package and merge keep plaintext while they run (stages/package.py's private_tempdir)
    private[(root / params.paths.instructions).parent.resolve()] = "the private scratch directory"
    allowed = declared(front_matter(release / CARD))
    refused: dict[str, str] = {}
    uploads = []
    for path in sorted(release.iterdir()):
        why = _unlisted(path, manifest, private)
        if why is None:
            upload = Upload(path.name, path, path.stat().st_size, sha256_file(path))
            why = _content(upload, manifest, allowed)
        if why is None:
            uploads.append(upload)
        else:
            refused[path.name] = why
    for name in sorted(set(manifest["files"]) - {p.name for p in release.iterdir()}):
        refused[name] = f"listed in manifest.json but missing: run `dvc pull package@{variant}`"
    if CARD not in refused and (why := card_refusals(release / CARD, manifest, {u.name for u in uploads})):
        refused[CARD] = "; ".join(why)
    if refused:
        lines = "\n".join(f"  {name}: {why}" for name, why in refused.items())
        raise RefusedError(f"refusing to publish {release} (nothing was sent):\n{lines}")
    return uploads, manifest
