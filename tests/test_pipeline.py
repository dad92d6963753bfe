"""End to end: `dvc repro` runs the sample profile through every stage on the CPU, offline."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.storage.crypto import KeySpec, decrypt_file, derive_key
from stages.core.storage.jsonl import read_jsonl_gz
from tests.s3 import CREDENTIALS, moto_server

ROOT = Path(__file__).resolve().parent.parent
COPY = [
    "conf",
    "stages",
    "scripts",
    "data/sample",
    ".dvc/config",
    ".dvc/plots",  # the charts' templates (dvc.yaml plots: template)
    ".dvcignore",
    "dvc.yaml",
    "pyproject.toml",
    "requirements",
]
VARIANTS = {"llama31": ("llama3.1", 6, 1), "gemma2": ("gemma2", 6, 1), "gemma3": ("gemma3", 10, 0)}
SUBSET = {"llama31": "ja", "gemma2": "ja", "gemma3": "ja+unsafe"}  # conf/model (docs/assumptions.md #2)
GEMMA3 = {"generate@gemma3", "score@gemma3", "package@gemma3"}
# what a changed Gemma-3 parameter re-runs (`params` validates any change of params.yaml)
GEMMA3_AND_AFTER = GEMMA3 | {"sft@gemma3", "compare@gemma3", "merge@gemma3", "params"}
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
ENCRYPTED = "lmsys-chat-1m-first-turn-user-instructions-{subset}.jsonl.gz.gpg"  # named after the subset
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")  # kana and kanji
pytestmark = pytest.mark.slow


# a secret every DVC command of this module runs with, in the variables the project reads secrets from:
# it must appear in no file the pipeline writes nor in its logs (test_no_secret_of_the_environment_...)
MARKER = "marker-7f3c9e1b-not-a-real-secret"
SECRETS = {name: MARKER for name in ("HF_TOKEN", "OPENAI_API_KEY", "DEEPL_AUTH_KEY", "AWS_SECRET_ACCESS_KEY")}
LOGS: list[str] = []  # what every DVC command of this module printed


def dvc(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        **SECRETS,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    LOGS.extend((done.stdout, done.stderr))
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh git + DVC repository holding the project and the sample-profile params.yaml."""
    repo = tmp_path_factory.mktemp("repo")
    for name in COPY:
        src, dst = ROOT / name, repo / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (repo / "params.yaml").write_text(compose_params(["profile=sample"]), encoding="utf-8")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "sample"]):
        subprocess.run([*GIT, *args], cwd=repo, check=True)
    return repo


@pytest.fixture(scope="module")
def built(repo: Path) -> Path:
    assert ran(dvc(repo, "repro", "--dry", "--force", "package@gemma3")) == {  # six stages
        "fetch",
        "decrypt@ja+unsafe",
        "translate@ja+unsafe",
        *GEMMA3,
    }
    dvc(repo, "repro")
    return repo


def _translated(repo: Path, variant: str) -> list[dict]:
    return pq.read_table(repo / f"data/private/translated-{SUBSET[variant]}.parquet").to_pylist()


