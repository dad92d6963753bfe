"""params.yaml: composition, validation and the published production configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.core.config.compose import HEADER, check_params, compose_params
from stages.core.config.errors import PipelineError
from stages.core.config.params import ParamsError, load_params, validate

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_HEADER = HEADER.format(args="")


def _published_params(root: Path, tmp_path: Path) -> Path:
    """The params.yaml a commit of `root` publishes: the working file when it is the production
    composition (a conf/ change composed for the next commit), else git's committed copy; the working
    file where git is unavailable or params.yaml is not committed."""
    working = root / "params.yaml"
    if working.read_text(encoding="utf-8").startswith(PRODUCTION_HEADER):
        return working
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "cat-file", "blob", "HEAD:./params.yaml"],
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:  # no git
        return working
    if done.returncode != 0:  # not a git checkout, or params.yaml untracked
        return working
    committed = tmp_path / "HEAD" / "params.yaml"
    committed.parent.mkdir(exist_ok=True)
    committed.write_bytes(done.stdout)
    return committed


def test_the_committed_params_yaml_equals_a_fresh_production_composition(tmp_path):
    """The params.yaml that git holds (HEAD's) equals a fresh composition of conf/ with no overrides.

    `make demo` leaves the sample composition in the working file, which `dvc repro`, `dvc status`
    and `dvc metrics show` of its outputs need, so the committed copy is checked; the working file is
    checked instead once it is the production composition again, and where git is unavailable.
    """
    assert check_params(_published_params(ROOT, tmp_path)) == []


def test_the_working_params_yaml_is_a_composition_of_conf():
    """Whatever overrides it records (`profile=sample` after `make demo`), it is their fresh composition."""
    check_params(ROOT / "params.yaml")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_after_the_demo_the_committed_copy_is_checked_and_the_sample_one_passes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    params = repo / "params.yaml"

    def git(*args: str) -> None:
        config = ["-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
        subprocess.run(["git", "-C", str(repo), *config, *args], check=True, capture_output=True)

    git("init", "-q")
    params.write_text(compose_params(["profile=sample"]), encoding="utf-8")
    assert _published_params(repo, tmp_path) == params  # untracked: the working file
    params.write_text(compose_params([]), encoding="utf-8")
    git("add", "params.yaml")
    git("commit", "-q", "--no-verify", "-m", "production")
    params.write_text(compose_params(["profile=sample"]), encoding="utf-8")  # what `make demo` leaves
    assert check_params(params) == ["profile=sample"]
    published = _published_params(repo, tmp_path)
    assert published != params
    assert check_params(published) == []
    params.write_text(compose_params([]), encoding="utf-8")  # `make params`
    assert _published_params(repo, tmp_path) == params


def test_a_stale_params_yaml_names_the_command_that_refreshes_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(compose_params(["profile=sample"]).replace("seed: 20241024", "seed: 1"), encoding="utf-8")
    with pytest.raises(
        PipelineError, match=r"is stale or edited by hand: run `python -m stages.compose profile=sample`"
    ):
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


@pytest.mark.parametrize("name", ["../../outside", "a/b", ".hidden", ""])
def test_a_release_name_that_would_leave_its_directory_is_refused(name):
    from stages.core.config.params import ParamsError, validate

    data = yaml.safe_load(compose_params(["profile=sample"]))
    data["models"]["gemma2"]["release_name"] = name
    with pytest.raises(ParamsError, match=r"models\.gemma2\.release_name: String should match pattern"):
        validate(data, Path("params.yaml"))


def test_a_new_variant_copied_from_gemma3_is_refused_before_any_gpu_work_naming_compare_false():
    """docs/configuration.md's new variant, left at gemma3.yaml's compare: true: the params check (the
    `params` stage, before generate asks anything) refuses it, naming the key and the switch."""
    data = yaml.safe_load(compose_params([]))
    data["models"]["mine"] = {**data["models"]["gemma3"], "release_name": "mine"}
    data["decrypt"]["subsets"] = sorted({v["subset"] for v in data["models"].values()})
    with pytest.raises(ParamsError) as err:
        validate(data)
    message = str(err.value)
    assert "models.mine.compare" in message and "release_name 'mine'" in message
    assert "gemma2, gemma3, llama3.1" in message
    assert "models.mine.annotations" in message  # gemma3.yaml's annotations: published, named too
    assert (
        "set `compare: false` and `annotations: ours` (and generate.source: engine) in conf/model/mine.yaml"
        in message
    )
    data["models"]["mine"]["compare"] = False
    with pytest.raises(ParamsError, match=r"models\.mine\.annotations: .* no file for release_name 'mine'"):
        validate(data)
    data["models"]["mine"]["annotations"] = "ours"
    assert validate(data).models["mine"].compare is False
    data["models"]["mine"]["generate"] = {**data["models"]["mine"]["generate"], "source": "published"}
    with pytest.raises(ParamsError, match=r"models\.mine\.generate\.source: .* release_name 'mine'"):
        validate(data)
