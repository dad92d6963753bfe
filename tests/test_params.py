"""params.yaml: composition, validation and the published production configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stages.compose import check_params, compose_params
from stages.core.errors import PipelineError
from stages.core.params import ParamsError, load_params, validate

ROOT = Path(__file__).resolve().parent.parent


def test_params_yaml_equals_a_fresh_composition():
    assert check_params(ROOT / "params.yaml") == []  # the committed file: production, no overrides


def test_a_stale_params_yaml_names_the_command_that_refreshes_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(compose_params(["profile=sample"]).replace("seed: 20241024", "seed: 1"), encoding="utf-8")
    with pytest.raises(PipelineError, match=r"is stale: run `python -m stages.compose profile=sample`"):
        check_params(path)


def test_a_dvc_exp_run_composition_passes_and_its_overrides_are_named(tmp_path):
    """`dvc exp run -S` writes conf/'s composition without our header (OmegaConf.to_yaml)."""
    path = tmp_path / "params.yaml"
    overrides = ["profile=sample", "models.gemma3.generate.sampling.temperature=0.9", "translate.retries=3"]
    path.write_text(compose_params(overrides).split("\n", 1)[1], encoding="utf-8")
    assert check_params(path) == [
        "profile=sample",
        "models.gemma3.generate.sampling.temperature=0.9",
        "translate.retries=3",
    ]


def test_a_hand_edit_that_conf_cannot_compose_is_refused_by_key(tmp_path):
    data = yaml.safe_load(compose_params([]))
    data["models"]["gemma3"]["generate"]["temprature"] = 0.1
    del data["seed"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(
        PipelineError, match=r"keys conf/ lacks: models\.gemma3\.generate\.temprature; keys it lacks: seed"
    ):
        check_params(path)


def test_production_composition_is_the_published_release():
    params = validate(yaml.safe_load(compose_params([])))
    assert params.profile == "production"
    assert params.engine.backend == "vllm"
    assert params.fetch.source.uri == "hf://datasets/lmsys/lmsys-chat-1m"
    models = params.models
    assert set(models) == {"llama31", "gemma2", "gemma3"}
    expected = {
        "llama31": (
            "meta-llama/Llama-3.1-405B-Instruct-FP8",
            6,
            1,
            False,
            "meta-llama/Llama-3.1-70B-Instruct",
        ),
        "gemma2": ("google/gemma-2-27b-it", 6, 1, True, "google/gemma-2-27b-it"),
        "gemma3": ("google/gemma-3-27b-it", 10, 0, False, "google/gemma-3-27b-it"),
    }
    for name, (generator, n_ja, n_en, second_turn, judge) in expected.items():
        variant = models[name]
        assert variant.generate.llm.model == generator
        assert (variant.generate.n_ja, variant.generate.n_en) == (n_ja, n_en)
        assert (variant.second_turn is not None) == second_turn
        assert variant.score.llm.model == judge
    assert not models["gemma2"].generate.llm.system_role  # Gemma takes no system role


def test_sample_profile_uses_the_tiny_model_in_every_role():
    params = validate(yaml.safe_load(compose_params(["profile=sample"])))
    roles = [params.translate.llm] + [
        r for v in params.models.values() for r in (v.generate.llm, v.score.llm)
    ]
    assert {r.model for r in roles} == {"data/sample/tiny-chat"}
    assert params.engine.backend == "transformers"
    assert params.fetch.source.uri == "data/sample/lmsys-chat-1m"
    assert set(params.models) == {"llama31", "gemma2", "gemma3"}


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(compose_params(["profile=sample"]))
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_wrong_type_names_the_key(tmp_path):
    path = _write(tmp_path, lambda d: d["models"]["gemma3"]["generate"].update(n_ja="ten"))
    with pytest.raises(ParamsError, match=r"models\.gemma3\.generate\.n_ja: Input should be a valid integer"):
        load_params(path)


def test_unknown_key_names_the_key(tmp_path):
    path = _write(tmp_path, lambda d: d["models"]["gemma2"]["score"].update(temprature=0.1))
    with pytest.raises(
        ParamsError, match=r"models\.gemma2\.score\.temprature: Extra inputs are not permitted"
    ):
        load_params(path)


def test_bad_choice_lists_the_allowed_values(tmp_path):
    path = _write(tmp_path, lambda d: d["engine"].update(backend="tgi"))
    with pytest.raises(
        ParamsError, match=r"engine\.backend: Input should be 'transformers', 'vllm' or 'openai'"
    ):
        load_params(path)


def test_missing_params_file_says_how_to_write_it(tmp_path):
    with pytest.raises(ParamsError, match=r"python -m stages\.compose"):
        load_params(tmp_path / "params.yaml")


def test_compose_rejects_an_unknown_override():
    with pytest.raises(PipelineError, match=r"models\.gemma3\.generate\.n_jaa"):
        compose_params(["models.gemma3.generate.n_jaa=3"])


def test_secrets_never_appear_in_conf_or_params():
    texts = [p.read_text(encoding="utf-8") for p in (ROOT / "conf").rglob("*.yaml")]
    texts.append((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for text in texts:
        assert not re.search(r"(?i)(hf_[a-z0-9]{20,}|sk-[a-z0-9]{20,}|password\s*:|api_key\s*:)", text)


def test_a_release_config_refuses_a_model_without_a_pinned_revision():
    with pytest.raises(ParamsError, match=r"models.gemma3.score.llm.revision='main'.*google/gemma-3-27b-it"):
        compose_params(["models.gemma3.score.llm.revision=main"])
    data = yaml.safe_load(compose_params([]))  # a local model directory needs no Hub commit
    data["translate"]["llm"].update(model="data/sample/tiny-chat", revision=None)
    assert validate(data).translate.llm.revision is None


def test_every_production_model_fits_an_8x80gb_node_with_room_for_the_kv_cache():
    params = validate(yaml.safe_load(compose_params([])))
    for key, llm in params.llms().items():
        billions = float(re.search(r"(\d+)[bB]-", llm.model).group(1))
        fp8 = "FP8" in llm.model or llm.quantization == "fp8"
        per_gpu = billions * (1 if fp8 else 2) / llm.gpus  # GB of weights on each GPU
        assert llm.gpus <= 8, key
        assert per_gpu <= 0.9 * 80 - 15, f"{key}: {per_gpu:.0f} GB of weights per GPU leaves no KV cache"
        assert re.fullmatch(r"[0-9a-f]{40}", llm.revision), key