def test_release_files_of_every_variant(built: Path):
    key = derive_key(built / "data/raw/lmsys-chat-1m", KeySpec(file="data/train-00000-of-00002-*.parquet"))
    for variant, (release_name, n_ja, n_en) in VARIANTS.items():
        table = _translated(built, variant)
        assert any(r["translation_failed"] for r in table)  # the 60,000-character turn: too long to translate
        assert sum(r["flagged"] for r in table) == (12 if SUBSET[variant] == "ja+unsafe" else 0)
        table = [r for r in table if not r["translation_failed"]]  # no Japanese instruction: not released
        out = built / "data/release" / variant
        generated = pq.read_table(built / f"data/generated/{variant}.parquet").to_pandas()
        status = dict(zip(generated.conversation_id, generated.status_ja, strict=True))
        assert "skipped_too_long" in status.values()  # the 200,000-character turn, through the real engine
        records = list(read_jsonl_gz(out / f"{release_name}-lmsys-chat-1m-synth-ja+en.jsonl.gz"))
        assert [r["conversation_id"] for r in records] == [r["conversation_id"] for r in table]
        for record, row in zip(records, table, strict=True):
            assert "translated_conversation" not in record
            # the release's flags: generate's (the published file's where it has the row, else ours)
            flags = record["empty_user_instruction_ja"], record["duplicate_user_instruction_ja"]
            skipped = flags[0] or flags[1] is not None
            skipped = skipped or status[row["conversation_id"]] in ("skipped_too_long", "skipped_redacted")
            responses = record["synthesized_assistant_responses"]
            notes = record["synthesized_response_scoring_annotations"]
            if skipped:
                assert responses is None and notes is None
            else:
                assert len(responses) == len(notes) == n_ja
                assert all(-1 <= n["preference_score"] <= 10 for n in notes)
            assert ("synthesized_assistant_responses_en" in record) == (n_en > 0)
            assert ("synthesized_multiturn_conversation" in record) == (variant == "gemma2")
        plain = out.parent / f".{variant}.jsonl.gz"
        decrypt_file(out / ENCRYPTED.format(subset=SUBSET[variant]), plain, key)
        assert [r["translated_conversation"][0]["content"] for r in read_jsonl_gz(plain)] == [
            r["instruction_ja"] for r in table
        ]
        plain.unlink()
        producers = json.loads((out / "manifest.json").read_text())["producers"]
        # the sample profile's translator LLM answered the first turns the release lacks
        roles = {"translate", "generate", "judge"} | ({"second_turn"} if variant == "gemma2" else set())
        assert set(producers["models"]) == roles
        assert {m["libraries"]["transformers"] for m in producers["models"].values()} == {
            metadata.version("transformers")
        }


def _records(repo: Path, variant: str) -> list[dict]:
    name = VARIANTS[variant][0]
    return list(read_jsonl_gz(repo / "data/release" / variant / f"{name}-lmsys-chat-1m-synth-ja+en.jsonl.gz"))


def test_the_trained_tiny_model_behaves_through_the_dag(built: Path):
    """What the DAG is for, on the sample through the real engine: a spread of parsed scores with a
    few deliberate -1s, best responses chosen, Gemma-2 two-turn conversations from them, Japanese
    LLM translations for the turns the release lacks; each release's metrics match its files."""
    translated = _translated(built, "llama31")
    asked = [r for r in translated if r["instruction_source"] == "llm" and not r["empty_first_turn"]]
    statuses = sorted(r["translation_status"] for r in asked)
    assert statuses == ["ok"] * (len(asked) - 1) + ["skipped_too_long"]  # the 60,000-character turn
    assert all(JAPANESE.search(r["instruction_ja"]) for r in asked if r["translation_status"] == "ok")
    translation_failed = sum(r["translation_failed"] for r in translated)
    assert translation_failed == 1
    for variant in VARIANTS:
        records = _records(built, variant)
        scores = [
            n["preference_score"]
            for r in records
            for n in r["synthesized_response_scoring_annotations"] or []
        ]
        parsed = [s for s in scores if s != -1]
        assert len(set(parsed)) >= 3, f"{variant}: {sorted(set(parsed))}"  # ratings vary
        assert 0 < scores.count(-1) < 0.2 * len(scores), variant  # judgements without a rating, on purpose
        best = {
            r["conversation_id"]: r["best_index"]
            for r in pq.read_table(built / f"data/scored/{variant}.parquet").to_pylist()
        }
        multiturn, single_turn = [], 0
        for record in records:
            notes = record["synthesized_response_scoring_annotations"]
            ratings = [n["preference_score"] for n in notes or []]
            chosen = best[record["conversation_id"]]
            if any(s != -1 for s in ratings):  # the first of the highest valid scores
                assert chosen == ratings.index(max(ratings))
            else:
                assert chosen is None
            stored = record.get("synthesized_multiturn_conversation")  # a list of one conversation
            if stored is not None:
                (dialogue,) = stored
                assert dialogue[0]["content"] == record["synthesized_assistant_responses"][chosen]["content"]
                if len(dialogue) == 1:  # single-turn: the best response
                    single_turn += 1
                    continue
                assert [m["role"] for m in dialogue] == ["assistant", "user", "assistant"]
                assert JAPANESE.search(dialogue[1]["content"])  # the user's follow-up, in Japanese
                multiturn.append(dialogue)
        assert (len(multiturn) > 0) == (single_turn > len(multiturn)) == (variant == "gemma2")
        if variant == "gemma2":  # the configured share (0.297 = 134,014 / 451,450), within a few points
            assert len(multiturn) / (len(multiturn) + single_turn) == pytest.approx(0.297, abs=0.04)
        metrics = json.loads((built / f"data/metrics/package-{variant}.json").read_text(encoding="utf-8"))
        assert metrics["judgements"] == len(scores)
        assert metrics["judgements_failed"] == scores.count(-1)
        assert metrics["mean_preference_score"] == pytest.approx(sum(parsed) / len(parsed), abs=1e-4)
        assert metrics["multiturn_conversations"] == len(multiturn)
        assert metrics["single_turn_conversations"] == single_turn
        assert metrics["translation_failed"] == translation_failed


