"""Key derivation and gpg encryption: round trips, gpg by hand, and clean failures."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import gnupg
import pyarrow.parquet as pq
import pytest
import yaml

from stages.compose import compose_params
from stages.core.crypto import CryptoError, KeySpec, decrypt_file, derive_key, encrypt_file
from stages.core.io import read_jsonl_gz
from stages.core.params import ParamsError, validate
from stages.core.source import ChecksumError
from tests.conftest import run_stage, set_params

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
SAMPLE_KEY = KeySpec(file="data/train-00000-of-00002-*.parquet")
RELEASED = SAMPLE / "lmsys-chat-1m-synth" / "dataset"
SCRIPT = "scripts/compute_decryption_key_from_lmsys-chat-1m.sh"
ENCRYPTED = "dataset/lmsys-chat-1m-first-turn-user-instructions-ja.jsonl.gz.gpg"


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


# --- decrypt.key.method: script (the published procedure's path) ---


def _script_key(tmp_path: Path, body: str, **spec) -> str:
    """Run a key script of `body` (under tmp_path/released) over the sample's LMSYS files."""
    script = tmp_path / "released" / SCRIPT
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(body, encoding="utf-8")
    key = KeySpec(**{"method": "script", "script": SCRIPT, "args": ["{source}"], "timeout": 20, **spec})
    return derive_key(SAMPLE / "lmsys-chat-1m", key, released_root=tmp_path / "released")


def test_sample_config_runs_the_sample_key_script_and_opens_the_release(tmp_path):
    params = validate(yaml.safe_load(compose_params(["profile=sample"])))
    spec = params.decrypt.key
    assert (spec.method, spec.script) == ("script", SCRIPT)
    key = derive_key(SAMPLE / "lmsys-chat-1m", spec, released_root=SAMPLE / "lmsys-chat-1m-synth")
    assert key == derive_key(SAMPLE / "lmsys-chat-1m", SAMPLE_KEY)  # the .gpg files' key, unchanged
    decrypt_file(SAMPLE / "lmsys-chat-1m-synth" / ENCRYPTED, tmp_path / "ja.jsonl.gz", key)
    assert len(list(read_jsonl_gz(tmp_path / "ja.jsonl.gz"))) > 250
    pinned = params.fetch.released.sha256[SCRIPT]
    assert pinned == hashlib.sha256((SAMPLE / "lmsys-chat-1m-synth" / SCRIPT).read_bytes()).hexdigest()


def test_script_sees_the_source_as_layout_from_an_empty_temporary_directory(tmp_path):
    body = "echo \"$1|$(ls \"$1/data\" | tr '\\n' ,)|$(ls -A . | tr '\\n' ,)|$PWD\"\n"
    out = _script_key(tmp_path, body, layout="hub/lmsys-chat-1m")
    arg, shards, entries, cwd = out.split("|")
    assert arg == "hub/lmsys-chat-1m"
    assert shards == ",".join(sorted(p.name for p in (SAMPLE / "lmsys-chat-1m/data").iterdir())) + ","
    assert entries == "hub,"  # nothing but the link to the LMSYS files
    assert Path(cwd).parent == Path(tempfile.gettempdir()).resolve() and Path(cwd).name.startswith(
        "keyscript-"
    )
    assert not Path(cwd).exists()  # removed afterwards


def test_script_environment_is_path_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_secret")
    monkeypatch.setenv("DEEPL_AUTH_KEY", "deepl_secret")
    out = _script_key(tmp_path, "echo \"$(compgen -e | sort | tr '\\n' ,)|$PATH\"\n")
    names, path = out.split("|")
    assert set(names.strip(",").split(",")) <= {"PATH", "PWD", "SHLVL", "OLDPWD", "_"}  # bash's own
    assert "PATH" in names and path == os.environ["PATH"]


def test_script_failure_names_status_and_stderr_tail_never_stdout(tmp_path):
    body = 'echo candidate-passphrase\nfor i in 1 2 3 4 5 6 7; do echo "problem $i" >&2; done\nexit 3\n'
    with pytest.raises(CryptoError) as err:
        _script_key(tmp_path, body)
    message = str(err.value)
    assert f"key script {tmp_path / 'released' / SCRIPT} exited with status 3" in message
    assert "problem 3\n  problem 4\n  problem 5\n  problem 6\n  problem 7" in message
    assert "problem 2" not in message and "candidate-passphrase" not in message


