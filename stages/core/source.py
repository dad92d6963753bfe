"""Copy source files from a local path, s3:// or hf://datasets/... (fsspec) and verify checksums."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import fsspec
from tqdm import tqdm

from stages.core.io import CHUNK, atomic_path
from stages.core.params import SourceSpec

LOG = logging.getLogger(__name__)
HF_PREFIX = "hf://"


class ChecksumError(RuntimeError):
    """A fetched file's sha256 differs from the one pinned in params."""


def open_source(spec: SourceSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem and root path of `spec.uri` (the Hub revision is part of the path)."""
    if spec.uri.startswith(HF_PREFIX):
        from huggingface_hub import HfFileSystem

        root = spec.uri.removeprefix(HF_PREFIX)
        if spec.revision:
            root = f"{root}@{spec.revision}"
        return HfFileSystem(token=os.environ.get("HF_TOKEN")), root
    fs, root = fsspec.url_to_fs(spec.uri)
    return fs, root.rstrip("/")


def list_files(spec: SourceSpec) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Return (fs, root, relative paths) of the files matching `spec.include`, sorted."""
    fs, root = open_source(spec)
    found = set()
    for pattern in spec.include:
        for path in fs.glob(f"{root}/{pattern}"):
            found.add(path[len(root) :].lstrip("/") if path.startswith(root) else Path(path).name)
    if not found:
        raise FileNotFoundError(f"no file under {spec.uri} matches {spec.include}")
    return fs, root, sorted(found)


def fetch_files(spec: SourceSpec, dest: str | os.PathLike) -> list[dict]:
    """Copy the matching files to `dest` (same relative paths); return a manifest of size and sha256."""
    fs, root, names = list_files(spec)
    unknown = sorted(set(spec.sha256) - set(names))
    if unknown:
        raise ChecksumError(f"checksums are pinned for files that {spec.uri} does not have: {unknown}")
    manifest = []
    for name in tqdm(names, desc=f"fetch {spec.uri}", unit="file"):
        digest, size = hashlib.sha256(), 0
        with fs.open(f"{root}/{name}", "rb") as src, atomic_path(Path(dest) / name) as tmp:
            with open(tmp, "wb") as out:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            expected = spec.sha256.get(name)
            if expected is not None and expected != digest.hexdigest():
                raise ChecksumError(f"{name}: sha256 {digest.hexdigest()} but params pin {expected}")
        LOG.info("fetched %s (%d bytes, sha256 %s)", name, size, digest.hexdigest())
        manifest.append({"path": name, "size": size, "sha256": digest.hexdigest()})
    return manifest
