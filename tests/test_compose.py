"""stages.compose writing params.yaml: the overrides a file records are never dropped silently."""

from __future__ import annotations

import re
import sys

import pytest

from stages import compose
from stages.core.config.compose import check_params, compose_params
from stages.core.config.errors import PipelineError

TEMPERATURE = "models.gemma3.generate.sampling.temperature=0.7"


def _compose(monkeypatch, path, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["stages.compose", *args, "--out", str(path)])
    compose.main()


def test_composing_without_a_recorded_override_is_refused_and_names_it(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    _compose(monkeypatch, path, "profile=sample", TEMPERATURE)
    before = path.read_text(encoding="utf-8")
    with pytest.raises(PipelineError) as err:
        _compose(monkeypatch, path, "profile=sample")
    message = str(err.value)
    assert f"records overrides that this command drops:\n  {TEMPERATURE}\n" in message
    assert f"Keep them: `python -m stages.compose profile=sample {TEMPERATURE} --out {path}`" in message
    assert f"Drop them: `python -m stages.compose profile=sample --out {path} --drop-overrides`" in message
    assert "A lasting change belongs in conf/" in message
    assert path.read_text(encoding="utf-8") == before


def test_drop_overrides_writes_and_says_what_it_dropped(tmp_path, monkeypatch, capsys):
    path = tmp_path / "params.yaml"
    _compose(monkeypatch, path, "profile=sample", TEMPERATURE)
    _compose(monkeypatch, path, "--drop-overrides")  # `make params` after `make demo` and an experiment
    assert path.read_text(encoding="utf-8") == compose_params([])
    assert f"dropped the overrides {path} recorded: profile=sample {TEMPERATURE}" in capsys.readouterr().out


def test_repeating_the_recorded_overrides_is_fine_in_any_order_and_spelling(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    _compose(monkeypatch, path, "profile=sample", TEMPERATURE)
    _compose(monkeypatch, path, f"{TEMPERATURE}0", "translate.retries=4", "profile=sample")  # 0.70 is 0.7
    assert check_params(path) == [f"{TEMPERATURE}0", "translate.retries=4", "profile=sample"]


def test_a_changed_value_counts_as_dropped(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    _compose(monkeypatch, path, "profile=sample", TEMPERATURE)
    with pytest.raises(PipelineError, match=rf"{TEMPERATURE}  \(this command sets [^)]*temperature=0\.8\)"):
        _compose(monkeypatch, path, "profile=sample", "models.gemma3.generate.sampling.temperature=0.8")


def test_a_dvc_exp_run_file_records_the_overrides_check_params_derives(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text(compose_params(["profile=sample", TEMPERATURE]).split("\n", 1)[1], encoding="utf-8")
    with pytest.raises(PipelineError, match=rf"drops:\n  {TEMPERATURE}\nKeep them"):
        _compose(monkeypatch, path, "profile=sample")
    _compose(monkeypatch, path, "profile=sample", TEMPERATURE)


def test_a_file_whose_overrides_cannot_be_told_is_kept_unless_told(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [\n", encoding="utf-8")
    with pytest.raises(
        PipelineError, match=r"(?s)cannot tell which overrides .* is not YAML.*--drop-overrides"
    ):
        _compose(monkeypatch, path)
    assert path.read_text(encoding="utf-8") == "seed: [\n"
    _compose(monkeypatch, path, "--drop-overrides")
    assert check_params(path) == []


def test_a_stale_file_with_a_header_records_its_header_overrides(tmp_path, monkeypatch):
    """A conf/ change makes every written file stale; recomposing with its overrides is the fix."""
    path = tmp_path / "params.yaml"
    path.write_text(compose_params(["profile=sample"]).replace("seed: 20241024", "seed: 1"), encoding="utf-8")
    _compose(monkeypatch, path, "profile=sample")
    assert check_params(path) == ["profile=sample"]


def test_an_override_with_a_space_survives_the_header(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    overrides = [
        "profile=sample",
        "translate.deepl.source_lang=EN",
        "translate.deepl.glossary_id=my glossary",
    ]
    _compose(monkeypatch, path, *overrides)
    assert path.read_text(encoding="utf-8").startswith(
        "# Written by `python -m stages.compose profile=sample translate.deepl.source_lang=EN "
        "'translate.deepl.glossary_id=my glossary'`"
    )
    assert check_params(path) == overrides
    _compose(monkeypatch, path, *overrides)


SECRET = "hf_marker_9d2b71c5e0"


@pytest.mark.parametrize(
    "override",
    [
        "models.gemma2.release_name=${oc.env:HF_TOKEN}",
        "seed=${oc.env:HF_TOKEN}",
        "seed=${oc.decode:${oc.env:HF_TOKEN}}",
        "translate.sampling.temperature=${oc.env:HF_TOKEN,0.5}",
    ],
)
def test_an_override_that_reads_the_environment_is_refused_naming_its_key(tmp_path, monkeypatch, override):
    """Nothing of the environment reaches the git-tracked params.yaml, nor the error that refuses it."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.chdir(tmp_path)
    key = override.split("=")[0]
    with pytest.raises(
        PipelineError, match=rf"override {key}: an interpolation that calls a resolver"
    ) as err:
        compose_params([override])
    assert SECRET not in str(err.value)
    with pytest.raises(PipelineError, match=rf"override {key}:"):
        monkeypatch.setattr(sys, "argv", ["stages.compose", override])
        compose.main()
    assert not (tmp_path / "params.yaml").exists()


def test_a_conf_value_that_reads_the_environment_is_refused_naming_its_key(tmp_path, monkeypatch):
    import shutil

    from stages.core.config.compose import CONF_DIR

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    release = next((conf / "release").glob("*.yaml"))
    release.write_text(release.read_text() + "token_note: ${oc.env:HF_TOKEN}\n")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(PipelineError, match=r"conf/ key release\.token_note: an interpolation") as err:
        compose_params([], conf)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("value", [SECRET, "hf_other_value_123"])
def test_a_bad_value_from_the_environment_or_of_a_secret_key_is_never_echoed(monkeypatch, value):
    import yaml

    from stages.core.config.params import ParamsError, validate

    monkeypatch.setenv("SOME_TOKEN", SECRET)
    data = yaml.safe_load(compose_params([]))
    data["seed"] = value  # not an int: refused; the first from the environment, the second not
    with pytest.raises(ParamsError, match="seed") as err:
        validate(data)
    assert SECRET not in str(err.value)
    assert ("withheld" in str(err.value)) == (value == SECRET)
    data["seed"], data["engine"]["api_key_env"] = 0, ["not", "a", "name"]  # a key named like a secret
    with pytest.raises(ParamsError, match=r"engine\.api_key_env") as err:
        validate(data)
    assert "withheld" in str(err.value) and "not" not in str(err.value).split("api_key_env")[1]


@pytest.mark.parametrize("prompt", ["../../../../tmp/p", "/etc/passwd", "sub/judge", ".hidden"])
def test_a_prompt_path_outside_stages_prompts_is_refused(prompt):
    with pytest.raises(PipelineError, match=r"translate\.prompt: a prompt names a file of stages/prompts/"):
        compose_params([f"translate.prompt={prompt}"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("paths.response_cache=/tmp/elsewhere.sqlite", "paths.response_cache"),
        ("paths.release=../../outside", "paths.release"),
        ("paths.metrics=s3://bucket/metrics", "paths.metrics"),
        ("fetch.source.uri=/etc", "fetch.source.uri"),
        ("fetch.released.uri=../../../../tmp/released", "fetch.released.uri"),
        ("paths.checkpoint_store=/tmp/ckpt", "paths.checkpoint_store"),
    ],
)
def test_a_path_param_outside_the_repository_is_refused_naming_its_key(override, key):
    with pytest.raises(
        PipelineError, match=rf"{re.escape(key)}: .*(outside the repository|leaves the repository|not a URL)"
    ):
        compose_params([override])


@pytest.mark.parametrize(
    "override",
    [
        "fetch.source.uri=file:///mnt/lmsys-chat-1m",  # an explicit scheme: a location outside on purpose
        "fetch.source.uri=s3://bucket/lmsys-chat-1m",
        "paths.checkpoint_store=s3://bucket/checkpoints",
        "paths.checkpoint_store=file:///shared/checkpoints",
        "paths.release=data/release-v2",
    ],
)
def test_a_url_for_a_location_or_a_path_inside_is_accepted(override):
    compose_params([override])
