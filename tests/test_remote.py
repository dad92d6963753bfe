"""`python -m stages.remote check` and the committed remote timeouts, against moto's S3 on 127.0.0.1:
a reachable remote prints one line and exits 0; a missing bucket, missing, unknown or wrong
credentials, denied access, a closed port and a black-holed one each exit 2 with one line naming the
remote, bucket, endpoint and the fix, within seconds; `dvc push` itself with the committed
.dvc/config fails within seconds on a closed port; no secret appears in any output. Every endpoint is
127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from configobj import ConfigObj

from tests.s3 import _free_port, moto_server

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = {"public": "lmsys-chat-1m-synth", "private": "lmsys-chat-1m-synth-private"}  # .dvc/config's
MARKER = "marker-5d1e0a7c-not-a-real-secret"  # every secret the tests hand over: never in any output
SETUP = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def _env(tmp_path: Path, **aws: str) -> dict[str, str]:
    """The environment of a command: no AWS setting of this host (variables, ~/.aws files, instance
    metadata), no proxy for 127.0.0.1, and the AWS variables given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k.lower() != "no_proxy"}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=str(ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **aws,
    )
    return env


KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": MARKER}  # moto takes any by default


def _repo(tmp_path: Path, endpoint: str, env: dict[str, str] | None = None, **local: dict[str, str]) -> Path:
    """A DVC repository (`git init`, `dvc init` under `env`, else its .dvc/ alone) with the project's
    committed .dvc/config, both remotes' endpointurl set in .dvc/config.local (as `dvc remote modify
    --local` writes it), plus `local`'s settings per remote."""
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    if env is None:
        (repo / ".dvc").mkdir()
    else:
        subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
        subprocess.run(["dvc", "init", "-q"], cwd=repo, env=env, check=True)
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    config = ConfigObj()
    for remote in BUCKETS:
        config[f'remote "{remote}"'] = {"endpointurl": endpoint, **local.get(remote, {})}
    config.filename = str(repo / ".dvc/config.local")
    config.write()
    return repo


