"""Key derivation and gpg encryption: round trips, gpg by hand, and clean failures."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
from pathlib import Path

import gnupg
import pyarrow.parquet as pq
import pytest

from stages.core.crypto import CryptoError, KeySpec, decrypt_file, derive_key, encrypt_file
from stages.core.io import read_jsonl_gz

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
SAMPLE_KEY = KeySpec(file="data/train-00000-of-00002-*.parquet")
RELEASED = SAMPLE / "lmsys-chat-1m-synth" / "dataset"


def test_key_is_the_sha256_of_the_first_shard():
    shard = next((SAMPLE / "lmsys-chat-1m" / "data").glob("train-00000-of-00002-*.parquet"))
    assert derive_key(SAMPLE / "lmsys-chat-1m", SAMPLE_KEY) == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_key_file_must_match_a_file():
    with pytest.raises(CryptoError, match=r"decrypt\.key\.file='data/test-\*\.parquet' matches no file"):
        derive_key(SAMPLE / "lmsys-chat-1m", KeySpec(file="data/test-*.parquet"))


def test_several_files_are_hashed_in_sorted_order():
    shards = sorted((SAMPLE / "lmsys-chat-1m" / "data").glob("train-*.parquet"))
    expected = hashlib.sha256(b"".join(p.read_bytes() for p in shards)).hexdigest()
    assert derive_key(SAMPLE / "lmsys-chat-1m", KeySpec(file="data/train-*.parquet")) == expected


def test_column_key_hashes_the_values_not_the_encoding(tmp_path):
    shard = next((SAMPLE / "lmsys-chat-1m" / "data").glob("train-00000-*.parquet"))
    ids = pq.read_table(shard, columns=["conversation_id"])["conversation_id"].to_pylist()
    spec = KeySpec(file="data/train-00000-*.parquet", column="conversation_id")
    key = derive_key(SAMPLE / "lmsys-chat-1m", spec)
    assert key == hashlib.sha256("".join(f"{i}\n" for i in ids).encode()).hexdigest()
    copy = tmp_path / "data" / shard.name
    copy.parent.mkdir()
    pq.write_table(pq.read_table(shard), copy, compression="gzip", row_group_size=7)  # other bytes
    assert copy.read_bytes() != shard.read_bytes()
    assert derive_key(tmp_path, spec) == key
    with pytest.raises(CryptoError, match=r"decrypt\.key\.column='conversation_idx' is not a column"):
        derive_key(tmp_path, spec.model_copy(update={"column": "conversation_idx"}))


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


def test_truncated_file_fails_and_leaves_no_output(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(os.urandom(200_000))
    encrypt_file(plain, tmp_path / "full.gpg", "k")
    data = (tmp_path / "full.gpg").read_bytes()
    (tmp_path / "cut.gpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CryptoError, match="could not decrypt"):
        decrypt_file(tmp_path / "cut.gpg", tmp_path / "out.bin", "k")
    assert not (tmp_path / "out.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gpg", "full.gpg", "plain.bin"]


def test_corrupt_ciphertext_fails(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x" * 5000)
    encrypt_file(plain, tmp_path / "ok.gpg", "k")
    data = bytearray((tmp_path / "ok.gpg").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.gpg").write_bytes(bytes(data))
    with pytest.raises(CryptoError, match="could not decrypt"):
        decrypt_file(tmp_path / "bad.gpg", tmp_path / "out.bin", "k")
    assert not (tmp_path / "out.bin").exists()


def test_gpg_never_sees_the_passphrase_in_argv_nor_the_users_keyring(tmp_path, monkeypatch):
    home = tmp_path / "user-gnupg"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(home))
    seen: list[list[str]] = []
    real = gnupg.GPG.make_args

    def spy(self, args, passphrase):
        cmd = real(self, args, passphrase)
        if passphrase:
            seen.append(cmd)
        return cmd

    monkeypatch.setattr(gnupg.GPG, "make_args", spy)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"secret")
    encrypt_file(plain, tmp_path / "p.gpg", "very-secret-passphrase")
    decrypt_file(tmp_path / "p.gpg", tmp_path / "back.bin", "very-secret-passphrase")
    assert seen and all("very-secret-passphrase" not in " ".join(args) for args in seen)
    assert all("--passphrase-fd" in args for args in seen)
    homes = [args[args.index("--homedir") + 1] for args in seen]
    assert all(h != str(home) and not Path(h).exists() for h in homes)  # throwaway, removed
    assert list(home.iterdir()) == []


def test_non_gpg_file_fails_cleanly(tmp_path):
    bogus = tmp_path / "bogus.gpg"
    bogus.write_bytes(b"this is not an OpenPGP message\n" * 10)
    with pytest.raises(CryptoError, match="could not decrypt"):
        decrypt_file(bogus, tmp_path / "out.bin", "any")
    assert not (tmp_path / "out.bin").exists()
