"""stages.compose writing params.yaml: the overrides a file records are never dropped silently."""

from __future__ import annotations

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