def _check(repo: Path, env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "stages.remote", "check", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - began
    assert MARKER not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done, elapsed


def _error(done: subprocess.CompletedProcess, remote: str) -> str:
    """The one line of stderr about `remote`, after exit status 2."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"error: remote {remote}: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """moto's S3 on 127.0.0.1 holding both remotes' buckets; it takes any credentials."""
    with moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, **SETUP)
        for bucket in BUCKETS.values():
            client.create_bucket(Bucket=bucket)
        yield endpoint


@pytest.fixture(scope="module")
def s3_auth() -> Iterator[tuple[str, dict[str, tuple[str, str]]]]:
    """moto's S3 that checks credentials (moto's IAM): its endpoint and the keys of two users, one
    allowed every S3 action ("allowed"), one allowed nothing ("denied")."""
    with moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, **SETUP)
        for bucket in BUCKETS.values():
            client.create_bucket(Bucket=bucket)
        iam = boto3.client("iam", endpoint_url=endpoint, **SETUP)
        keys = {}
        for user in ("allowed", "denied"):
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="allowed", PolicyName="s3", PolicyDocument=json.dumps(policy))
        # from now on moto authenticates and authorizes every request (moto_api reset-auth)
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.load(answer)["status"] == "ok"
        yield endpoint, keys


def test_a_reachable_remote_prints_one_line_and_exits_0(s3: str, tmp_path: Path):
    done, _ = _check(_repo(tmp_path, s3), _env(tmp_path, **KEYS))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"remote public: s3://lmsys-chat-1m-synth/dvc-public at {s3} reachable",
        f"remote private: s3://lmsys-chat-1m-synth-private/dvc-private at {s3} reachable",
    ]
    done, _ = _check(_repo(tmp_path / "one", s3), _env(tmp_path, **KEYS), "--remote", "private")
    assert done.returncode == 0 and done.stdout.splitlines() == [
        f"remote private: s3://lmsys-chat-1m-synth-private/dvc-private at {s3} reachable"
    ]


def test_a_missing_bucket_names_it_and_how_to_create_it_or_change_the_url(tmp_path: Path):
    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, **SETUP).create_bucket(Bucket=BUCKETS["public"])
        done, _ = _check(_repo(tmp_path, endpoint), _env(tmp_path, **KEYS))
    line = _error(done, "private")
    assert f"s3://lmsys-chat-1m-synth-private/dvc-private at {endpoint}" in line
    assert "no bucket lmsys-chat-1m-synth-private there" in line
    assert "aws s3 mb s3://lmsys-chat-1m-synth-private" in line
    assert "dvc remote modify private url s3://BUCKET/PREFIX" in line
    assert done.stdout.splitlines() == [
        f"remote public: s3://lmsys-chat-1m-synth/dvc-public at {endpoint} reachable"
    ]


def test_no_credentials_names_the_variables_and_the_dvc_settings(s3: str, tmp_path: Path):
    done, elapsed = _check(_repo(tmp_path, s3), _env(tmp_path))
    for remote, bucket in BUCKETS.items():
        line = _error(done, remote)
        assert f"s3://{bucket}/dvc-{remote} at {s3}: no AWS credentials found" in line
        assert "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
        assert f"dvc remote modify --local {remote} access_key_id ..." in line
        assert f"dvc remote modify --local {remote} secret_access_key ..." in line
    assert elapsed < 15


def test_credentials_the_store_accepts_pass(s3_auth, tmp_path: Path):
    endpoint, keys = s3_auth
    key_id, secret = keys["allowed"]
    done, _ = _check(
        _repo(tmp_path, endpoint), _env(tmp_path, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    )
    assert done.returncode == 0, done.stderr
    assert f"remote public: s3://lmsys-chat-1m-synth/dvc-public at {endpoint} reachable" in done.stdout
    # the same keys in .dvc/config.local, as `dvc remote modify --local public access_key_id ...` sets them
    local = {"public": {"access_key_id": key_id, "secret_access_key": secret}}
    done, _ = _check(_repo(tmp_path / "local", endpoint, **local), _env(tmp_path), "--remote", "public")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("case", ["unknown key id", "wrong secret", "wrong secret in config.local", "denied"])
def test_refused_credentials_name_the_cause_and_the_fix_without_the_secret(s3_auth, tmp_path: Path, case):
    endpoint, keys = s3_auth
    local: dict = {}
    if case == "unknown key id":
        env = _env(tmp_path, AWS_ACCESS_KEY_ID="AKIAUNKNOWNKEY000000", AWS_SECRET_ACCESS_KEY=MARKER)
    elif case == "wrong secret":
        env = _env(tmp_path, AWS_ACCESS_KEY_ID=keys["allowed"][0], AWS_SECRET_ACCESS_KEY=MARKER)
    elif case == "wrong secret in config.local":
        env = _env(tmp_path)
        local = {r: {"access_key_id": keys["allowed"][0], "secret_access_key": MARKER} for r in BUCKETS}
    else:
        env = _env(tmp_path, AWS_ACCESS_KEY_ID=keys["denied"][0], AWS_SECRET_ACCESS_KEY=keys["denied"][1])
    done, _ = _check(_repo(tmp_path, endpoint, **local), env)
    for remote, bucket in BUCKETS.items():
        line = _error(done, remote)
        assert f"s3://{bucket}/dvc-{remote} at {endpoint}" in line
        source = "the remote's access_key_id and secret_access_key" if local else "AWS_ACCESS_KEY_ID and"
        assert f"credentials from {source}" in line
        if case == "unknown key id":
            assert "the store knows no such access key id" in line
        elif case.startswith("wrong secret"):
            assert "the secret access key does not match its access key id" in line
        else:
            assert "access denied (AccessDenied" in line and "s3:ListBucket" in line
        if case != "denied":
            assert f"dvc remote modify --local {remote} secret_access_key ..." in line
        assert keys["denied"][1] not in line and keys["allowed"][1] not in line


def test_a_closed_port_fails_within_seconds_naming_the_endpoint_setting(tmp_path: Path):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    done, elapsed = _check(_repo(tmp_path, endpoint), _env(tmp_path, **KEYS))
    for remote, bucket in BUCKETS.items():
        line = _error(done, remote)
        assert f"s3://{bucket}/dvc-{remote} at {endpoint}: unreachable" in line
        assert f"dvc remote modify --local {remote} endpointurl URL" in line
    assert elapsed < 15


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs to a full accept queue")
def test_a_black_holed_endpoint_fails_within_seconds(tmp_path: Path):
    """A listening socket whose accept queue is full: the kernel drops further SYNs, as a firewall
    that drops packets does, so connecting times out (instead of being refused)."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = [socket.socket() for _ in range(8)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        try:
            endpoint = f"http://127.0.0.1:{port}"
            done, elapsed = _check(_repo(tmp_path, endpoint), _env(tmp_path, **KEYS))
        finally:
            for filler in fillers:
                filler.close()
    for remote in BUCKETS:
        line = _error(done, remote)
        assert f"at {endpoint}: unreachable, no connection within the connect timeout" in line
        assert f"dvc remote modify --local {remote} endpointurl URL" in line
    assert elapsed < 15


