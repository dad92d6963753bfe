"""Copy source files from a local path, s3:// or hf://datasets/... (fsspec) and verify checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
from tqdm import tqdm

from stages.core.config.errors import PipelineError, SourceError
from stages.core.config.source_params import SourceSpec
from stages.core.storage.atomic import atomic_path
from stages.core.storage.jsonl import CHUNK, sha256_file

LOG = logging.getLogger(__name__)
HF_PREFIX = "hf://"
HUB = "https://huggingface.co/"
CONF = "conf/source/"  # where the profiles set fetch.source and fetch.released
LOCAL_COPY = f"set the uri in {CONF} to a local directory or s3:// copy of the files"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # either one turns huggingface_hub's offline mode on
# The HTTP client of each huggingface_hub (2.x: httpx2, 1.x: httpx, 0.x: requests) -> its error for "could
# not connect" and its error for "no answer in time"
CLIENT_ERRORS = {
    "httpx2": ("TransportError", "TimeoutException"),
    "httpx": ("TransportError", "TimeoutException"),
    "requests": ("ConnectionError", "Timeout"),
}


class ChecksumError(PipelineError, RuntimeError):
    """A fetched file's sha256 differs from the one pinned in params."""


class AccessError(PipelineError, PermissionError):
    """The gated Hub dataset cannot be read: no token, or the license is not accepted."""


class NoMatchError(SourceError):
    """No file of the source matches the include globs."""


class HubUnreachableError(PipelineError, ConnectionError):
    """The Hub cannot be reached: no network, a timeout, or huggingface_hub's offline mode."""


def _hub_repo(spec: SourceSpec) -> str:
    return spec.uri.removeprefix(HF_PREFIX)  # e.g. datasets/lmsys/lmsys-chat-1m


def _access_help(spec: SourceSpec, problem: str) -> str:
    return (
        f"{spec.uri}: {problem}. Accept the dataset's license at {HUB}{_hub_repo(spec)}, create a read "
        f"token at {HUB}settings/tokens and export HF_TOKEN=<token>"
    )


def _network_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(the network errors, the timeouts among them) of Python and of the HTTP clients loaded: only a
    loaded client can have raised one. Offline mode is a ConnectionError."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    timeouts: list[type[BaseException]] = [TimeoutError]
    for module, (error, timeout) in CLIENT_ERRORS.items():
        if (client := sys.modules.get(module)) is not None:
            errors += [getattr(client, error), getattr(client, timeout)]
            timeouts.append(getattr(client, timeout))
    return tuple(errors), tuple(timeouts)


def _offline_help(spec: SourceSpec) -> str:
    variable = next((v for v in OFFLINE_ENV if os.environ.get(v)), OFFLINE_ENV[0])
    return (
        f"{variable}={os.environ.get(variable, '1')} is set, and hf:// files are read only from the Hub, "
        f"never from the local Hugging Face cache, so {spec.include} cannot be fetched. Unset {variable} "
        f"where the Hub is reachable, or {LOCAL_COPY}"
    )


def _network_help(spec: SourceSpec, err: BaseException, timeout: bool) -> str:
    """The message for a Hub that offline mode, the network or a timeout keeps out of reach."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    where = spec.uri + (f"@{spec.revision}" if spec.revision else "")
    if isinstance(err, OfflineModeIsEnabled):
        return f"{where}: {_offline_help(spec)}"
    endpoint = spec.storage_options.get("endpoint") or constants.ENDPOINT
    mirror = "its storage_options.endpoint" if "endpoint" in spec.storage_options else "HF_ENDPOINT"
    detail = " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever the client wrote
    slow = "; on a slow network, raise HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT (seconds)"
    return (
        f"{where}: the Hub at {endpoint} is unreachable ({detail}). Check the network (or HTTPS_PROXY), "
        f"set {mirror} to a Hub mirror this machine reaches, or {LOCAL_COPY} ({spec.include})"
        + (slow if timeout else "")
    )


def _cause(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first of `err` and its causes (or contexts) that is one of `kinds`."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, kinds):
        cause = cause.__cause__ or cause.__context__
    return cause


@contextlib.contextmanager
def hub_access(spec: SourceSpec) -> Iterator[None]:
    """Turn the Hub's errors into one line with the fix: 'gated' or 'not found' (how to get access),
    offline mode, and a Hub that cannot be reached or does not answer in time."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    network, timeouts = _network_errors()
    try:
        yield
    except (OSError, *network) as err:
        denied = _cause(err, (GatedRepoError, RepositoryNotFoundError))
        if denied is not None:
            gated = isinstance(denied, GatedRepoError)
            problem = "no access with this token" if gated else "not found or no access"
            raise AccessError(_access_help(spec, problem)) from None
        unreachable = _cause(err, network)
        if unreachable is None:
            raise
        message = _network_help(spec, unreachable, isinstance(unreachable, timeouts))
        raise HubUnreachableError(message) from err


