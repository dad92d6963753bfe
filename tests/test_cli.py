"""Errors for people: an expected failure prints a few lines naming the key or file and the fix,
exits with status 2, and shows no traceback unless LMSYS_SYNTH_TRACEBACK=1."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.config.cli import READS, stage_input
from stages.core.config.params import load_params
from tests.conftest import set_params

ROOT = Path(__file__).resolve().parent.parent
# left out of the environment a stage runs in: each test sets the ones it needs
UNSET = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LMSYS_SYNTH_TRACEBACK")
TOKEN = "hf_" + "x" * 34  # a token of the right shape, never sent anywhere but 127.0.0.1
REVISION = "200748d9d3cddcc9d782887541057aca0b18c5da"


def _run(workspace: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in UNSET}
    environ.update(PYTHONPATH=str(ROOT), HF_HOME=str(workspace / "hf"), **env)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=workspace, env=environ, capture_output=True, text=True
    )


def _plain(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2, no traceback, and a message of a few lines (after the stage's own log lines)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr[done.stderr.index("error: ") :].splitlines()) <= 8, done.stderr
    for word in words:
        assert word in done.stderr


def test_a_mistyped_params_key_names_the_key(workspace):
    set_params(workspace, lambda d: d["models"]["gemma3"]["generate"]["sampling"].update(temprature=0.7))
    done = _run(workspace, "stages.generate", "gemma3")
    _plain(done, "models.gemma3.generate.sampling.temprature: Extra inputs are not permitted")


def test_a_wrong_type_names_the_key_and_value(workspace):
    set_params(workspace, lambda d: d["engine"].update(backend="tgi"))
    _plain(_run(workspace, "stages.fetch"), "engine.backend", "'transformers', 'vllm' or 'openai'", "'tgi'")


def test_an_unknown_variant_lists_the_variants(workspace):
    _plain(
        _run(workspace, "stages.generate", "gemma4"), "unknown variant 'gemma4'", "llama31, gemma2, gemma3"
    )


def test_an_unknown_compose_option_lists_the_options(workspace):
    done = _run(workspace, "stages.compose", "profile=nosuch", "--out", "p.yaml")
    _plain(done, "Could not find 'profile/nosuch'", "production", "sample")
    assert not (workspace / "p.yaml").exists()


def test_an_unknown_key_is_refused_at_compose_time(workspace):
    done = _run(workspace, "stages.compose", "+models.gemma3.generate.n_jaa=3", "--out", "p.yaml")
    _plain(done, "models.gemma3.generate.n_jaa: Extra inputs are not permitted")


def test_a_wrong_key_names_the_file(workspace):
    assert _run(workspace, "stages.fetch").returncode == 0
    set_params(
        workspace,
        lambda d: d["decrypt"].update(key={"method": "hash", "file": "data/train-00001-of-00002-*.parquet"}),
    )
    _plain(_run(workspace, "stages.decrypt"), "gpg could not decrypt", "jsonl.gz.gpg")


def test_a_missing_token_says_how_to_get_access(workspace):
    set_params(
        workspace,
        lambda d: d["fetch"]["source"].update(uri="hf://datasets/lmsys/lmsys-chat-1m", revision="a" * 40),
    )
    _plain(
        _run(workspace, "stages.fetch", HF_HUB_OFFLINE="1"),
        "HF_TOKEN",
        "huggingface.co/datasets/lmsys/lmsys-chat-1m",
    )


@pytest.mark.parametrize("flag", ["1", "yes"])
def test_the_traceback_is_there_when_asked_for(workspace, flag):
    set_params(workspace, lambda d: d["engine"].update(backend="tgi"))
    done = _run(workspace, "stages.fetch", LMSYS_SYNTH_TRACEBACK=flag)
    assert done.returncode != 0 and "Traceback" in done.stderr and "ParamsError" in done.stderr


def _use_hub(workspace: Path) -> None:
    set_params(
        workspace,
        lambda d: d["fetch"]["source"].update(uri="hf://datasets/lmsys/lmsys-chat-1m", revision=REVISION),
    )


@pytest.fixture(params=["refused", "silent"])
def dead_hub(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(the URL of a 127.0.0.1 port, the error a request to it gets): nothing listens there
    (refused), or a socket listens but never answers (a timeout)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if request.param == "silent":
            sock.listen(8)  # the kernel completes the handshake; nobody reads the request
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", request.param


def test_an_unreachable_hub_names_the_repo_and_the_fixes(workspace, dead_hub):
    endpoint, kind = dead_hub
    _use_hub(workspace)
    timeouts = {"HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    done = _run(workspace, "stages.fetch", HF_TOKEN=TOKEN, HF_ENDPOINT=endpoint, **timeouts)
    _plain(
        done,
        f"error: hf://datasets/lmsys/lmsys-chat-1m@{REVISION}: the Hub at {endpoint} is unreachable (",
        "Check the network (or HTTPS_PROXY), set HF_ENDPOINT to a Hub mirror this machine reaches, or set "
        "the uri in conf/source/ to a local directory or s3:// copy of the files (['data/train-*.parquet'])",
    )
    slow = "; on a slow network, raise HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT (seconds)"
    assert ("Connection refused" in done.stderr) == (kind == "refused")
    assert (slow in done.stderr) == (kind == "silent")


def test_offline_mode_names_the_setting_and_what_it_cannot_fetch(workspace):
    _use_hub(workspace)
    _plain(
        _run(workspace, "stages.fetch", HF_TOKEN=TOKEN, HF_HUB_OFFLINE="1"),
        f"error: hf://datasets/lmsys/lmsys-chat-1m@{REVISION}: HF_HUB_OFFLINE=1 is set, and hf:// files are "
        "read only from the Hub, never from the local Hugging Face cache, so ['data/train-*.parquet'] cannot "
        "be fetched. Unset HF_HUB_OFFLINE where the Hub is reachable, or set the uri in conf/source/ to a "
        "local directory or s3:// copy of the files",
    )


# a stage run before its inputs exist -> (the inputs made first, the missing one, the stage that makes it)
MISSING = {
    "generate": ((), "data/private/translated-ja+unsafe.parquet", "translate@ja+unsafe"),
    "score": (("released", "translated"), "data/generated/gemma3.parquet", "generate@gemma3"),
    "package": ((), "data/raw/lmsys-chat-1m", "fetch"),
    "package-scored": (
        ("source", "released", "translated", "generated", "annotations"),
        "data/scored/gemma3.parquet",
        "score@gemma3",
    ),
}


@pytest.mark.parametrize("case", MISSING)
def test_a_missing_input_names_the_stage_that_makes_it(workspace, case):
    made, missing, made_by = MISSING[case]
    stage = case.split("-")[0]
    params = load_params(workspace / "params.yaml")
    for kind in made:  # only their existence is checked before any work
        path = workspace / stage_input(params, kind, "gemma3", "ja+unsafe")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if kind in ("source", "released") else path.touch()
    _plain(
        _run(workspace, f"stages.{stage}", "gemma3"),
        f"error: {missing} does not exist: run `dvc repro {made_by}` (or `dvc repro {stage}@gemma3`, which "
        "runs what it needs)",
    )


def _struct_for_string(shard: Path) -> None:
    table = pq.read_table(shard)
    model = pa.StructArray.from_arrays([table["model"].combine_chunks()], names=["name"])
    pq.write_table(table.set_column(table.schema.get_field_index("model"), "model", model), shard)


def _string_for_bool(shard: Path) -> None:
    table = pq.read_table(shard)
    redacted = table["redacted"].cast(pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("redacted"), "redacted", redacted), shard)


def _directory(shard: Path) -> None:
    data = shard.read_bytes()
    shard.unlink()
    shard.mkdir()
    (shard / "part-0.parquet").write_bytes(data)


# a source shard made malformed -> what the message says after the shard's name
MALFORMED = {
    "struct for a string": (
        _struct_for_string,
        ": column 'model' is struct<name: string>, expected string; ",
    ),
    "string for a bool": (_string_for_bool, ": column 'redacted' is string, expected bool; "),
    "directory": (_directory, " is a directory, where ['data/train-*.parquet'] should match files only: "),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_source_shard_names_the_file_and_what_is_wrong(workspace, case):
    damage, message = MALFORMED[case]
    shard = next((workspace / "data/sample/lmsys-chat-1m/data").glob("train-00001-*.parquet"))
    damage(shard)
    _plain(_run(workspace, "stages.fetch"), f"error: data/sample/lmsys-chat-1m/data/{shard.name}{message}")


def _resolve(text: str, scope: dict) -> str:
    """`text` with dvc.yaml's ${a.b} references filled in from `scope` (params, key, item)."""

    def value(ref: re.Match) -> str:
        node = scope
        for part in ref[1].split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def _instances(stage: dict, data: dict) -> list[tuple[str | None, str | None, dict]]:
    """(variant or subset, subset, ${key} and ${item}) of each instance of a dvc.yaml stage."""
    if "foreach" not in stage:
        return [(None, None, {})]
    items = data
    for part in stage["foreach"].removeprefix("${").removesuffix("}").split("."):
        items = items[part]
    if isinstance(items, dict):  # ${models}
        return [(key, item["subset"], {"key": key, "item": item}) for key, item in items.items()]
    return [(item, item, {"item": item}) for item in items]  # ${decrypt.subsets}