def test_an_unknown_remote_lists_the_configured_ones(tmp_path: Path):
    done, _ = _check(_repo(tmp_path, "http://127.0.0.1:9"), _env(tmp_path), "--remote", "nope")
    assert done.returncode == 2
    assert "error: no DVC remote nope; the DVC config has: public, private" in done.stderr


def test_the_committed_remotes_set_a_short_connect_and_a_long_read_timeout():
    """What the docs say .dvc/config sets: fast failure of an unreachable endpoint, and a reply wait
    that the completion of a large upload survives."""
    config = ConfigObj(str(ROOT / ".dvc/config"))
    for remote in BUCKETS:
        assert config[f'remote "{remote}"']["connect_timeout"] == "3"
        assert config[f'remote "{remote}"']["read_timeout"] == "120"
    production = (ROOT / "docs/production.md").read_text(encoding="utf-8")
    assert "`connect_timeout` 3 s" in production and "`read_timeout` 120 s" in production


def test_dvc_push_with_the_committed_config_fails_within_seconds_on_a_closed_port(tmp_path: Path):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    env = _env(tmp_path, **KEYS, DVC_NO_ANALYTICS="1")
    repo = _repo(tmp_path, endpoint, env)
    (repo / "data.bin").write_bytes(os.urandom(4096))
    subprocess.run(["dvc", "add", "-q", "data.bin"], cwd=repo, env=env, check=True)
    began = time.monotonic()
    done = subprocess.run(["dvc", "push"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - began
    assert done.returncode != 0
    assert f'Could not connect to the endpoint URL: "{endpoint}/' in done.stderr
    assert MARKER not in done.stdout + done.stderr
    assert elapsed < 45  # botocore's 5 attempts, backing off up to 15 s in all; 4 to 14 s measured


def test_a_failed_release_push_names_the_cause(tmp_path: Path, monkeypatch):
    """scripts/release.py: when `dvc push` fails, the remote check runs again and its line follows
    DVC's output."""
    from scripts import release

    endpoint = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.chdir(_repo(tmp_path, endpoint))
    for key, value in _env(tmp_path, **KEYS).items():
        monkeypatch.setenv(key, value)

    def step(*command: str) -> str:
        if command[0] == "dvc":
            raise release.ReleaseError(f"`{' '.join(command)}` failed (status 1):\nERROR: unexpected error")
        return ""  # the check before the push: taken as passed

    monkeypatch.setattr(release, "step", step)
    check = [sys.executable, "-m", "stages.remote", "check", "--remote=public"]
    with pytest.raises(release.ReleaseError) as failed:
        release.push_data(["package@gemma3"], check)
    message = str(failed.value)
    assert message.startswith(
        "`dvc push --with-deps package@gemma3` failed (status 1):\nERROR: unexpected error"
    )
    assert (
        "python -m stages.remote check --remote=public: error: remote public: s3://lmsys-chat-1m-synth/"
        in message
    )
    assert f"at {endpoint}: unreachable" in message and MARKER not in message


def test_help_describes_the_check_in_whole_sentences():
    done = subprocess.run(
        [sys.executable, "-m", "stages.remote", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "remote check: whether each DVC remote answers, before a push or pull" in text
    assert 'unexpected error".' in text and "check" in text