def bytecode(repo: Path) -> None:
    """Import every module of `repo`'s stages package and byte-compile the rest, bytecode writing on."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    code = "import importlib, pkgutil, stages; [importlib.import_module(m.name) for m in "
    code += "pkgutil.walk_packages(stages.__path__, 'stages.') if not m.name.endswith(('vllm', '__main__'))]"
    for args in (["-c", code], ["-m", "compileall", "-q", "stages"]):
        done = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_an_unknown_params_key_stops_dvc_repro_even_where_no_stage_reads_it(built: Path):
    path = built / "params.yaml"
    text = path.read_text(encoding="utf-8")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        path.write_text(text + "seeed: 7\n", encoding="utf-8")
        done = subprocess.run(["dvc", "repro"], cwd=built, env=env, capture_output=True, text=True)
    finally:
        path.write_text(text, encoding="utf-8")
    assert done.returncode != 0
    assert "seeed: Extra inputs are not permitted" in done.stderr + done.stdout
    assert ran(done.stdout) == {"params"}


def test_bytecode_never_makes_a_stage_stale(built: Path):
    bytecode(built)
    assert list((built / "stages/core/engines").glob("__pycache__/*.pyc"))
    assert "Data and pipelines are up to date." in dvc(built, "status")
    lock = (built / "dvc.lock").read_text(encoding="utf-8")
    assert "__pycache__" not in lock and ".pyc" not in lock


def test_no_secret_of_the_environment_is_written_or_printed(built: Path):
    """The DAG ran with a marker in HF_TOKEN, OPENAI_API_KEY, DEEPL_AUTH_KEY and AWS_SECRET_ACCESS_KEY:
    it is in no file of the repository (params.yaml, dvc.lock, every out, release, metric and cache)
    and in no log line."""
    found = [
        str(path.relative_to(built))
        for path in built.rglob("*")
        if path.is_file() and ".git" not in path.parts and MARKER.encode() in path.read_bytes()
    ]
    assert found == [] and not any(MARKER in log for log in LOGS)


def test_second_repro_runs_nothing(built: Path):
    output = dvc(built, "repro")
    assert ran(output) == set()
    assert "Data and pipelines are up to date." in output


def test_an_engine_edit_leaves_fetch_and_decrypt_up_to_date(built: Path):
    """A comment in stages/core/engines/base.py makes the stages that run engines stale in `dvc status`,
    never fetch or decrypt (their code deps reach no engine: scripts/code_deps.py)."""
    base = built / "stages/core/engines/base.py"
    text = base.read_text(encoding="utf-8")
    try:
        base.write_text(text + "# a comment\n", encoding="utf-8")
        stale = set(json.loads(dvc(built, "status", "--json")))
    finally:
        base.write_text(text, encoding="utf-8")
    assert {"translate@ja", "generate@gemma3", "score@gemma2"} <= stale
    assert not {s for s in stale if s.startswith(("fetch", "decrypt", "package", "params"))}, stale


def _status(repo: Path) -> list[dict]:
    command = [sys.executable, "-m", "stages.status", "--json"]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_status_and_metrics_show_what_each_request_sending_stage_did(built: Path):
    states = {s["name"]: s for s in _status(built)}
    assert {s["state"] for s in states.values()} == {"done"} and len(states) == 24
    (judge, second) = states["score@gemma2"]["passes"]
    assert (judge["stage"], second["stage"]) == ("score@gemma2", "second-turn@gemma2")
    generate = states["generate@gemma3"]["passes"][0]
    assert generate["state"] == "done" and generate["shards_left"] == 0 and generate["requests_done"] > 0
    assert states["translate@ja"]["passes"][0]["shards_left"] == 0  # the sample's LLM translator
    # what each stage asked of its engines, for `dvc metrics diff vA vB`
    metrics = json.loads(dvc(built, "metrics", "show", "--json"))
    figures = next(iter(metrics.values()))["data"]
    ours = figures["data/metrics/generate-gemma3.json"]["data"]["generate"]
    assert ours["requests"] == ours["from_cache"] + ours["cache_misses"] > 0
    assert ours["statuses"]["ok"] > 0 and ours["completion_tokens"] > 0 and ours["engine_seconds"] >= 0
    scored = figures["data/metrics/score-gemma2.json"]["data"]
    assert set(scored) == {"judge", "second_turn"}
    assert scored["judge"]["rows"] == scored["second_turn"]["rows"]
    # a changed param makes the stages that read it stale, and says which
    params = built / "params.yaml"
    text = params.read_text(encoding="utf-8")
    try:
        params.write_text(text.replace("seed: ", "seed: 1", 1), encoding="utf-8")
        states = {s["name"]: s for s in _status(built)}
    finally:
        params.write_text(text, encoding="utf-8")
    assert states["generate@gemma3"]["state"] == "stale" and "params.yaml" in states["generate@gemma3"]["why"]
    assert states["fetch"]["state"] == "done"


def _written(repo: Path) -> dict:
    try:
        return json.loads((repo / ".dvc/tmp/rwlock").read_text(encoding="utf-8")).get("write", {})
    except (OSError, ValueError):
        return {}


def test_status_works_beside_a_live_dvc_repro_and_names_the_running_stage(built: Path):
    """`python -m stages.status` beside a `dvc repro` running in another process (DVC holds its write
    locks on generate@gemma3's outs): three probes, each exit 0, the stage running with its shards."""
    params = built / "params.yaml"
    text = params.read_text(encoding="utf-8")
    metrics = {p: p.read_bytes() for p in (built / "data/metrics").rglob("*") if p.is_file()}
    slow = yaml.safe_load(text)
    slow["models"]["gemma3"]["generate"]["sampling"]["max_tokens"] = 48  # new requests, twice as many
    slow["models"]["gemma3"]["generate"]["n_ja"] = 20  # as the sample asks: a run of a minute or so
    params.write_text(yaml.safe_dump(slow, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    repro = subprocess.Popen(
        ["dvc", "repro", "generate@gemma3"],
        cwd=built,
        env=env | {"HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C below goes to dvc and the stage, as in a terminal
    )
    try:
        waited = time.monotonic()
        while not _written(built):  # DVC locks the outs, then the stage runs
            assert repro.poll() is None and time.monotonic() - waited < 120, "dvc repro ended or never locked"
            time.sleep(0.2)
        time.sleep(3)  # the stage's progress record appears
        for _ in range(3):
            assert repro.poll() is None, "the repro ended before status could look beside it"
            states = {s["name"]: s for s in _status(built)}
            assert states["generate@gemma3"]["state"] == "running"
            assert states["generate@gemma3"]["passes"][0]["stage"] == "generate@gemma3"
            assert states["fetch"]["state"] == "done" and states["score@gemma3"]["state"] == "stale"
            time.sleep(1)
    finally:
        os.killpg(repro.pid, signal.SIGINT)
        repro.wait(timeout=60)
        params.write_text(text, encoding="utf-8")
        dvc(built, "checkout", "--force")  # the outs as dvc.lock has them (the run may have written some)
        for path, data in metrics.items():  # and its metrics, which are in git, not in DVC's cache
            path.write_bytes(data)
    assert ran(dvc(built, "repro", "--dry")) == set()  # nothing left stale


def _ciphertexts(repo: Path) -> dict[str, bytes]:
    return {
        v: (repo / "data/release" / v / ENCRYPTED.format(subset=SUBSET[v])).read_bytes() for v in VARIANTS
    }


def test_identical_plaintext_gets_identical_ciphertext(built: Path):
    files = _ciphertexts(built)
    assert files["llama31"] == files["gemma2"]  # the same subset: a later variant reuses the first's file
    assert files["gemma3"] != files["llama31"]  # ja+unsafe: other instructions, its own file
    assert sorted(p.name for p in (built / "data/release/gemma3").glob("*.gpg")) == [
        "lmsys-chat-1m-first-turn-user-instructions-ja+unsafe.jsonl.gz.gpg"  # the published name
    ]


def test_a_gemma3_parameter_reruns_only_gemma3_stages(built: Path):
    before = _ciphertexts(built)
    release = (built / "data/release/gemma3/gemma3-lmsys-chat-1m-synth-ja+en.jsonl.gz").read_bytes()
    params = yaml.safe_load((built / "params.yaml").read_text(encoding="utf-8"))
    params["models"]["gemma3"]["generate"]["sampling"]["temperature"] = 0.9
    (built / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    assert ran(dvc(built, "repro")) == GEMMA3_AND_AFTER
    assert (built / "data/release/gemma3/gemma3-lmsys-chat-1m-synth-ja+en.jsonl.gz").read_bytes() != release
    assert _ciphertexts(built) == before  # re-packaged, same instructions: the .gpg did not change


def _texts(path: Path) -> str:
    """Everything a file says, as text: Parquet cells, gunzipped lines, or the raw bytes."""
    if path.suffix == ".parquet":
        return json.dumps(pq.read_table(path).to_pylist(), ensure_ascii=False, default=str)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _outs_by_remote(repo: Path) -> dict[str, list[Path]]:
    """Files of every DVC out, grouped by the remote they are pushed to ('git' for cache: false)."""
    from dvc.repo import Repo

    groups: dict[str, list[Path]] = {}
    with Repo(str(repo)) as dvc_repo:
        for stage in dvc_repo.index.stages:
            for out in stage.outs:
                where = "git" if not out.use_cache else (out.remote or "public")
                path = Path(out.fs_path)
                files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
                groups.setdefault(where, []).extend(files)
    return groups


def _model_wrote(repo: Path) -> str:
    """Every completion the models wrote (responses, judge rationales, second turns), joined."""
    texts = []
    for variant in VARIANTS:
        generated = pq.read_table(repo / f"data/generated/{variant}.parquet")
        for column in ("responses_ja", "responses_en"):
            texts += [c["content"] for cell in generated[column].to_pylist() for c in cell or []]
        scored = pq.read_table(repo / f"data/scored/{variant}.parquet")
        texts += [json.dumps(cell, ensure_ascii=False) for cell in scored["annotations"].to_pylist()]
        texts += [json.dumps(cell, ensure_ascii=False) for cell in scored["multiturn"].to_pylist()]
    return "\n".join(texts)


def test_license_guard_no_plaintext_instruction_bound_for_public(built: Path):
    instructions = {r["instruction_ja"] for v in VARIANTS for r in _translated(built, v)}
    # None: a failed translation; under 12 characters ("こんにちは！") a reply may say the same words
    instructions = {t for t in instructions if t and len(t) >= 12}
    # the tiny model was trained on the sample's templates and at times writes one of them word for
    # word: that is its output, as a published response may quote its instruction, not a copy the
    # pipeline made. Those few are left out; a pipeline copy would show every other one.
    wrote = _model_wrote(built)
    said = {t for t in instructions if t in wrote}
    assert len(said) <= len(instructions) // 20
    instructions -= said
    groups = _outs_by_remote(built)
    assert set(groups) == {"public", "private", "git"}

    def leaks(files: list[Path]) -> list[str]:
        texts = {p: _texts(p) for p in files}
        return [f"{p.relative_to(built)}: {t!r}" for p, x in texts.items() for t in instructions if t in x]

    assert leaks(groups["private"])  # the scanner does find plaintext where it is allowed
    assert leaks(groups["public"] + groups["git"]) == []
    public = {p.relative_to(built).parts[1] for p in groups["public"]}
    assert public == {"raw", "generated", "scored", "release"}
    private = {p.relative_to(built).as_posix() for p in groups["private"]}
    for subset in ("ja", "ja+unsafe"):
        assert {
            f"data/private/translated-{subset}.parquet",
            f"data/private/instructions-{subset}.parquet",
        } <= private
    assert "data/interim/first-turn.parquet" in private


def _s3_remotes(repo: Path, endpoint: str) -> None:
    """The buckets of both DVC remotes on the local S3 at `endpoint`, and `repo`'s remotes pointed there."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for bucket in ("lmsys-chat-1m-synth", "lmsys-chat-1m-synth-private"):
        client.create_bucket(Bucket=bucket)
    for remote in ("public", "private"):
        dvc(repo, "remote", "modify", "--local", remote, "endpointurl", endpoint)


def _objects(endpoint: str, bucket: str) -> set[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def test_push_to_s3_and_pull_a_release_into_a_fresh_clone(built: Path, tmp_path: Path, monkeypatch):
    import boto3

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    subprocess.run(["git", "add", "-A"], cwd=built, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], cwd=built, check=True
    )
    lock = yaml.safe_load((built / "dvc.lock").read_text(encoding="utf-8"))
    translated = next(
        o for o in lock["stages"]["translate@ja"]["outs"] if o["path"].endswith("translated-ja.parquet")
    )
    with moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for bucket in ("lmsys-chat-1m-synth", "lmsys-chat-1m-synth-private"):
            client.create_bucket(Bucket=bucket)
        for repo in (built, tmp_path / "clone"):
            if repo != built:
                subprocess.run(["git", "clone", "-q", str(built), str(repo)], check=True)
            for remote in ("public", "private"):
                dvc(repo, "remote", "modify", "--local", remote, "endpointurl", endpoint)
            if repo == built:
                dvc(repo, "push")
        public, private = (
            _objects(endpoint, "lmsys-chat-1m-synth"),
            _objects(endpoint, "lmsys-chat-1m-synth-private"),
        )
        md5 = translated["md5"]
        assert f"dvc-private/files/md5/{md5[:2]}/{md5[2:]}" in private  # plaintext instructions: private only
        assert not any(md5[2:] in key for key in public)
        dvc(tmp_path / "clone", "pull", "package@gemma3")
    release = Path("data/release/gemma3")
    for name in sorted(p.name for p in (built / release).iterdir()):
        assert (tmp_path / "clone" / release / name).read_bytes() == (built / release / name).read_bytes()


def test_package_encrypts_afresh_when_the_previous_release_cannot_be_read(built: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy, symlinks=True, ignore=shutil.ignore_patterns("cache"))  # no .dvc/cache
    encrypted = ENCRYPTED.format(subset="ja+unsafe")
    before = (copy / "data/release/gemma3" / encrypted).read_bytes()
    shutil.rmtree(copy / "data/release")  # no earlier release in the workspace either
    output = dvc(copy, "repro", "--force", "--single-item", "package@gemma3")
    assert ran(output) == {"package@gemma3"}
    after = (copy / "data/release/gemma3" / encrypted).read_bytes()
    assert after != before  # the dvc.lock's release is in no cache and the S3 remote is unreachable
    key = derive_key(copy / "data/raw/lmsys-chat-1m", KeySpec(file="data/train-00000-of-00002-*.parquet"))
    decrypt_file(copy / "data/release/gemma3" / encrypted, tmp_path / "plain.jsonl.gz", key)
    released = [r for r in _translated(built, "gemma3") if not r["translation_failed"]]
    assert len(list(read_jsonl_gz(tmp_path / "plain.jsonl.gz"))) == len(released) == 325  # 326 less 1


def _release_bytes(repo: Path, variant: str) -> dict[str, bytes]:
    out = repo / "data/release" / variant
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_tags_carry_metrics_plots_and_release_notes(built: Path, tmp_path: Path, monkeypatch):
    """docs/releases.md's release walk: run, push, tag v0.1; `dvc exp run -S` a Gemma-3 change, push, tag
    v0.2; a fresh clone checks out v0.1 and pulls byte-identical files with `dvc status` clean, and
    the metrics diff and release notes name the changed parameter and figures."""

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    git = lambda repo, *args: subprocess.run([*GIT, *args], cwd=repo, check=True)  # noqa: E731
    clone = tmp_path / "clone"
    with moto_server() as endpoint:
        _s3_remotes(built, endpoint)
        dvc(built, "repro")  # whatever earlier tests changed, the workspace matches its params now
        git(built, "add", "-A")
        git(built, "commit", "-qm", "v0.1", "--allow-empty")
        git(built, "tag", "v0.1")
        dvc(built, "push")
        v01 = _release_bytes(built, "gemma3")
        assert (built / "data/metrics/package-gemma3.json").exists()
        tracked = subprocess.run(
            ["git", "ls-files", "data/metrics"], cwd=built, capture_output=True, text=True
        )
        assert "data/metrics/package-gemma3.json" in tracked.stdout.split()  # metrics travel with the tag
        assert "data/metrics/plots/gemma3/scores.json" in tracked.stdout.split()

        output = dvc(built, "exp", "run", "-S", "profile=sample", "-S", "models.gemma3.generate.n_ja=4")
        assert ran(output) == GEMMA3_AND_AFTER
        check = subprocess.run(
            [sys.executable, "-m", "stages.compose", "--check"], cwd=built, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr  # dvc exp run's params.yaml passes the compose check
        assert "models.gemma3.generate.n_ja=4" in check.stdout
        git(built, "add", "-A")
        git(built, "commit", "-qm", "v0.2")
        git(built, "tag", "v0.2")
        dvc(built, "push")

        subprocess.run(["git", "clone", "-q", str(built), str(clone)], check=True)
        git(clone, "checkout", "-q", "v0.1")
        for remote in ("public", "private"):
            dvc(clone, "remote", "modify", "--local", remote, "endpointurl", endpoint)
        dvc(clone, "pull")
    assert _release_bytes(clone, "gemma3") == v01
    assert "Data and pipelines are up to date." in dvc(clone, "status")
    bytecode(clone)  # a teammate imports every module, with Python writing its bytecode
    assert list((clone / "stages/core/engines").glob("__pycache__/*.pyc"))
    assert "Data and pipelines are up to date." in dvc(clone, "status")

    metrics = json.loads(dvc(clone, "metrics", "diff", "v0.1", "v0.2", "--json"))
    gemma3 = metrics["data/metrics/package-gemma3.json"]
    assert gemma3["responses_ja"]["new"] < gemma3["responses_ja"]["old"]  # 10 -> 4 per instruction
    assert not any(path.endswith(("llama31.json", "gemma2.json")) for path in metrics)  # only Gemma-3 moved
    notes = subprocess.run(
        [sys.executable, "-m", "stages.release_notes", "v0.1", "v0.2", "--plots", str(tmp_path / "plots")],
        cwd=clone,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    assert notes.returncode == 0, notes.stderr
    assert "| `params.yaml` | `models.gemma3.generate.n_ja` | `10` | `4` |" in notes.stdout
    assert re.search(
        r"\| `data/metrics/package-gemma3\.json` \| `responses_ja` \| [\d,]+ \| [\d,]+ \|", notes.stdout
    )
    assert "data/release/gemma3" in notes.stdout.split("## Outputs")[1]
    page = (tmp_path / "plots" / "index.html").read_text(encoding="utf-8")
    assert "v0.1" in page and "v0.2" in page and "gemma3: responses by preference_score" in page


def test_dvc_repro_compare_writes_its_report_and_its_metrics_diff_between_tags(built: Path):
    """compare@gemma3 (stages/compare.py) against the sample's project-written published file."""
    metrics, report = built / "data/metrics/compare-gemma3.json", built / "data/metrics/compare-gemma3.md"
    metrics.unlink()
    report.unlink()
    assert ran(dvc(built, "repro", "compare@gemma3")) == {"compare@gemma3"}
    assert report.read_text(encoding="utf-8").startswith("# compare@gemma3: our release and the published")
    assert json.loads(metrics.read_text())["rows"]["published"] == 309
    for args in (["add", "-A"], ["commit", "-qm", "compare a", "--allow-empty"], ["tag", "compare-a"]):
        subprocess.run([*GIT, *args], cwd=built, check=True)
    params = yaml.safe_load((built / "params.yaml").read_text(encoding="utf-8"))
    params["published"]["file"] = "dataset/gemma2-lmsys-chat-1m-synth-ja+en.jsonl.gz"  # another file
    (built / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    assert "compare@gemma3" in ran(dvc(built, "repro", "compare@gemma3"))
    for args in (["add", "-A"], ["commit", "-qm", "compare b", "--allow-empty"], ["tag", "compare-b"]):
        subprocess.run([*GIT, *args], cwd=built, check=True)
    diff = json.loads(dvc(built, "metrics", "diff", "compare-a", "compare-b", "--json"))
    assert diff["data/metrics/compare-gemma3.json"]["rows.published"] == {"old": 309, "new": 298, "diff": -11}


def test_the_release_script_builds_the_whole_chain_pushes_and_tags_with_nothing_stale(
    built: Path, monkeypatch
):
    """`python -m scripts.release gemma3 <tag>` after a Gemma-3 change: package, sft, merge and compare
    all run before the tag (the tag never carries the previous release's figures), `dvc status` is
    clean, the data is on the remote (moto), and the tag holds the new metrics."""

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    params = yaml.safe_load((built / "params.yaml").read_text(encoding="utf-8"))
    params["models"]["gemma3"]["generate"]["sampling"]["top_p"] = 0.85
    (built / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = {**os.environ, **SECRETS, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env |= {
        f"GIT_{who}_{what}": value
        for who in ("AUTHOR", "COMMITTER")
        for what, value in (("NAME", "t"), ("EMAIL", "t@t"))
    }
    with moto_server() as endpoint:
        _s3_remotes(built, endpoint)
        done = subprocess.run(
            [sys.executable, "-m", "scripts.release", "gemma3", "v-test-release"],
            cwd=built,
            env=env | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "dvc push --with-deps package@gemma3 sft@gemma3 merge@gemma3 compare@gemma3" in done.stdout
        assert _objects(endpoint, "lmsys-chat-1m-synth")
    chain = [f"{stage}@gemma3" for stage in ("package", "sft", "merge", "compare")]
    assert ran(dvc(built, "repro", "--dry", *chain)) == set()  # the release's whole chain is built
    for name in ("compare-gemma3.json", "sft-gemma3.json", "package-gemma3.json"):
        tagged = subprocess.run(
            ["git", "show", f"v-test-release:data/metrics/{name}"], cwd=built, capture_output=True, text=True
        )
        assert tagged.stdout == (built / "data/metrics" / name).read_text(encoding="utf-8"), name
