"""Key derivation and gpg encryption: round trips, gpg by hand, and clean failures."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import gnupg
import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.config.params import ParamsError, validate
from stages.core.storage import crypto
from stages.core.storage.crypto import CryptoError, KeySpec, decrypt_file, derive_key, encrypt_file
from stages.core.storage.jsonl import read_jsonl_gz
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

NEEDS_SANDBOX = pytest.mark.skipif(
    crypto.sandbox_missing() is not None,
    reason=f"this machine cannot sandbox a key script: {crypto.sandbox_missing()}",
)
SECRETS = {
    "HF_TOKEN": "hf_secret_6c1f",
    "OPENAI_API_KEY": "sk-secret-8d2e",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-93ab",
    "DEEPL_AUTH_KEY": "deepl-secret-47fc:fx",
}


def _script_key(tmp_path: Path, body: str, source: Path = SAMPLE / "lmsys-chat-1m", **spec) -> str:
    """Run a key script of `body` (under tmp_path/released, pinned) over the LMSYS files of `source`;
    sandboxed where this machine can, unless `spec` says otherwise."""
    script = tmp_path / "released" / SCRIPT
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(body, encoding="utf-8")
    pin = hashlib.sha256(body.encode()).hexdigest()
    fields = {"method": "script", "script": SCRIPT, "sha256": pin, "sandbox": "best-effort", **spec}
    key = KeySpec(**{"args": ["{source}"], "timeout": 20, **fields})
    return derive_key(source, key, released_root=tmp_path / "released")


def _transcript(tmp_path: Path, commands: str, **kwargs) -> str:
    """What the key script's `commands` printed (stdout and stderr), carried out as its passphrase."""
    body = f"{{\n{commands}\n}} 2>&1 | base64 -w0\n"
    return base64.b64decode(_script_key(tmp_path, body, sandbox="required", **kwargs)).decode()


