"""Atomic files: a file or directory takes its place whole or not at all, a failed write is one
WriteError naming the file and the space left on its filesystem (and the previous version stays
whole), and what a killed writer left behind is cleaned up by the next one."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from stages.core.config.errors import PipelineError

if TYPE_CHECKING:
    import pyarrow.parquet as pq

LOG = logging.getLogger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # raised only by a write: whoever raised it, the disk is full


class WriteError(PipelineError, OSError):
    """A file could not be written: the message names it and the space left on its filesystem."""


@contextlib.contextmanager
def writing(path: str | os.PathLike, only: tuple[int, ...] | None = None) -> Iterator[None]:
    """Turn an OSError raised in the block, which writes `path`, into a WriteError naming `path` and
    the space left (with `only`, just the errors of those errno values)."""
    try:
        yield
    except OSError as err:
        if isinstance(err, PipelineError) or (only is not None and err.errno not in only):
            raise
        fix = "; free some space and run the stage again" if err.errno in DISK_FULL else ""
        reason = f"{err.strerror or err} ({_free(path)} free on its disk)"
        error = WriteError(f"cannot write {path}: {reason}{fix}")
        error.errno = err.errno
        raise error from _acyclic(err)


def _acyclic(err: BaseException) -> BaseException:
    """`err`, its chain of __context__ cut where it comes back to itself.

    zlib-ng's threaded writer raises its one stored exception again from every later write, flush
    and close, and io.BufferedWriter.close chains the last two: the exception becomes its own
    __context__. contextlib.ExitStack, finding that chain under another pending error, walks it
    forever (100% CPU, no message)."""
    seen, link = {id(err)}, err
    while (context := link.__context__) is not None:
        if id(context) in seen:
            link.__context__ = None
            break
        seen.add(id(context))
        link = context
    return err


def _free(path: str | os.PathLike) -> str:
    """The space left on the filesystem of `path` (of its nearest existing parent), for a message."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = float(shutil.disk_usage(where).free)
    except OSError:
        return "unknown space"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024:
            return f"{free:,.0f} {unit}" if unit == "bytes" else f"{free:,.1f} {unit}"
        free /= 1024
    return f"{free:,.1f} TiB"


def discard(writer: BinaryIO | pq.ParquetWriter) -> None:
    """Close the writer of a file that is thrown away (its block failed): a second error from it,
    most often the same full disk, adds nothing to the block's, which goes on."""
    try:
        writer.close()
    except OSError as err:
        _acyclic(err)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    The file's data is flushed to disk (fsync) before the rename and the directory entry after
    it, so a crash or power loss leaves either the old file or the whole new one. A full disk in
    the block, or an error of the flush or the rename, is a WriteError naming `path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_litter(path.parent, f".{path.name}.")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        with writing(path, DISK_FULL):
            yield tmp_path
        with writing(path):
            fsync(tmp_path)
            os.replace(tmp_path, path)
            fsync(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


LITTER = re.compile(r"\.(?P<pid>\d+)\.[^/]*\.(?:tmp|partial|old)$")  # what a killed writer leaves


def clean_litter(directory: Path, prefix: str) -> None:
    """Remove what writers killed before they could clean up left in `directory`: the entries named
    `<prefix><pid>.<random>.tmp|partial|old` (see atomic_path, staged_dir, private_tempdir) whose
    process no longer runs. A live process's entries are its own and are left alone."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        found = LITTER.search(entry.name[len(prefix) - 1 :]) if entry.name.startswith(prefix) else None
        if found and not running(int(found["pid"])):
            LOG.info("removing %s, left by a process that was killed (pid %s)", entry, found["pid"])
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def running(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def private_tempdir(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A directory only this user can read (0700) under `parent` (a private data directory, never the
    system's temp dir), for plaintext intermediates; removed on exit, and by the next run's
    `clean_litter` if this process is killed."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_litter(parent, f".{name}.")
    path = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling directory that replaces `path` only if the block succeeds.

    Every file in it, however it was written, is flushed to disk before the rename; a full disk in
    the block, or an error of the flush or the rename, is a WriteError naming `path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_litter(path.parent, f".{path.name}.")
        staging = Path(
            tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
        )
    old = staging.with_suffix(".old")
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700
        with writing(path, DISK_FULL):
            yield staging
        with writing(path):
            for entry in [*staging.rglob("*"), staging]:
                if not entry.is_symlink():
                    fsync(entry)
            if path.exists():
                os.replace(path, old)  # the previous version stays whole until the new one is in place
            try:
                os.replace(staging, path)
            except OSError:
                if old.exists():
                    os.replace(old, path)
                raise
            fsync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
