"""Key derivation from the LMSYS-Chat-1M files and symmetric gpg encryption with python-gnupg.

gpg always runs with a throwaway home directory (the user's keyring is never read or
written) and python-gnupg hands the passphrase over on a file descriptor
(`--passphrase-fd 0`), never on the command line.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import gnupg
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.errors import PipelineError
from stages.core.io import CHUNK, atomic_path
from stages.core.params import KeySpec

LOG = logging.getLogger(__name__)
CIPHER = "AES256"
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


def derive_key(source_root: str | os.PathLike, spec: KeySpec) -> str:
    """Return the passphrase derived from the files of `source_root` that match spec.file."""
    root = Path(source_root)
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
                raise CryptoError(f"gpg could not {action} {src}: {detail}")


def encrypt_file(src: str | os.PathLike, dst: str | os.PathLike, passphrase: str) -> None:
    """Encrypt `src` to `dst` with AES-256 under `passphrase` (OpenPGP, binary)."""
    _run_gpg("encrypt", Path(src), Path(dst), passphrase)
    LOG.info("encrypted %s -> %s", src, dst)


def decrypt_file(src: str | os.PathLike, dst: str | os.PathLike, passphrase: str) -> None:
    """Decrypt `src` to `dst`; on any failure `dst` is not created and CryptoError is raised."""
    _run_gpg("decrypt", Path(src), Path(dst), passphrase)
    LOG.info("decrypted %s -> %s", src, dst)
