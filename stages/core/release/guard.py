"""The licence guard of `python -m stages.publish`: reads a release directory (its files, manifest.json
and dataset card), dvc.yaml's private outs, dvc.lock's record of package@<variant>'s outs and
translate@<subset>'s instructions, and returns the files that may be published with their sizes and
sha256, or raises naming every file it refuses and why, one line a file. Nothing is sent anywhere.

A file is published only when package@<variant> wrote it for the public: listed in manifest.json's
`files` with the size and sha256 recorded there (README.md and manifest.json are the two package writes
beside them), under a name package writes, not a private out of dvc.yaml (nor a link to one); the
directory as dvc.lock records package@<variant>'s out (a manifest edited to match edited files is not
what DVC recorded); Parquet or JSON lines holding only the columns, at any depth, that the card
declares, none of LMSYS-Chat-1M's, and no private instruction text in any value (leaks.py); the
encrypted instructions OpenPGP encrypted data that decrypts with the release's key to exactly the
released rows (openpgp.py); and the card with its licences and `configs` over files of the upload.
What it cannot see: docs/security.md."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.core.config.errors import PipelineError, SourceError
from stages.core.config.params import Params
from stages.core.release import card, leaks, openpgp
from stages.core.release.files import licence_texts
from stages.core.release.merged import LMSYS
from stages.core.rows import fields
from stages.core.storage.jsonl import CHUNK, sha256_file

# package@<variant> writes both beside the files that manifest.json's `files` lists
CARD, MANIFEST = "README.md", "manifest.json"
PLAINTEXT = "plaintext Japanese instructions (LMSYS-Chat-1M licence: only the encrypted file is published)"
PRIVATE_COLUMNS = {
    fields.INSTRUCTION: PLAINTEXT,
    "instruction_ja": PLAINTEXT,  # translate's column (stages/core/release/files.py FLAGS)
    **{column: "an LMSYS-Chat-1M column (its licence: private remote only)" for column in LMSYS},
}
GZIP_MAGIC = b"\x1f\x8b"
SHA256 = re.compile(r"[0-9a-f]{64}")
CACHE = Path(".dvc/cache/files/md5")  # where DVC 3 keeps a directory out's listing, <md5[:2]>/<md5[2:]>


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
    """The release's manifest.json; SourceError saying how to get the release when it is not there,
    RefusedError in one line when it is not JSON or not package@<variant>'s manifest."""
    fix = f"run `dvc repro package@{variant}` (to build it) or `dvc pull package@{variant}` first"
    if not release.is_dir():
        raise SourceError(f"{release} does not exist: {fix}")
    missing = [name for name in (MANIFEST, CARD) if not (release / name).is_file()]
    if missing:
        raise SourceError(f"{release} has no {' or '.join(missing)}: not a whole release; {fix}")
    try:
        manifest = json.loads((release / MANIFEST).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise refusal(release, {MANIFEST: [f"not JSON ({err}): {fix}"]}) from None
    if (why := manifest_shape(manifest, variant)) is not None:
        raise refusal(release, {MANIFEST: [f"not package@{variant}'s manifest: {why}; {fix}"]})
    return manifest


def manifest_shape(manifest: object, variant: str) -> str | None:
    """What keeps `manifest` from the shape package writes, or None: an object naming the variant,
    whose `files` maps plain file names to their sha256, size and (optional) plaintext_sha256."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if manifest.get("variant") != variant:
        return f"its variant is not {variant}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "it has no `files` object"
    for name, entry in files.items():
        if not name or "/" in name or name in (".", ".."):
            return "files has an entry whose name is no file name of the release directory"
        if not isinstance(entry, dict) or not set(entry) <= {"sha256", "size", "plaintext_sha256"}:
            return f"files.{name} is not an object of sha256, size and plaintext_sha256"
        digests = [entry.get("sha256"), *([entry["plaintext_sha256"]] if "plaintext_sha256" in entry else [])]
        if not all(isinstance(d, str) and SHA256.fullmatch(d) for d in digests):
            return f"files.{name} has a sha256 that is not 64 hex digits"
        if type(entry.get("size")) is not int or entry["size"] < 0:
            return f"files.{name}.size is not a whole number of bytes"
    return None


def refusal(release: Path, refused: dict[str, list[str]]) -> RefusedError:
    """The refusal of `release`: one line a file, its reasons joined."""
    lines = "\n".join(f"  {name}: {'; '.join(why)}" for name, why in refused.items())
    return RefusedError(f"refusing to publish {release} (nothing was sent):\n{lines}")


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
    """The column paths the card's `dataset_info` declares (any config), every level: `a`, `a[]`,
    `a[].role` for a list of structs."""
    info = (meta or {}).get("dataset_info") or []
    found: set[str] = set()
    for config in info if isinstance(info, list) else [info]:
        for feature in config.get("features") or [] if isinstance(config, dict) else []:
            if isinstance(feature, dict) and isinstance(feature.get("name"), str):
                found |= {feature["name"], *_feature_paths(feature, feature["name"])}
    return found


def _feature_paths(feature: object, path: str) -> set[str]:
    """The paths under a `datasets` feature in the card's YAML forms (dtype, list, sequence, struct)."""
    found: set[str] = set()
    if isinstance(feature, list):  # a struct's fields
        for sub in feature:
            if isinstance(sub, dict) and isinstance(sub.get("name"), str):
                found |= {f"{path}.{sub['name']}", *_feature_paths(sub, f"{path}.{sub['name']}")}
    elif isinstance(feature, dict):
        for key in ("list", "sequence"):
            if key in feature:
                found |= {f"{path}[]", *_feature_paths(feature[key], f"{path}[]")}
        if "struct" in feature:
            found |= _feature_paths(feature["struct"], path)
    return found


def column_refusal(paths: set[str], allowed: set[str]) -> str | None:
    """Why a public data file's column paths (every depth) keep it from being published, or None."""
    private = [
        f"column {p}: {PRIVATE_COLUMNS[_leaf(p)]}" for p in sorted(paths) if _leaf(p) in PRIVATE_COLUMNS
    ]
    if private:
        return "holds " + "; ".join(private)
    undeclared = [p for p in sorted(paths) if allowed and p not in allowed]
    return f"holds columns the card does not declare: {', '.join(undeclared)}" if undeclared else None


def _leaf(path: str) -> str:
    return path.replace("[]", "").rsplit(".", 1)[-1]


def encrypted_refusal(path: Path, entry: dict | None) -> str | None:
    """Why the encrypted instructions file is not what it claims (OpenPGP encrypted data, not its
    plaintext), read from its packet headers (openpgp.py)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if entry is None or "plaintext_sha256" not in entry:
        return "a .gpg file manifest.json does not record as the encrypted instructions"
    if entry["sha256"] == entry["plaintext_sha256"] or head == GZIP_MAGIC:
        return "not encrypted: it holds the plaintext instructions (gzip JSON lines) under the .gpg name"
    return openpgp.packet_refusal(path)


def _unreadable(path: Path, variant: str, private: dict[Path, str]) -> str | None:
    """Why an entry of the release directory is refused without being read, or None."""
    if (why := _private(path, private)) is not None:
        return why
    if path.is_symlink() or not path.is_file():
        return f"not a regular file: package@{variant} writes none"
    return None


def _unlisted(path: Path, manifest: dict) -> str | None:
    """Why a file of the release directory is not package's by the manifest, or None."""
    if path.name not in manifest["files"] and path.name not in (CARD, MANIFEST):
        variant = manifest["variant"]
        return (
            f"not written by package@{variant} (manifest.json does not list it): remove it, or rebuild "
            f"the release with `dvc repro package@{variant}`"
        )
    return None


@dataclass(frozen=True)
class Release:
    """What the content checks of one release need: its params and variant, the names package writes,
    the column paths its card declares and the private instructions."""

    params: Params
    variant: str
    names: set[str]
    texts: dict[str, Path]  # the licence texts package copies from fetch's out, by name
    allowed: set[str]
    private: leaks.PrivateText

    @classmethod
    def of(cls, params: Params, variant: str, release: Path) -> Release:
        subset, stem = params.models[variant].subset, params.release_stem(variant)
        texts = {path.name: path for path in licence_texts(params.paths.released)}
        names = {f"{stem}.{suffix}" for suffix in params.release.formats} | set(texts)
        names |= {params.release.instructions_file.format(subset=subset), CARD, MANIFEST}
        allowed = declared(front_matter(release / CARD))
        return cls(params, variant, names, texts, allowed, leaks.private_text(params, variant))


def _content(upload: Upload, manifest: dict, release: Release) -> list[str]:
    """Why a file of the release is refused for what it holds (the card's metadata is checked apart)."""
    why, entry, variant = [], manifest["files"].get(upload.name), release.variant
    if entry is not None and (upload.sha256, upload.size) != (entry["sha256"], entry["size"]):
        why.append(f"differs from manifest.json's sha256 and size: changed after package@{variant} wrote it")
    if entry is not None and upload.name not in release.names:
        why.append(f"not a file package@{variant} writes (it writes {', '.join(sorted(release.names))})")
    if upload.name.endswith(".gpg"):
        if (bad := encrypted_refusal(upload.path, entry)) is None:
            bad = openpgp.decrypted_refusal(release.params, variant, upload.path)
        return [*why, bad] if bad else why
    data = upload.name.endswith((".parquet", ".jsonl.gz"))
    if upload.name in release.texts and sha256_file(release.texts[upload.name]) != upload.sha256:
        why.append(f"not the licence text fetch took ({release.texts[upload.name]}): changed after package")
    elif not data and upload.name not in (CARD, MANIFEST, *release.texts):
        return [
            *why,
            "a kind of file package@ does not publish (only .parquet, .jsonl.gz, the .gpg, licences)",
        ]
    found = leaks.scan(upload.path, release.private)
    if data and (bad := column_refusal(found.paths, release.allowed)):
        why.append(bad)
    return [*why, found.leaks] if found.leaks else why


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listing_md5(listing: dict[str, str]) -> str:
    """The md5 DVC gives a directory out with these files (relative path: md5): that of its `.dir`
    listing, a JSON list sorted by path (dvc_data's Tree.as_bytes)."""
    entries = [{"md5": md5, "relpath": name} for name, md5 in sorted(listing.items())]
    return (
        hashlib.md5(json.dumps(entries, sort_keys=True).encode(), usedforsecurity=False).hexdigest() + ".dir"
    )


def _recorded_out(root: Path, stage: str, out: str) -> dict | str:
    """dvc.lock's entry of `stage`'s directory out `out`, or why there is none."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return "does not exist"
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        return f"is not YAML ({str(err).splitlines()[0]})"
    stages = data.get("stages") if isinstance(data, dict) else None
    recorded = stages.get(stage) if isinstance(stages, dict) else None
    outs = recorded.get("outs") if isinstance(recorded, dict) else None
    for entry in outs if isinstance(outs, list) else []:
        same = isinstance(entry, dict) and os.path.normpath(str(entry.get("path"))) == os.path.normpath(out)
        if same and isinstance(entry.get("md5"), str) and entry["md5"].endswith(".dir"):
            return entry
    return f"records no out {out} of {stage}"


def _cached_listing(root: Path, md5: str) -> dict[str, str] | None:
    """The files DVC recorded for a directory out (the cache's `.dir` listing), when the cache holds
    it and it hashes to its name; None otherwise."""
    path = root / CACHE / md5[:2] / md5[2:]
    try:
        data = path.read_bytes()
        listing = {e["relpath"]: e["md5"] for e in json.loads(data)}
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return listing if hashlib.md5(data, usedforsecurity=False).hexdigest() + ".dir" == md5 else None


def recorded_refusals(root: Path, params: Params, variant: str, release: Path) -> dict[str, str]:
    """Why the release directory is not what DVC recorded for package@<variant>'s out in dvc.lock, by
    file (by `dvc.lock` when no file can be named); {} when it is."""
    stage, out = f"package@{variant}", params.paths.release_of(variant)
    fix = f"run `dvc repro {stage}` (or `dvc pull {stage}` for a release dvc.lock records)"
    entry = _recorded_out(root, stage, out)
    if isinstance(entry, str):
        return {
            "dvc.lock": f"{entry}: this release was not built by `dvc repro {stage}`, so nothing vouches for "
            f"manifest.json; {fix}"
        }
    files = {p.relative_to(release).as_posix(): p for p in sorted(release.rglob("*")) if p.is_file()}
    listing = {name: md5_file(path) for name, path in files.items()}
    if _listing_md5(listing) == entry["md5"]:
        return {}
    recorded = _cached_listing(root, entry["md5"])
    if recorded is None:
        return {
            "dvc.lock": f"records {out} as {entry['md5']}; its files are not that (changed after `dvc repro "
            f"{stage}` wrote them; the listing is not in {CACHE} to name them): {fix}"
        }
    refused = {}
    for name in sorted(set(listing) | set(recorded)):
        if name not in recorded:
            refused[name] = f"not among the files dvc.lock records for {stage}: {fix}"
        elif name not in listing:
            refused[name] = f"recorded in dvc.lock for {stage} but missing: {fix}"
        elif listing[name] != recorded[name]:
            refused[name] = (
                f"md5 {listing[name]}, not the {recorded[name]} dvc.lock records for {stage}: {fix}"
            )
    return refused


def publishable(params: Params, variant: str, root: Path) -> tuple[list[Upload], dict]:
    """The files of variant's release directory to publish (by name) and its manifest; RefusedError
    naming every refused file and why when any is, so that nothing is published."""
    release = root / params.paths.release_of(variant)
    manifest = read_manifest(release, variant)
    private = private_outs(root)
    # where package and merge keep plaintext while they run (stages/package.py's private_tempdir)
    private[(root / params.paths.instructions).parent.resolve()] = "the private scratch directory"
    checks = Release.of(params, variant, release)
    refused: dict[str, list[str]] = {}
    uploads = []
    for path in sorted(release.iterdir()):
        if (why := _unreadable(path, variant, private)) is not None:
            refused[path.name] = [why]
            continue
        upload = Upload(path.name, path, path.stat().st_size, sha256_file(path))
        why = [w for w in [_unlisted(path, manifest), *_content(upload, manifest, checks)] if w]
        if why:
            refused[path.name] = why
        else:
            uploads.append(upload)
    for name in sorted(set(manifest["files"]) - {p.name for p in release.iterdir()}):
        refused[name] = [f"listed in manifest.json but missing: run `dvc pull package@{variant}`"]
    if CARD not in refused and (why := card_refusals(release / CARD, manifest, {u.name for u in uploads})):
        refused[CARD] = why
    for name, why in recorded_refusals(root, params, variant, release).items():
        refused.setdefault(name, []).append(why)
    if refused:
        raise refusal(release, refused)
    return uploads, manifest
