"""Errors for people: an expected failure prints a few lines naming the key or file and the fix,
exits with status 2, and shows no traceback unless LMSYS_SYNTH_TRACEBACK=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import set_params

ROOT = Path(__file__).resolve().parent.parent


def _run(workspace: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(workspace / "hf"), **env}
    environ.pop("HF_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=workspace, env=environ, capture_output=True, text=True
    )


def _plain(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 8, done.stderr
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