@pytest.mark.parametrize(
    ("body", "printed"),
    [("echo 'why: no shard' >&2\n", "nothing"), ("echo alpha; echo bravo; echo 'why: two' >&2\n", "2 lines")],
)
def test_script_must_print_one_line(tmp_path, body, printed):
    with pytest.raises(CryptoError, match=rf"exited with status 0 but printed {printed} on stdout") as err:
        _script_key(tmp_path, body)
    assert "why: " in str(err.value) and "alpha" not in str(err.value) and "bravo" not in str(err.value)


def test_script_past_its_timeout_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    body = f"sleep 60 &\necho $! > {pid_file}\necho started >&2\nwait\necho late-passphrase\n"
    started = time.monotonic()
    with pytest.raises(CryptoError, match=r"ran past decrypt\.key\.timeout=1 s and was killed") as err:
        _script_key(tmp_path, body, timeout=1)
    assert time.monotonic() - started < 10
    assert "started" in str(err.value)
    child = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    deadline = time.monotonic() + 5
    while child.exists() and child.read_text().split(") ")[-1][0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child.exists() or child.read_text().split(") ")[-1][0] == "Z"  # killed (reaped or zombie)


def test_missing_script_says_to_fetch_it(tmp_path):
    key = KeySpec(method="script", script=SCRIPT)
    with pytest.raises(
        CryptoError, match=rf"decrypt\.key\.script='{SCRIPT}': .* not found .*fetch\.released"
    ):
        derive_key(SAMPLE / "lmsys-chat-1m", key, released_root=tmp_path)


def test_key_spec_fields_follow_the_method():
    with pytest.raises(ValueError, match="method hash needs `file`"):
        KeySpec()
    with pytest.raises(ValueError, match="method script needs `script`"):
        KeySpec(method="script")
    with pytest.raises(ValueError, match=r"method script does not use \['file'\]"):
        KeySpec(method="script", script=SCRIPT, file="data/*.parquet")
    for bad in ("/usr/bin/key.sh", "../key.sh"):
        with pytest.raises(ValueError, match="must be a relative path without"):
            KeySpec(method="script", script=bad)


def test_release_config_refuses_an_unpinned_key_script():
    data = yaml.safe_load(compose_params([]))
    assert data["profile"] == "production" and data["decrypt"]["key"]["method"] == "hash"
    assert SCRIPT in data["fetch"]["released"]["include"]  # fetched and listed in the manifest
    data["decrypt"]["key"] = {"method": "script", "script": SCRIPT, "args": ["{source}"]}
    with pytest.raises(ParamsError, match=rf"fetch\.released\.sha256\['{SCRIPT}'\]"):
        validate(data)
    data["fetch"]["released"]["sha256"] = {SCRIPT: "0" * 64}
    assert validate(data).decrypt.key.method == "script"


def test_a_key_script_other_than_the_pinned_one_is_refused_by_fetch(workspace, monkeypatch):
    script = workspace / "data/sample/lmsys-chat-1m-synth" / SCRIPT
    script.write_text("echo some-other-passphrase\n", encoding="utf-8")
    with pytest.raises(
        ChecksumError, match=rf"{SCRIPT}: sha256 is [0-9a-f]{{64}} but params pin [0-9a-f]{{64}}"
    ):
        run_stage(monkeypatch, "fetch")
    assert not (workspace / "data/raw/released").exists()


def test_a_wrong_script_output_fails_decryption_cleanly(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    (workspace / "data/raw/released" / SCRIPT).write_text("echo not-the-passphrase\n", encoding="utf-8")
    with pytest.raises(
        CryptoError, match=r"could not decrypt .*-ja\.jsonl\.gz\.gpg: .*wrong passphrase"
    ) as err:
        run_stage(monkeypatch, "decrypt")
    assert "not-the-passphrase" not in str(err.value)
    assert list((workspace / "data/private").iterdir()) == []  # no plaintext, not even a temporary


def test_decrypt_stage_uses_the_sample_key_script(workspace, monkeypatch):
    set_params(workspace, lambda d: d["decrypt"]["key"].update(timeout=30))
    run_stage(monkeypatch, "fetch")
    assert (workspace / "data/raw/released" / SCRIPT).is_file()
    run_stage(monkeypatch, "decrypt")
    assert pq.read_table(workspace / "data/private/instructions-ja.parquet").num_rows == 307
    spec = validate(yaml.safe_load((workspace / "params.yaml").read_text())).decrypt.key
    # no released root given (package's call): the script under params.yaml's paths.released
    assert derive_key("data/raw/lmsys-chat-1m", spec) == derive_key("data/raw/lmsys-chat-1m", SAMPLE_KEY)