def test_each_stage_checks_the_data_dvc_yaml_lists_as_its_deps():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params = load_params(ROOT / "params.yaml")
    for stage, kinds in READS.items():
        deps = stages[stage].get("do", stages[stage]).get("deps", [])
        for name, subset, scope in _instances(stages[stage], data):
            listed = sorted(_resolve(d, {**data, **scope}) for d in deps if d.startswith("${paths."))
            checked = sorted(stage_input(params, kind, name, subset)[0] for kind in kinds)
            assert checked == listed, f"{stage}@{name}"


def test_a_terminated_stage_removes_its_private_temporary_files(tmp_path):
    """SIGTERM runs every `finally`: a stage stopped by `kill` leaves no plaintext behind."""
    import signal
    import time

    script = tmp_path / "stage.py"
    script.write_text(
        "import sys, time\n"
        "from stages.core.config.cli import run\n"
        "from stages.core.storage.atomic import private_tempdir\n"
        "def main():\n"
        f"    with private_tempdir({str(tmp_path / 'private')!r}, 'package-x') as tmp:\n"
        "        (tmp / 'instructions.jsonl.gz').write_bytes(b'plaintext')\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(60)\n"
        "run(main)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    line = proc.stdout.readline().strip()
    assert line == "ready", proc.stderr.read()
    assert len(list((tmp_path / "private").iterdir())) == 1
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM and time.monotonic() - began < 10
    assert list((tmp_path / "private").iterdir()) == []


@pytest.mark.parametrize(
    "module",
    ["fetch", "decrypt", "translate", "generate", "score", "package", "sft", "merge", "compare", "status",
     "compose", "release_notes", "plots_page"],
)  # fmt: skip
def test_help_texts_are_whole_sentences(module, monkeypatch, capsys):
    """`python -m stages.<name> --help` describes the stage in whole sentences, never cut where the
    docstring's first line breaks."""
    mod = __import__(f"stages.{module}", fromlist=["main"])
    monkeypatch.setattr(sys, "argv", [f"stages.{module}", "--help"])
    with pytest.raises(SystemExit) as done:
        mod.main()
    assert done.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (and after hyphens)
    description = " ".join(mod.__doc__.strip().split("\n\n")[0].split())
    assert "".join(description.split()) in text, description
    assert description.rstrip(")").endswith((".", ":", "`")), description
