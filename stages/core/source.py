"""Copy source files from a local path, s3:// or hf://datasets/... (fsspec) and verify checksums."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
from tqdm import tqdm

from stages.core.errors import PipelineError, SourceError
from stages.core.io import CHUNK, atomic_path
from stages.core.params import SourceSpec

LOG = logging.getLogger(__name__)
HF_PREFIX = "hf://"
HUB = "https://huggingface.co/"


class ChecksumError(PipelineError, RuntimeError):
    """A fetched file's sha256 differs from the one pinned in params."""


class AccessError(PipelineError, PermissionError):
    """The gated Hub dataset cannot be read: no token, or the license is not accepted."""


def _hub_repo(spec: SourceSpec) -> str:
    return spec.uri.removeprefix(HF_PREFIX)  # e.g. datasets/lmsys/lmsys-chat-1m


def _access_help(spec: SourceSpec, problem: str) -> str:
    return (
        f"{spec.uri}: {problem}. Accept the dataset's license at {HUB}{_hub_repo(spec)}, create a read "
        f"token at {HUB}settings/tokens and export HF_TOKEN=<token>"
    )


@contextlib.contextmanager
def hub_access(spec: SourceSpec) -> Iterator[None]:
    """Turn the Hub's 'gated' or 'not found' errors into one line saying how to get access."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        yield
    except OSError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, GatedRepoError | RepositoryNotFoundError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        problem = (
            "no access with this token" if isinstance(cause, GatedRepoError) else "not found or no access"
        )
        raise AccessError(_access_help(spec, problem)) from None


def open_source(spec: SourceSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem and root path of `spec.uri` (the Hub revision is part of the path)."""
    if spec.uri.startswith(HF_PREFIX):
        from huggingface_hub import HfFileSystem, get_token

        token = get_token()  # HF_TOKEN, else the token saved by `hf auth login`
        if not token:
            raise AccessError(_access_help(spec, "no Hugging Face token (HF_TOKEN is not set)"))
        root = _hub_repo(spec) + (f"@{spec.revision}" if spec.revision else "")
        return HfFileSystem(token=token, **spec.storage_options), root
    fs, root = fsspec.url_to_fs(spec.uri, **spec.storage_options)
    return fs, root.rstrip("/")


def list_files(spec: SourceSpec) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Return (fs, root, relative paths) of the files matching `spec.include`, sorted."""
    fs, root = open_source(spec)
    found = set()
    with _guard(spec):
        for pattern in spec.include:
            found.update(path[len(root) :].lstrip("/") for path in fs.glob(f"{root}/{pattern}"))
    if not found:
        raise SourceError(f"no file under {spec.uri} matches {spec.include}")
    return fs, root, sorted(found)


def _guard(spec: SourceSpec) -> contextlib.AbstractContextManager:
    return hub_access(spec) if spec.uri.startswith(HF_PREFIX) else contextlib.nullcontext()


def _copy(fs: fsspec.AbstractFileSystem, src: str, dst: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with fs.open(src, "rb") as handle, atomic_path(dst) as tmp, open(tmp, "wb") as out:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fetch_files(spec: SourceSpec, dest: str | os.PathLike) -> list[dict]:
    """Copy the matching files to `dest` (same relative paths); return a manifest of size and sha256.

    A file whose sha256 differs from the one pinned in `spec.sha256` is removed and stops the fetch.
    """
    fs, root, names = list_files(spec)
    unknown = sorted(set(spec.sha256) - set(names))
    if unknown:
        raise ChecksumError(f"checksums are pinned for files that {spec.uri} does not have: {unknown}")
    manifest = []
    for name in tqdm(names, desc=f"fetch {spec.uri}", unit="file"):
        target = Path(dest) / name
        with _guard(spec):
            sha256, size = _copy(fs, f"{root}/{name}", target)
        expected = spec.sha256.get(name)
        if expected is not None and expected != sha256:
            target.unlink()
            raise ChecksumError(f"{spec.uri}/{name}: sha256 is {sha256} but params pin {expected}")
        LOG.info("fetched %s (%d bytes, sha256 %s)", name, size, sha256)
        manifest.append({"path": name, "size": size, "sha256": sha256})
    return manifest