def open_source(spec: SourceSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem and root path of `spec.uri` (the Hub revision is part of the path)."""
    if spec.uri.startswith(HF_PREFIX):
        from huggingface_hub import HfFileSystem, get_token

        token = get_token()  # HF_TOKEN, else the token saved by `hf auth login`
        if not token:
            raise AccessError(_access_help(spec, "no Hugging Face token (HF_TOKEN is not set)"))
        root = _hub_repo(spec) + (f"@{spec.revision}" if spec.revision else "")
        # a fresh instance: fsspec would hand back the one an earlier call in this process made, with its
        # listings cached, and a branch's stale sizes would read the files its later commits changed wrong
        options = {"skip_instance_cache": True, **spec.storage_options}
        return HfFileSystem(token=token, **options), root
    fs, root = fsspec.url_to_fs(spec.uri, **spec.storage_options)
    return fs, root.rstrip("/")


def list_files(spec: SourceSpec) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Return (fs, root, relative paths) of the files matching `spec.include`, sorted."""
    fs, root = open_source(spec)
    found = {}
    with _guard(spec):
        for pattern in spec.include:
            matches = fs.glob(f"{root}/{pattern}", detail=True)
            found.update((path[len(root) :].lstrip("/"), info["type"]) for path, info in matches.items())
    if not found:
        raise NoMatchError(f"no file under {spec.uri} matches {spec.include}")
    folders = sorted(name for name, kind in found.items() if kind == "directory")
    if folders:
        raise SourceError(
            f"{spec.uri}/{folders[0]} is a directory, where {spec.include} should match files only: "
            f"remove or rename it, or narrow the include globs in {CONF}"
        )
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


def fetch_files(
    spec: SourceSpec, dest: str | os.PathLike, kept: str | os.PathLike | None = None
) -> list[dict]:
    """Copy the matching files to `dest` (same relative paths); return a manifest of size and sha256.

    A file whose sha256 differs from the one pinned in `spec.sha256` is removed and stops the fetch.
    With `kept` (a directory outside DVC's outs), a file whose bytes params fix (a sha256 pin, or a Hub
    commit revision) is downloaded once: a copy kept there is linked into `dest` when it still hashes
    as recorded (`_kept_copy`), and every such file fetched is kept there for the next run.
    """
    fs, root, names = list_files(spec)
    unknown = sorted(set(spec.sha256) - set(names))
    if unknown:
        raise ChecksumError(f"checksums are pinned for files that {spec.uri} does not have: {unknown}")
    manifest, reused = [], 0
    store = None if kept is None or not _fixed(spec) else Path(kept) / _store_name(spec)
    for name in tqdm(names, desc=f"fetch {spec.uri}", unit="file"):
        target = Path(dest) / name
        record = _kept_copy(store, spec, name, target) if store is not None and _fixed(spec, name) else None
        if record is not None:
            sha256, size, reused = record["sha256"], record["size"], reused + 1
        else:
            with _guard(spec):
                sha256, size = _copy(fs, f"{root}/{name}", target)
        expected = spec.sha256.get(name)
        if expected is not None and expected != sha256:
            target.unlink()
            raise ChecksumError(f"{spec.uri}/{name}: sha256 is {sha256} but params pin {expected}")
        if record is None and store is not None and _fixed(spec, name):
            _keep(store, spec, name, target, {"size": size, "sha256": sha256})
        LOG.info("%s %s (%d bytes, sha256 %s)", "reused" if record else "fetched", name, size, sha256)
        manifest.append({"path": name, "size": size, "sha256": sha256})
    if reused:
        LOG.info(
            "%s: %d of %d files reused from %s, not downloaded again", spec.uri, reused, len(names), store
        )
    return manifest


def _fixed(spec: SourceSpec, name: str | None = None) -> bool:
    """Whether params fix a file's bytes (its sha256 pin, or a Hub commit revision): only such a file is
    kept and reused (a branch or a local path may have changed). Without `name`: any file of `spec`."""
    commit = spec.uri.startswith(HF_PREFIX) and bool(re.fullmatch(r"[0-9a-f]{40}", spec.revision or ""))
    return commit or (name in spec.sha256 if name is not None else bool(spec.sha256))


def _store_name(spec: SourceSpec) -> str:
    return hashlib.sha256(f"{spec.uri}@{spec.revision}".encode()).hexdigest()[:16]


def _kept_copy(store: Path, spec: SourceSpec, name: str, target: Path) -> dict | None:
    """Link the kept copy of `name` into `target` and return its record, when the record is of this
    uri, revision and pin and the copy still hashes as it says; else None (it is downloaded)."""
    local, note = store / name, store / f"{name}.fetched.json"
    try:
        record = json.loads(note.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wanted = spec.sha256.get(name, record.get("sha256"))
    if (record.get("uri"), record.get("revision"), record.get("sha256")) != (spec.uri, spec.revision, wanted):
        return None
    if not local.is_file() or sha256_file(local) != wanted:
        return None
    _link(local, target)
    return record


def _keep(store: Path, spec: SourceSpec, name: str, fetched: Path, entry: dict) -> None:
    """Keep a fetched file (a hard link where the filesystem allows) and its record for the next run."""
    local = store / name
    local.parent.mkdir(parents=True, exist_ok=True)
    local.unlink(missing_ok=True)
    _link(fetched, local)
    with atomic_path(store / f"{name}.fetched.json") as tmp:
        tmp.write_text(json.dumps({"uri": spec.uri, "revision": spec.revision, "path": name, **entry}))


def _link(src: Path, dst: Path) -> None:
    """`dst` holds `src`'s bytes: a hard link, or a copy across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
