"""Key derivation from the LMSYS-Chat-1M files and symmetric gpg encryption with python-gnupg.

The key is a digest of LMSYS files (method hash) or the stdout of the release's key script
(method script), run by bash in a throwaway working directory with PATH as its only variable.
The passphrase is never logged nor put in an error message.

gpg always runs with a throwaway home directory (the user's keyring is never read or
written) and python-gnupg hands the passphrase over on a file descriptor
(`--passphrase-fd 0`), never on the command line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import gnupg
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.errors import PipelineError
from stages.core.io import CHUNK, atomic_path
from stages.core.params import KeySpec, load_params

LOG = logging.getLogger(__name__)
CIPHER = "AES256"
STDERR_LINES = 5  # lines of a failed key script's stderr quoted in the error (never its stdout)
KILL_GRACE = 5.0  # seconds to collect a killed key script's output
__all__ = ["CryptoError", "KeySpec", "decrypt_file", "derive_key", "encrypt_file"]


class CryptoError(PipelineError, RuntimeError):
    """Encryption or decryption failed; no plaintext output was left behind."""


def _digest_column(digest, path: Path, column: str) -> None:
    with pq.ParquetFile(path) as parquet:
        if column not in parquet.schema_arrow.names:
            raise CryptoError(f"decrypt.key.column={column!r} is not a column of {path}")
        for batch in parquet.iter_batches(columns=[column]):
            for value in batch.column(0).cast(pa.string()).to_pylist():
                digest.update(f"{'' if value is None else value}\n".encode())


def derive_key(
    source_root: str | os.PathLike, spec: KeySpec, released_root: str | os.PathLike | None = None
) -> str:
    """Return the passphrase of the released files: a digest of the files of `source_root` that
    match spec.file (method hash), or the trimmed stdout of spec.script under `released_root`
    (method script; None: params.yaml's paths.released)."""
    if spec.method == "script":
        released = Path(load_params().paths.released if released_root is None else released_root)
        return _script_key(Path(source_root), spec, released)
    return _hash_key(Path(source_root), spec)


def _hash_key(root: Path, spec: KeySpec) -> str:
    matches = sorted(p for p in root.glob(spec.file) if p.is_file())
    if not matches:
        raise CryptoError(f"decrypt.key.file={spec.file!r} matches no file under {root}")
    digest = hashlib.new(spec.hash)
    for path in matches:
        if spec.column is not None:
            _digest_column(digest, path, spec.column)
            continue
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    if spec.encoding == "hex":
        return digest.hexdigest()
    return base64.b64encode(digest.digest()).decode("ascii")


def _run_isolated(argv: list[str], cwd: str, timeout: float) -> tuple[int | None, bytes, bytes]:
    """Run argv in a session of its own with PATH as the only variable; return (exit status, stdout,
    stderr), the status None when it ran past `timeout` and its whole process group was killed."""
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    pipe = subprocess.PIPE
    with subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the script and whatever it started
            out, err = b"", b""
            with contextlib.suppress(subprocess.TimeoutExpired):
                out, err = proc.communicate(timeout=KILL_GRACE)
            return None, out, err
    return proc.returncode, out, err


def _stderr_tail(err: bytes) -> str:
    lines = [line.rstrip()[:300] for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "its stderr is empty"
    return "its stderr ends:\n  " + "\n  ".join(lines[-STDERR_LINES:])


def _script_key(source: Path, spec: KeySpec, released: Path) -> str:
    script = released / spec.script
    if not script.is_file():
        raise CryptoError(
            f"decrypt.key.script={spec.script!r}: {script} not found (is it in fetch.released.include?)"
        )
    if not source.is_dir():
        raise CryptoError(f"decrypt.key.method=script: the source root {source} is not a directory")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keyscript-") as cwd:
        link = Path(cwd) / spec.layout  # the LMSYS files, laid out as the script expects
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source.resolve(), target_is_directory=True)
        argv = ["bash", str(script.resolve()), *(a.replace("{source}", spec.layout) for a in spec.args)]
        status, out, err = _run_isolated(argv, cwd, spec.timeout)
    if status is None:
        raise CryptoError(
            f"key script {script} ran past decrypt.key.timeout={spec.timeout:g} s and was killed; "
            f"{_stderr_tail(err)}"
        )
    if status != 0:
        raise CryptoError(f"key script {script} exited with status {status}; {_stderr_tail(err)}")
    try:
        passphrase = out.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CryptoError(f"key script {script} printed bytes that are not UTF-8, not a passphrase") from None
    if not passphrase or "\n" in passphrase:
        what = "nothing" if not passphrase else f"{len(passphrase.splitlines())} lines"
        raise CryptoError(
            f"key script {script} exited with status 0 but printed {what} on stdout, not a one-line "
            f"passphrase; {_stderr_tail(err)}"
        )
    LOG.info("key: ran %s in %.1f s", script, time.monotonic() - start)
    return passphrase


def _run_gpg(action: str, src: Path, dst: Path, passphrase: str) -> None:
    with tempfile.TemporaryDirectory(prefix="gpghome-") as home, open(src, "rb") as handle:
        os.chmod(home, 0o700)
        gpg = gnupg.GPG(gnupghome=home)
        with atomic_path(dst) as tmp:
            if action == "encrypt":
                result = gpg.encrypt_file(
                    handle,
                    recipients=None,
                    symmetric=CIPHER,
                    passphrase=passphrase,
                    armor=False,
                    output=str(tmp),
                    extra_args=["--compress-algo", "none", "--s2k-digest-algo", "SHA512"],
                )
            else:
                result = gpg.decrypt_file(handle, passphrase=passphrase, output=str(tmp))
            if not result.ok:
                detail = (result.status or "unknown error").strip()
                if "BAD_PASSPHRASE" in (result.stderr or ""):
                    detail += " (wrong passphrase: the key that decrypt.key gives does not open it)"
                raise CryptoError(f"gpg could not {action} {src}: {detail}")


def encrypt_file(src: str | os.PathLike, dst: str | os.PathLike, passphrase: str) -> None:
    """Encrypt `src` to `dst` with AES-256 under `passphrase` (OpenPGP, binary)."""
    _run_gpg("encrypt", Path(src), Path(dst), passphrase)
    LOG.info("encrypted %s -> %s", src, dst)


def decrypt_file(src: str | os.PathLike, dst: str | os.PathLike, passphrase: str) -> None:
    """Decrypt `src` to `dst`; on any failure `dst` is not created and CryptoError is raised."""
    _run_gpg("decrypt", Path(src), Path(dst), passphrase)
    LOG.info("decrypted %s -> %s", src, dst)
