"""`python -m stages.publish`: a release's public files, card and manifest go to a Hub dataset repository
in one commit (a Hub stand-in on 127.0.0.1: tests/hub_server.py); a re-run after an interruption
uploads no blob twice; the licence guard refuses private files and sends nothing, also when a hostile
insider edits the files, the card, the manifest and dvc.lock to match (`dvc commit`); --dry-run sends no
request; the token is never printed. package refuses a release whose rows carry an instruction."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.config.errors import SourceError
from stages.core.config.params import load_params
from stages.core.release import guard, leaks
from stages.core.rows import fields, records
from stages.core.storage.crypto import decrypt_file, derive_key, encrypt_file
from tests.conftest import SAMPLE, FakeEngine, run_stage
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
VARIANT, SUBSET, STEM = "gemma3", "ja+unsafe", "gemma3-lmsys-chat-1m-synth-ja+en"
ENCRYPTED = f"lmsys-chat-1m-first-turn-user-instructions-{SUBSET}.jsonl.gz.gpg"
# the licence texts at the root of the released repository, which package copies into each release
LICENCES = sorted(p.name for p in (SAMPLE / "lmsys-chat-1m-synth").iterdir() if p.is_file())
PUBLIC = sorted(["README.md", "manifest.json", f"{STEM}.jsonl.gz", f"{STEM}.parquet", ENCRYPTED, *LICENCES])
REPO = "tokyotech-test/lmsys-chat-1m-synth-rebuilt"
TOKEN = "hf_" + "publishcanary" * 3  # sent only to 127.0.0.1; must never be printed
UNSET = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LMSYS_SYNTH_TRACEBACK")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gemma3's release on the sample (FakeEngine), with the private outs beside it, built once."""
    root = tmp_path_factory.mktemp("built")
    shutil.copytree(SAMPLE, root / "data" / "sample")
    (root / "params.yaml").write_text(compose_params(["profile=sample"]), encoding="utf-8")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        engine = FakeEngine()
        patch.setattr("stages.core.runtime.executors.make_engine", lambda llm, options: engine)
        run_stage(patch, "fetch")
        for stage in ("decrypt", "translate"):
            run_stage(patch, stage, SUBSET)
        for stage in ("generate", "score", "package"):
            run_stage(patch, stage, VARIANT)
    # package@gemma3's code deps, so that DVC records the release in dvc.lock as `dvc repro` would
    shutil.copytree(ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    from dvc.repo import Repo

    Repo.init(str(root), no_scm=True)
    dvc_commit(root)
    return root


def dvc_commit(root: Path) -> None:
    """`dvc commit package@gemma3`: dvc.lock and DVC's cache record the release as it is now."""
    from dvc.repo import Repo

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # DVC resolves dvc.yaml's paths from the working directory
        with Repo(".") as repo:
            repo.commit(f"package@{VARIANT}", force=True)


@pytest.fixture
def workspace(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of what publish reads: params.yaml, dvc.yaml, dvc.lock and DVC's cache, the release, the
    private outs and the LMSYS files (the key); with package's code and inputs (dvc_commit, package)."""
    for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
        shutil.copy(built / name, tmp_path / name)
    shutil.copytree(built / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp"))
    for name in (
        f"data/release/{VARIANT}",
        "data/private",
        "data/raw",
        "data/generated",
        "data/scored",
        "data/metrics",
        "stages",
    ):
        shutil.copytree(built / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(TOKEN) as server:
        yield server


def publish(
    workspace: Path, hub: HubServer, *args: str, token: str | None = TOKEN
) -> subprocess.CompletedProcess:
    """Run `python -m stages.publish gemma3 --repo REPO args...` against the stand-in, LFS only."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(
        PYTHONPATH=str(ROOT),
        HF_HOME=str(workspace / "hf"),  # no saved login
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",  # the stand-in speaks LFS (tests/hub_server.py)
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
        **({"HF_TOKEN": token} if token else {}),
    )
    command = [sys.executable, "-m", "stages.publish", VARIANT, "--repo", REPO, *args]
    done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=120)
    assert TOKEN not in done.stdout + done.stderr
    assert "HTTP Request:" not in done.stderr  # no request URL logged: a presigned one is a credential
    return done


def _release(workspace: Path) -> dict[str, bytes]:
    release = workspace / "data/release" / VARIANT
    return {p.name: p.read_bytes() for p in sorted(release.iterdir())}


def _published(hub: HubServer) -> dict[str, bytes]:
    return {k: v for k, v in hub.repos[REPO].files.items() if k != ".gitattributes"}


def _failed(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2, no traceback, and the words in the message."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_publish_commits_the_public_files_card_and_manifest_once(workspace, hub):
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "release"], ["tag", "v0.9"]):
        subprocess.run([*git, *args], cwd=workspace, check=True)
    done = publish(workspace, hub)
    assert done.returncode == 0, done.stderr
    repo = hub.repos[REPO]
    assert repo.private  # created private: visibility and gating are set on the Hub
    assert sorted(_published(hub)) == PUBLIC
    assert _published(hub) == _release(workspace)
    assert len(repo.commits) == 2  # the Hub's initial commit and publish's one
    manifest_sha256 = hashlib.sha256(
        (workspace / f"data/release/{VARIANT}/manifest.json").read_bytes()
    ).hexdigest()
    summary = repo.commits[-1]["summary"]
    assert summary == f"Publish {VARIANT} (gemma3) at v0.9, manifest.json sha256 {manifest_sha256[:16]}"
    assert f"manifest.json sha256: {manifest_sha256}" in repo.commits[-1]["description"]
    assert {f"{STEM}.jsonl.gz", f"{STEM}.parquet", ENCRYPTED} == repo.lfs
    assert sorted(hub.uploads.values()) == [1, 1, 1]
    card = yaml.safe_load(repo.files["README.md"].decode().split("---\n")[1])
    assert [f["path"] for c in card["configs"] for f in c["data_files"]] == [f"{STEM}.jsonl.gz"]
    total = sum(len(v) for v in _published(hub).values())
    assert f"published {len(PUBLIC)} files ({total:,} bytes)" in done.stderr
    assert f"{hub.url}/datasets/{REPO}/commit/{repo.commits[-1]['oid']}" in done.stderr
    # the same release again: nothing is uploaded, nothing committed; a file it lacks is named, kept
    repo.files["old.parquet"] = b"PAR1"
    again = publish(workspace, hub)
    assert again.returncode == 0, again.stderr
    assert len(repo.commits) == 2 and sorted(hub.uploads.values()) == [1, 1, 1]
    assert f"nothing to commit: main already holds the {len(PUBLIC)} files" in again.stderr
    assert "also holds files this release does not (left as they are): ['old.parquet']" in again.stderr
    assert repo.files["old.parquet"] == b"PAR1"


@pytest.mark.parametrize("interruption", ["a blob upload", "the commit"])
def test_a_rerun_after_an_interruption_uploads_no_blob_twice(workspace, hub, interruption):
    if interruption == "a blob upload":
        hub.fail_upload = 2  # the second of the three blob PUTs is refused; the others finish
    else:
        hub.fail_commit = True  # every blob is up, the commit fails
    first = publish(workspace, hub)
    _failed(first, REPO, "Run the same command again")
    assert sorted(hub.repos[REPO].files) == [".gitattributes"]  # nothing committed
    stored = sum(hub.uploads.values())
    assert stored == (2 if interruption == "a blob upload" else 3)
    second = publish(workspace, hub)
    assert second.returncode == 0, second.stderr
    assert _published(hub) == _release(workspace)
    assert len(hub.uploads) == 3 and set(hub.uploads.values()) == {1}  # each blob PUT once, over both runs
    assert hub.puts == 3 + (interruption == "a blob upload")  # the refused one, and no other again


def test_a_private_file_in_the_release_is_refused_and_nothing_is_sent(workspace, hub):
    plaintext = workspace / f"data/private/instructions-{SUBSET}.parquet"
    shutil.copy(plaintext, workspace / f"data/release/{VARIANT}/instructions-{SUBSET}.parquet")
    done = publish(workspace, hub)
    _failed(done, f"instructions-{SUBSET}.parquet: not written by package@{VARIANT}", "nothing was sent")
    assert hub.requests == [] and hub.repos == {}


def test_dry_run_lists_path_size_and_sha256_and_sends_nothing(workspace, hub):
    done = publish(workspace, hub, "--dry-run", token=None)  # no token needed
    assert done.returncode == 0, done.stderr
    listed = [line.split() for line in done.stdout.splitlines()]
    expected = [
        [hashlib.sha256(data).hexdigest(), f"{len(data):,}", name]
        for name, data in _release(workspace).items()
    ]
    assert listed == expected
    assert f"dry run: would commit {len(PUBLIC)} files" in done.stderr
    assert hub.requests == []


def test_without_a_token_nothing_is_sent_and_the_error_says_how_to_get_one(workspace, hub):
    done = publish(workspace, hub, token=None)
    _failed(done, "no Hugging Face token", "HF_TOKEN", "hf auth login")
    assert hub.requests == []


def test_a_token_the_hub_refuses_is_named_but_never_printed(workspace, hub):
    hub.token = "hf_another_token"
    done = publish(workspace, hub)
    _failed(done, f"{REPO}: the Hub at {hub.url} answered 401", "is not valid")
    assert hub.repos == {}


def test_an_unreachable_hub_is_named_with_the_fix(workspace, hub):
    with socket.socket() as sock:  # bound, not listening: the connection is refused
        sock.bind(("127.0.0.1", 0))
        hub.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        done = publish(workspace, hub)
    _failed(
        done, f"{REPO}: the Hub at {hub.url} is unreachable (", "HF_ENDPOINT", "Run the same command again"
    )
    assert hub.requests == []


def test_a_missing_release_says_how_to_build_or_pull_it(workspace):
    shutil.rmtree(workspace / f"data/release/{VARIANT}")
    with pytest.raises(SourceError, match=rf"dvc repro package@{VARIANT}.*dvc pull package@{VARIANT}"):
        guard.publishable(load_params(), VARIANT, workspace)


# In-process: the licence guard's refusals, each naming the file and why


def _record(workspace: Path, path: Path) -> None:
    """Record `path`'s new bytes in the manifest, as a hand edit would, so only the content checks see it."""
    manifest_path = workspace / f"data/release/{VARIANT}/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name].update(
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=path.stat().st_size
    )
    manifest_path.write_text(json.dumps(manifest))


def _plaintext_column(workspace: Path, release: Path) -> str:
    lines = gzip.decompress((release / f"{STEM}.jsonl.gz").read_bytes()).decode().splitlines()
    record = json.loads(lines[-1]) | {"translated_conversation": [{"role": "user", "content": "元の指示"}]}
    (release / f"{STEM}.jsonl.gz").write_bytes(
        gzip.compress("\n".join([*lines, json.dumps(record)]).encode())
    )
    _record(workspace, release / f"{STEM}.jsonl.gz")
    return f"{STEM}.jsonl.gz: holds column translated_conversation: plaintext Japanese instructions"


def _lmsys_column(workspace: Path, release: Path) -> str:
    table = pq.read_table(release / f"{STEM}.parquet")
    pq.write_table(table.append_column("conversation", table["conversation_id"]), release / f"{STEM}.parquet")
    _record(workspace, release / f"{STEM}.parquet")
    return f"{STEM}.parquet: holds column conversation: an LMSYS-Chat-1M column"


def _undeclared_column(workspace: Path, release: Path) -> str:
    table = pq.read_table(release / f"{STEM}.parquet")
    pq.write_table(table.append_column("notes", table["conversation_id"]), release / f"{STEM}.parquet")
    _record(workspace, release / f"{STEM}.parquet")
    return f"{STEM}.parquet: holds columns the card does not declare: notes"


def _unencrypted(workspace: Path, release: Path) -> str:
    (release / ENCRYPTED).write_bytes(gzip.compress(b'{"translated_conversation": []}\n'))
    _record(workspace, release / ENCRYPTED)
    return f"{ENCRYPTED}: not encrypted"


def _link_to_private_out(workspace: Path, release: Path) -> str:
    (release / "extra.parquet").symlink_to(workspace / f"data/private/translated-{SUBSET}.parquet")
    return f"extra.parquet: a private out (translate@{SUBSET} in dvc.yaml, remote: private)"


def _edited(workspace: Path, release: Path) -> str:
    with open(release / f"{STEM}.jsonl.gz", "ab") as handle:
        handle.write(b"\0")
    return f"{STEM}.jsonl.gz: differs from manifest.json's sha256 and size"


def _no_licences(workspace: Path, release: Path) -> str:
    card = (release / "README.md").read_text(encoding="utf-8")
    (release / "README.md").write_text(card.split("## Licences")[0].replace("license: other\n", ""))
    return (
        "README.md: no licence metadata (`license`, and `license_name` for `other`); "
        "its Licences section lacks: LMSYS-Chat-1M Dataset License Agreement; Apache-2.0: this project's code"
    )


def _config_elsewhere(workspace: Path, release: Path) -> str:
    card = (release / "README.md").read_text(encoding="utf-8")
    (release / "README.md").write_text(card.replace(f"path: {STEM}.jsonl.gz", "path: data/train.jsonl.gz"))
    return "README.md: `configs` points at data/train.jsonl.gz, which is not uploaded"


def _missing(workspace: Path, release: Path) -> str:
    (release / f"{STEM}.parquet").unlink()
    return f"{STEM}.parquet: listed in manifest.json but missing: run `dvc pull package@{VARIANT}`"


def _subdirectory(workspace: Path, release: Path) -> str:
    (release / "sft").mkdir()
    return f"sft: not a regular file: package@{VARIANT} writes none"


@pytest.mark.parametrize(
    "change",
    [
        _plaintext_column,
        _lmsys_column,
        _undeclared_column,
        _unencrypted,
        _link_to_private_out,
        _edited,
        _no_licences,
        _config_elsewhere,
        _missing,
        _subdirectory,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_the_licence_guard_names_the_file_and_why(workspace, change):
    release = workspace / f"data/release/{VARIANT}"
    uploads, _ = guard.publishable(load_params(), VARIANT, workspace)  # the release as built passes
    assert [u.name for u in uploads] == PUBLIC
    expected = change(workspace, release)
    with pytest.raises(guard.RefusedError) as refused:
        guard.publishable(load_params(), VARIANT, workspace)
    assert expected in str(refused.value)
    assert f"refusing to publish {release} (nothing was sent)" in str(refused.value)


def test_a_release_dvc_yaml_binds_to_the_private_remote_is_refused_whole(workspace):
    dvc_yaml = workspace / "dvc.yaml"
    text = dvc_yaml.read_text(encoding="utf-8")
    dvc_yaml.write_text(
        text.replace(
            "        - ${paths.release}/${key}\n      metrics:",
            "        - ${paths.release}/${key}:\n            remote: private\n      metrics:",
        )
    )
    with pytest.raises(guard.RefusedError) as refused:
        guard.publishable(load_params(), VARIANT, workspace)
    for name in PUBLIC:
        assert f"  {name}: a private out (package@{VARIANT} in dvc.yaml, remote: private)" in str(
            refused.value
        )


# A hostile insider: files edited, the card, manifest.json and dvc.lock made to match (`dvc commit`);
# publish refuses in one line naming the file and the column path, and sends no request


def _instructions(workspace: Path) -> dict[str, str]:
    """conversation_id -> instruction_ja of translate's out: the release's plaintext."""
    table = pq.read_table(workspace / f"data/private/translated-{SUBSET}.parquet")
    return dict(zip(table["conversation_id"].to_pylist(), table["instruction_ja"].to_pylist(), strict=True))


def _forge(workspace: Path, *paths: Path, card: str | None = None) -> None:
    """List `paths` in the manifest as they are now, declare `card`'s features, and `dvc commit`."""
    release = workspace / f"data/release/{VARIANT}"
    if card is not None:
        text = (release / "README.md").read_text(encoding="utf-8")
        (release / "README.md").write_text(text.replace("  features:\n", f"  features:\n{card}", 1))
    manifest = json.loads((release / "manifest.json").read_text())
    for path in paths:
        manifest["files"].setdefault(path.name, {}).update(
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=path.stat().st_size
        )
    (release / "manifest.json").write_text(json.dumps(manifest))
    dvc_commit(workspace)


def _declared_new_column(workspace: Path, release: Path) -> tuple[str, list[str]]:
    table, text = pq.read_table(release / f"{STEM}.parquet"), _instructions(workspace)
    notes = pa.array([text[i] for i in table["conversation_id"].to_pylist()])
    pq.write_table(table.append_column("notes", notes), release / f"{STEM}.parquet")
    _forge(workspace, release / f"{STEM}.parquet", card="  - name: notes\n    dtype: string\n")
    return f"{STEM}.parquet", ["holds private instruction text", "in notes, row 0"]


def _overwritten_declared_column(workspace: Path, release: Path) -> tuple[str, list[str]]:
    path, text = release / f"{STEM}.jsonl.gz", _instructions(workspace)
    records_ = [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    lines = [json.dumps(r | {fields.TEMPLATE: text[r["conversation_id"]]}) for r in records_]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    _forge(workspace, path)
    return path.name, [f"in {fields.TEMPLATE}, row 0 ("]


def _nested_field(workspace: Path, release: Path) -> tuple[str, list[str]]:
    path, text = release / f"{STEM}.parquet", _instructions(workspace)
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        for turn in row[fields.RESPONSES] or []:
            turn["instruction_ja"] = text[row["conversation_id"]]
    pq.write_table(pa.Table.from_pylist(rows), path)
    card = (
        "  - name: instruction_ja\n    dtype: string\n"  # declared at the top: only the nested one is there
    )
    _forge(workspace, path, card=card)
    return path.name, [f"in {fields.RESPONSES}[].instruction_ja, row 0"]


def _extra_file(workspace: Path, release: Path) -> tuple[str, list[str]]:
    text = _instructions(workspace)
    table = pa.table({"conversation_id": list(text), fields.TEMPLATE: list(text.values())})
    pq.write_table(table, release / "extra.parquet")
    _forge(workspace, release / "extra.parquet")
    return "extra.parquet", [f"not a file package@{VARIANT} writes", f"in {fields.TEMPLATE}, row 0"]


def _stored_gpg(workspace: Path, release: Path) -> tuple[str, list[str]]:
    params, plain, home = load_params(), workspace / "plain.jsonl.gz", workspace / "gpghome"
    decrypt_file(release / ENCRYPTED, plain, derive_key(params.paths.source, params.decrypt.key))
    home.mkdir(mode=0o700)
    store = ["gpg", "--homedir", str(home), "--batch", "--yes", "--compress-algo", "none", "--store"]
    subprocess.run([*store, "-o", str(release / ENCRYPTED), str(plain)], check=True, capture_output=True)
    _forge(workspace, release / ENCRYPTED)
    return ENCRYPTED, ["not encrypted", "literal data (tag 11)"]


def _reencrypted_with_more(workspace: Path, release: Path) -> tuple[str, list[str]]:
    """The release's key, its own instructions, and one field more: encrypted data, not the release's."""
    params, plain = load_params(), workspace / "plain.jsonl.gz"
    key = derive_key(params.paths.source, params.decrypt.key)
    decrypt_file(release / ENCRYPTED, plain, key)
    lines = [json.loads(line) for line in gzip.decompress(plain.read_bytes()).splitlines()]
    lines[3]["conversation"] = "LMSYS-Chat-1M text"
    plain.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in lines).encode()))
    encrypt_file(plain, release / ENCRYPTED, key)
    _forge(workspace, release / ENCRYPTED)
    return ENCRYPTED, ["its record 3 holds other fields than conversation_id and translated_conversation"]


def _encrypted_with_another_key(workspace: Path, release: Path) -> tuple[str, list[str]]:
    params, plain = load_params(), workspace / "plain.jsonl.gz"
    decrypt_file(release / ENCRYPTED, plain, derive_key(params.paths.source, params.decrypt.key))
    encrypt_file(plain, release / ENCRYPTED, "a passphrase of the insider's own")
    _forge(workspace, release / ENCRYPTED)
    return ENCRYPTED, ["does not decrypt with the release's key (decrypt.key)"]


def _manifest_edited_not_dvc_lock(workspace: Path, release: Path) -> tuple[str, list[str]]:
    path = release / f"{STEM}.jsonl.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1))  # same records
    _record(workspace, path)
    return path.name, ["not the", f"dvc.lock records for package@{VARIANT}"]


def _no_dvc_lock_entry(workspace: Path, release: Path) -> tuple[str, list[str]]:
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    del lock["stages"][f"package@{VARIANT}"]
    (workspace / "dvc.lock").write_text(yaml.safe_dump(lock))
    return "dvc.lock", [f"records no out data/release/{VARIANT}", f"`dvc repro package@{VARIANT}`"]


def _manifest_not_json(workspace: Path, release: Path) -> tuple[str, list[str]]:
    (release / "manifest.json").write_text('{"variant": "gemma3", "files": ')
    return "manifest.json", ["not JSON (", f"dvc repro package@{VARIANT}"]


def _manifest_of_another_shape(workspace: Path, release: Path) -> tuple[str, list[str]]:
    manifest = json.loads((release / "manifest.json").read_text())
    manifest["files"][f"{STEM}.parquet"]["size"] = "27 KB"
    (release / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json", [
        f"not package@{VARIANT}'s manifest: files.{STEM}.parquet.size is not a whole number"
    ]


@pytest.mark.parametrize(
    "bypass",
    [
        _declared_new_column,
        _overwritten_declared_column,
        _nested_field,
        _extra_file,
        _stored_gpg,
        _reencrypted_with_more,
        _encrypted_with_another_key,
        _manifest_edited_not_dvc_lock,
        _no_dvc_lock_entry,
        _manifest_not_json,
        _manifest_of_another_shape,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_an_insider_s_edit_is_refused_in_one_line_naming_file_and_column_and_nothing_is_sent(
    workspace, hub, bypass
):
    name, words = bypass(workspace, workspace / f"data/release/{VARIANT}")
    done = publish(workspace, hub)
    _failed(done, "(nothing was sent)")
    line = [line for line in done.stderr.splitlines() if line.startswith(f"  {name}: ")]
    assert len(line) == 1, done.stderr
    for word in words:
        assert word in line[0], done.stderr
    assert hub.requests == [] and hub.repos == {}


def test_package_refuses_rows_that_carry_an_instruction_and_keeps_the_previous_release(
    workspace, monkeypatch
):
    public_table = records.public_table

    def leaking(part: pa.Table, with_en: bool, with_second_turn: bool) -> pa.Table:
        """A row transformation that copies each instruction into its (only) response."""
        table = public_table(part, with_en, with_second_turn)
        kind = table.schema.field(fields.RESPONSES).type
        turns = [
            [{"role": "assistant", "content": f"承知しました。{t}"}]
            for t in part["instruction_ja"].to_pylist()
        ]
        return table.set_column(
            table.schema.get_field_index(fields.RESPONSES), fields.RESPONSES, pa.array(turns, kind)
        )

    monkeypatch.setattr(records, "public_table", leaking)
    releases, before = workspace / "data/release", _release(workspace)
    metrics = (workspace / f"data/metrics/package-{VARIANT}.json").read_bytes()
    for previous in (True, False):
        with pytest.raises(leaks.LeakError) as refused:
            run_stage(monkeypatch, "package", VARIANT)
        for name in (f"{STEM}.parquet", f"{STEM}.jsonl.gz"):
            assert f"  {name}: holds private instruction text" in str(refused.value)
        assert f"in {fields.RESPONSES}[].content, row 0 (" in str(refused.value)
        assert "not writing the release" in str(refused.value)
        assert (workspace / f"data/metrics/package-{VARIANT}.json").read_bytes() == metrics
        if previous:  # kept as it was, nothing beside it
            assert _release(workspace) == before and [p.name for p in releases.iterdir()] == [VARIANT]
            shutil.rmtree(releases / VARIANT)
        else:  # no release
            assert list(releases.iterdir()) == []