def _running(marker: str) -> list[str]:
    """The processes of this machine whose command line holds `marker` (zombies have none)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker.encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
    return found


def _gone(marker: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while _running(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(marker)


def test_sample_config_runs_the_sample_key_script_and_opens_the_release(tmp_path):
    params = validate(yaml.safe_load(compose_params(["profile=sample"])))
    spec = params.decrypt.key
    assert (spec.method, spec.script, spec.sandbox) == ("script", SCRIPT, "best-effort")
    key = derive_key(SAMPLE / "lmsys-chat-1m", spec, released_root=SAMPLE / "lmsys-chat-1m-synth")
    assert key == derive_key(SAMPLE / "lmsys-chat-1m", SAMPLE_KEY)  # the .gpg files' key, unchanged
    decrypt_file(SAMPLE / "lmsys-chat-1m-synth" / ENCRYPTED, tmp_path / "ja.jsonl.gz", key)
    assert len(list(read_jsonl_gz(tmp_path / "ja.jsonl.gz"))) > 250
    assert spec.sha256 == hashlib.sha256((SAMPLE / "lmsys-chat-1m-synth" / SCRIPT).read_bytes()).hexdigest()


def test_a_tampered_key_script_is_refused_and_never_runs(tmp_path):
    ran = tmp_path / "ran"
    tampered = f"touch {ran}\necho the-right-passphrase\n"
    script = tmp_path / "released" / SCRIPT
    pinned = hashlib.sha256(b"echo the-right-passphrase\n").hexdigest()
    with pytest.raises(CryptoError) as err:
        _script_key(tmp_path, tampered, sha256=pinned)
    actual = hashlib.sha256(tampered.encode()).hexdigest()
    assert f"key script {script}: its sha256 is {actual} but decrypt.key.sha256 pins {pinned}" in str(
        err.value
    )
    assert "it was not run" in str(err.value)
    assert not ran.exists()


def test_the_bytes_that_run_are_the_bytes_that_were_checked(tmp_path, monkeypatch):
    """The script file is read once: replacing it after the check changes nothing that runs."""
    ran = tmp_path / "ran"
    script = tmp_path / "released" / SCRIPT
    checked = crypto._sandboxed  # called after the check, before the script runs

    def swap_then_check(spec, path):
        script.write_text(f"touch {ran}\necho swapped-passphrase\n", encoding="utf-8")
        return checked(spec, path)

    monkeypatch.setattr(crypto, "_sandboxed", swap_then_check)
    assert _script_key(tmp_path, "echo pinned-passphrase\n") == "pinned-passphrase"
    assert not ran.exists()


def test_script_sees_the_source_as_layout_from_an_empty_temporary_directory(tmp_path):
    body = "echo \"$1|$(ls \"$1/data\" | tr '\\n' ,)|$(ls -A . | tr '\\n' ,)|$PWD|$HOME\"\n"
    out = _script_key(tmp_path, body, layout="hub/lmsys-chat-1m")
    arg, shards, entries, cwd, home = out.split("|")
    assert arg == "hub/lmsys-chat-1m"
    assert shards == ",".join(sorted(p.name for p in (SAMPLE / "lmsys-chat-1m/data").iterdir())) + ","
    assert entries == "hub,"  # nothing but the link to the LMSYS files
    assert home == cwd and Path(cwd).name == "work"
    assert Path(cwd).parent.name.startswith("keyscript-")
    assert Path(cwd).parent.parent == Path(tempfile.gettempdir()).resolve()
    assert not Path(cwd).parent.exists()  # removed afterwards


def test_script_environment_is_path_home_and_tmpdir(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    out = _script_key(tmp_path, "echo \"$(compgen -e | sort | tr '\\n' ,)|$PATH|$HOME|$TMPDIR|$PWD\"\n")
    names, path, home, tmpdir, cwd = out.split("|")
    assert set(names.strip(",").split(",")) <= {"PATH", "HOME", "TMPDIR", "PWD", "SHLVL", "OLDPWD", "_"}
    assert path == os.environ["PATH"] and home == tmpdir == cwd
    assert not any(secret in out for secret in SECRETS.values())


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
    marker = f"keyscript-timeout-{uuid.uuid4().hex}"
    body = f"(exec -a {marker} sleep 60) &\necho started >&2\nwait\necho late-passphrase\n"
    started = time.monotonic()
    with pytest.raises(CryptoError, match=r"ran past decrypt\.key\.timeout=1 s and was killed") as err:
        _script_key(tmp_path, body, timeout=1)
    assert time.monotonic() - started < 10
    assert "started" in str(err.value)
    assert _gone(marker)


@pytest.mark.parametrize("sandbox", ["best-effort", "off"])
@pytest.mark.parametrize(
    ("limit", "body", "message"),
    [
        (  # 400 MB on stdout: killed at the bound, never buffered
            {"max_output_bytes": 4096},
            "head -c 400000000 /dev/zero | tr '\\0' a\n",
            r"printed over decrypt\.key\.max_output_bytes=4096 bytes on stdout and was killed",
        ),
        (  # 400 MB on stderr: only its tail is kept, the rest read and dropped
            {},
            "head -c 400000000 /dev/zero | tr '\\0' e >&2; echo >&2; echo 'the last line' >&2; exit 4\n",
            r"(?s)exited with status 4 .*the last line",
        ),
        (  # a fork bomb: killed with its whole process group
            {"max_processes": 16},
            "bomb() { bomb | bomb & }; bomb\nsleep 30\n",
            r"ran more than decrypt\.key\.max_processes=16 processes at once and was killed",
        ),
        (  # 1.5 GiB of memory: the allocation fails under the address-space limit
            {"max_memory_mb": 256},
            "python3 -c 'b = bytearray(1536 << 20)'\n",
            r"(?s)exited with status 1 \(its limits: decrypt\.key\.max_memory_mb=256.*MemoryError",
        ),
        (  # a file larger than max_file_mb
            {"max_file_mb": 1},
            "head -c 4000000 /dev/zero > big\n",
            r"exited with status \d+ \(its limits: .*max_file_mb=1\)",
        ),
    ],
    ids=["stdout", "stderr", "processes", "memory", "file size"],
)
def test_a_key_script_over_a_limit_ends_in_one_error_within_seconds_and_leaves_nothing(
    tmp_path, limit, body, message, sandbox
):
    started = time.monotonic()
    with pytest.raises(CryptoError, match=message) as err:
        _script_key(tmp_path, body, sandbox=sandbox, **limit)
    assert time.monotonic() - started < 20
    assert len(str(err.value)) < 4000  # the error quotes the stderr's last lines, not megabytes
    assert _gone("/dev/zero") and _gone("bomb") and _gone("bytearray")  # nothing of it left running


@NEEDS_SANDBOX
def test_sandboxed_script_sees_no_secret_no_other_process_and_no_home(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    tools = tmp_path / "tools"  # on PATH, so shown read-only; HOME lies inside it and stays hidden
    home = tools / "home"
    home.mkdir(parents=True)
    (home / ".netrc").write_text("machine huggingface.co password home-secret-5e1d\n", encoding="utf-8")
    (tools / "key-helper").write_text("#!/bin/sh\necho helper-ran\n", encoding="utf-8")
    (tools / "key-helper").chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    seen = _transcript(
        tmp_path,
        f"echo ppid=$PPID; cat /proc/$PPID/environ; cat /proc/[0-9]*/environ | tr '\\0' '\\n'\n"
        f"ls /proc; ls -la {home} /root /home; cat {home}/.netrc ~/.netrc\n"
        "key-helper; echo '<ps>'; ps -e -o comm=; echo '</ps>'",
    )
    assert not any(secret in seen for secret in SECRETS.values())
    assert "home-secret-5e1d" not in seen and not re.search(r" \.netrc$", seen, re.MULTILINE)
    assert "ppid=0" in seen  # its parent is outside its PID namespace: no /proc/$PPID
    processes = seen.split("<ps>\n")[1].split("</ps>")[0].split()
    assert set(processes) <= {"bash", "base64", "ps"}  # its own: not this process nor any other
    assert "helper-ran" in seen  # PATH's programs do run


@NEEDS_SANDBOX
def test_sandboxed_script_reaches_no_network(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        seen = _transcript(
            tmp_path, f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected >&3 && echo connected-to-host"
        )
        with pytest.raises(TimeoutError):
            server.accept()  # nothing connected
    assert "connected-to-host" not in seen
    assert "Network is unreachable" in seen  # its own loopback, down


@NEEDS_SANDBOX
def test_sandboxed_script_writes_only_to_its_directory(tmp_path):
    source = tmp_path / "lmsys-chat-1m"
    shutil.copytree(SAMPLE / "lmsys-chat-1m", source)
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    name = f"keyscript-escape-{uuid.uuid4().hex}"
    outside = [tmp_path / name, Path(tempfile.gettempdir()) / name, Path("/etc") / name, Path("/") / name]
    seen = _transcript(
        tmp_path,
        "".join(f"echo x > {path}\n" for path in outside)
        + 'echo x > "$1/data/new.parquet"; for shard in "$1"/data/*; do echo x >> "$shard"; done\n'
        + 'echo x >> "$0"\necho kept > scratch && cat scratch',  # $0: the bytes that run
        source=source,
    )
    leaked = [path for path in outside if path.exists()]
    for path in leaked:
        path.unlink()
    assert leaked == []
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before
    assert "kept" in seen and seen.count("Read-only file system") >= 7


@NEEDS_SANDBOX
def test_sandboxed_script_leaves_no_process_running(tmp_path):
    daemon, orphan = (f"keyscript-{kind}-{uuid.uuid4().hex}" for kind in ("daemon", "orphan"))
    body = (
        f"setsid nohup bash -c 'exec -a {daemon} sleep 1000' >/dev/null 2>&1 < /dev/null &\n"
        f"( (exec -a {orphan} sleep 1000) >/dev/null 2>&1 & )\n"
        "sleep 0.2\necho passphrase\n"
    )
    assert _script_key(tmp_path, body, sandbox="required") == "passphrase"
    assert _gone(daemon) and _gone(orphan)


def test_a_required_sandbox_that_this_machine_lacks_refuses_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(crypto, "sandbox_missing", lambda: "user namespaces are off (test)")
    ran = tmp_path / "ran"
    with pytest.raises(CryptoError) as err:
        _script_key(tmp_path, f"touch {ran}\necho passphrase\n", sandbox="required")
    assert "decrypt.key.sandbox=required: this machine cannot run key script" in str(err.value)
    assert "user namespaces are off (test)" in str(err.value) and "best-effort" in str(err.value)
    assert not ran.exists()


@pytest.mark.parametrize("policy", ["best-effort", "off"])
def test_an_unsandboxed_run_warns_what_is_not_isolated(tmp_path, monkeypatch, caplog, policy):
    monkeypatch.setattr(crypto, "sandbox_missing", lambda: "user namespaces are off (test)")
    with caplog.at_level(logging.WARNING, logger="stages.core.storage.crypto"):
        assert _script_key(tmp_path, "echo passphrase\n", sandbox=policy) == "passphrase"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("NO SANDBOX (") and "runs unisolated" in warning
    assert all(what in warning for what in ("HOME", "environment", "network", "processes"))


def test_missing_script_says_to_fetch_it(tmp_path):
    key = KeySpec(method="script", script=SCRIPT, sha256="0" * 64)
    with pytest.raises(
        CryptoError, match=rf"decrypt\.key\.script='{SCRIPT}': .* not found .*fetch\.released"
    ):
        derive_key(SAMPLE / "lmsys-chat-1m", key, released_root=tmp_path)


def test_key_spec_fields_follow_the_method():
    with pytest.raises(ValueError, match="method hash needs `file`"):
        KeySpec()
    with pytest.raises(ValueError, match="method script needs `script`"):
        KeySpec(method="script")
    with pytest.raises(ValueError, match="method script needs `sha256`"):
        KeySpec(method="script", script=SCRIPT)
    with pytest.raises(ValueError, match=r"method script does not use \['file'\]"):
        KeySpec(method="script", script=SCRIPT, sha256="0" * 64, file="data/*.parquet")
    for bad in ("/usr/bin/key.sh", "../key.sh"):
        with pytest.raises(ValueError, match="must be a relative path without"):
            KeySpec(method="script", script=bad, sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        KeySpec(method="script", script=SCRIPT, sha256="C075D63D")
    with pytest.raises(ValueError, match="sandbox"):
        KeySpec(method="script", script=SCRIPT, sha256="0" * 64, sandbox="maybe")


@pytest.mark.parametrize("profile", ["production", "sample"])
def test_every_profile_refuses_an_unpinned_key_script(profile):
    data = yaml.safe_load(compose_params([f"profile={profile}"]))
    assert SCRIPT in data["fetch"]["released"]["include"]  # fetched and listed in the manifest
    data["decrypt"]["key"] = {"method": "script", "script": SCRIPT, "args": ["{source}"]}
    with pytest.raises(ParamsError, match=r"decrypt\.key: method script needs `sha256`"):
        validate(data)
    data["decrypt"]["key"]["sha256"] = "0" * 64
    assert validate(data).decrypt.key.sandbox == "required"  # the default


def test_a_fetch_pin_of_the_key_script_must_be_its_decrypt_pin():
    data = yaml.safe_load(compose_params(["profile=sample"]))
    pin = data["decrypt"]["key"]["sha256"]
    data["fetch"]["released"]["sha256"] = {SCRIPT: pin}
    assert validate(data).fetch.released.sha256 == {SCRIPT: pin}  # both pins, the same bytes
    data["fetch"]["released"]["sha256"] = {SCRIPT: "0" * 64}
    with pytest.raises(ParamsError, match=rf"fetch\.released\.sha256\['{SCRIPT}'\]=0{{64}} differs from"):
        validate(data)


def test_a_tampered_fetched_key_script_is_refused_by_decrypt(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    fetched = workspace / "data/raw/released" / SCRIPT
    pinned = hashlib.sha256(fetched.read_bytes()).hexdigest()
    ran = workspace / "ran"
    fetched.write_text(f"touch {ran}\nsha256sum \"$1\"/data/train-00000-*.parquet | cut -d' ' -f1\n")
    with pytest.raises(CryptoError) as err:
        run_stage(monkeypatch, "decrypt")
    actual = hashlib.sha256(fetched.read_bytes()).hexdigest()
    assert f"its sha256 is {actual} but decrypt.key.sha256 pins {pinned}" in str(err.value)
    assert not ran.exists()
    assert not (workspace / "data/private").exists()  # it stopped before any output


def test_a_wrong_script_output_fails_decryption_cleanly(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    body = "echo not-the-passphrase\n"
    (workspace / "data/raw/released" / SCRIPT).write_text(body, encoding="utf-8")
    pin = hashlib.sha256(body.encode()).hexdigest()
    set_params(workspace, lambda d: d["decrypt"]["key"].update(sha256=pin))
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
