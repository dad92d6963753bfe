"""Reuse an earlier release's ciphertext when its plaintext is unchanged (gpg output is random,
so re-encrypting identical plaintext would make an unchanged release look changed)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from stages.core.storage.crypto import CryptoError, decrypt_file
from stages.core.storage.jsonl import sha256_file

LOG = logging.getLogger(__name__)


def _read_previous(path: str, target: Path) -> bool:
    """Copy the version of `path` that dvc.lock records (from the DVC cache or remote) to `target`."""
    import dvc.api
    from dvc.exceptions import DvcException
    from dvc_data.index import DataIndexError

    try:
        with dvc.api.open(path, mode="rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (DvcException, DataIndexError, OSError) as err:
        # no DVC repo, never packaged, or recorded but in neither the cache nor a reachable remote
        LOG.info("no earlier %s to reuse (%s)", path, type(err).__name__)
        return False
    return True


def previous_ciphertext(
    release_dirs: list[str], name: str, plaintext_sha256: str, passphrase: str, scratch: Path
) -> Path | None:
    """An earlier release's `name` that decrypts with `passphrase` to the same plaintext, else None.

    Looks in each of `release_dirs` as dvc.lock last recorded it; the candidate is decrypted and
    its plaintext hash compared, so a changed key or plaintext never reuses old ciphertext.
    """
    manifest, candidate, check = scratch / "manifest.json", scratch / "previous.gpg", scratch / "plain"
    for release_dir in release_dirs:
        if not _read_previous(f"{release_dir}/manifest.json", manifest):
            continue
        entry = json.loads(manifest.read_text(encoding="utf-8")).get("files", {}).get(name, {})
        if entry.get("plaintext_sha256") != plaintext_sha256:
            continue
        if not _read_previous(f"{release_dir}/{name}", candidate):
            continue
        try:
            decrypt_file(candidate, check, passphrase)
        except CryptoError:
            continue
        if sha256_file(check) == plaintext_sha256:
            LOG.info("plaintext unchanged: reusing the ciphertext of %s/%s", release_dir, name)
            return candidate
    LOG.info("no earlier release has this plaintext under this key: encrypting afresh")
    return None
