"""Key derivation and gpg encryption: round trips, gpg by hand, and clean failures."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
from pathlib import Path

import pytest

from stages.core.crypto import CryptoError, KeySpec, decrypt_file, derive_key, encrypt_file
from stages.core.io import read_jsonl_gz

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
SAMPLE_KEY = KeySpec(file="data/train-00000-of-00002-*.parquet")
RELEASED = SAMPLE / "lmsys-chat-1m-synth" / "dataset"


def test_key_is_the_sha256_of_the_first_shard():
    shard = next((SAMPLE / "lmsys-chat-1m" / "data").glob("train-00000-of-00002-*.parquet"))
    assert derive_key(SAMPLE / "lmsys-chat-1m", SAMPLE_KEY) == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_key_file_must_match_exactly_one_file():
    with pytest.raises(
        CryptoError, match=r"decrypt\.key\.file='data/train-\*\.parquet' must match exactly one"
    ):
        derive_key(SAMPLE / "lmsys-chat-1m", KeySpec(file="data/train-*.parquet"))


def test_base64_key_encoding_differs_from_hex():
    spec = KeySpec(file=SAMPLE_KEY.file, hash="sha512", encoding="base64")
    assert len(derive_key(SAMPLE / "lmsys-chat-1m", spec)) == 88


def test_sample_release_decrypts_with_the_derived_key(tmp_path):
    key = derive_key(SAMPLE / "lmsys-chat-1m", SAMPLE_KEY)
    out = tmp_path / "ja.jsonl.gz"
    decrypt_file(RELEASED / "lmsys-chat-1m-first-turn-user-instructions-ja.jsonl.gz.gpg", out, key)
    records = list(read_jsonl_gz(out))
    assert len(records) > 250
    assert records[0]["translated_conversation"][0]["role"] == "user"


def test_round_trip_and_gpg_by_hand(tmp_path):
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(gzip.compress(b'{"conversation_id": "x"}\n', mtime=0))
    encrypted = tmp_path / "plain.jsonl.gz.gpg"
    encrypt_file(plain, encrypted, "s3cret-passphrase")
    assert encrypted.read_bytes()[:1] != plain.read_bytes()[:1]
    back = tmp_path / "back.jsonl.gz"
    decrypt_file(encrypted, back, "s3cret-passphrase")
    assert back.read_bytes() == plain.read_bytes()
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    by_hand = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            "0",
            "--decrypt",
            str(encrypted),
        ],
        input=b"s3cret-passphrase\n",
        capture_output=True,
        check=True,
    )
    assert by_hand.stdout == plain.read_bytes()


def test_wrong_key_fails_and_leaves_no_output(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"secret text")
    encrypt_file(plain, tmp_path / "plain.gpg", "right")
    out = tmp_path / "out" / "plain.bin"
    with pytest.raises(CryptoError, match="could not decrypt"):
        decrypt_file(tmp_path / "plain.gpg", out, "wrong")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_non_gpg_file_fails_cleanly(tmp_path):
    bogus = tmp_path / "bogus.gpg"
    bogus.write_bytes(b"this is not an OpenPGP message\n" * 10)
    with pytest.raises(CryptoError, match="could not decrypt"):
        decrypt_file(bogus, tmp_path / "out.bin", "any")
    assert not (tmp_path / "out.bin").exists()
