"""Resume keys: runtime knobs are out, code and inputs are in, and dvc.yaml lists every module a
stage imports."""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.config.engine_params import EngineParams, LLMSpec
from stages.core.storage.resume import closure, code_digest, code_meaning, input_digest, recipe
from tests.conftest import run_stage, set_params

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_drops_runtime_knobs():
    engine = EngineParams(backend="openai", batch_size=7, base_url="http://h:1/v1", max_concurrency=3)
    assert recipe(engine) == {"backend": "openai"}
    llm = recipe(LLMSpec(model="m", revision="r" * 40, tensor_parallel_size=8, max_model_len=8192))
    assert "tensor_parallel_size" not in llm and llm["max_model_len"] == 8192 and llm["revision"] == "r" * 40


def test_module_level_closure_leaves_engine_backends_to_the_engine_identity():
    eager, lazy = closure("stages.generate"), closure("stages.generate", lazy=True)
    assert {"stages.core.engines.base", "stages.core.storage.resume", "stages.core.runtime.shards"} <= set(
        eager
    )
    assert "stages.core.engines.vllm" not in eager and "stages.core.engines.vllm" in lazy
    assert "stages.core.rows.judge" in closure("stages.score") and "stages.core.rows.judge" not in eager


def test_code_digest_sees_an_edit_in_an_imported_module_only(tmp_path):
    copy = tmp_path / "stages"
    shutil.copytree(ROOT / "stages", copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = {m: code_digest(m, root=copy) for m in ("stages.score", "stages.generate")}
    judge = copy / "core" / "rows" / "judge.py"
    judge.write_text(judge.read_text().replace("MAX_SCORE = 10.0", "MAX_SCORE = 10.0 + 0"))
    after = {m: code_digest(m, root=copy) for m in ("stages.score", "stages.generate")}
    assert after["stages.score"] != before["stages.score"]
    assert after["stages.generate"] == before["stages.generate"]  # generate does not import the judge


ENTRIES = (
    "stages.generate",
    "stages.score",
    "stages.core.runtime.translator",
    "stages.core.runtime.deepl_translate",
)


def _edit_comments_and_docstrings(root: Path) -> int:
    """Add a comment line to every module under `root` and reword each module docstring; return
    the number of modules edited."""
    files = sorted(root.rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        if ast.get_docstring(tree, clean=False) is not None:
            first = tree.body[0].value
            quote = text[first.col_offset : first.col_offset + 3] if first.lineno == 1 else '"""'
            text = text.replace(quote, f"{quote}Reworded. ", 1)
        path.write_text(f"# a comment-only edit\n{text}\n# and one at the end\n", encoding="utf-8")
    return len(files)


def test_comment_and_docstring_edits_to_every_module_keep_every_code_digest(tmp_path):
    copy = tmp_path / "stages"
    shutil.copytree(ROOT / "stages", copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = {m: code_digest(m, root=copy) for m in ENTRIES}
    assert _edit_comments_and_docstrings(copy) >= 40
    assert (copy / "core" / "rows" / "judge.py").read_text(encoding="utf-8") != (
        ROOT / "stages/core/rows/judge.py"
    ).read_text(encoding="utf-8")
    assert {m: code_digest(m, root=copy) for m in ENTRIES} == before
    judge = copy / "core" / "rows" / "judge.py"
    judge.write_text(judge.read_text().replace("MAX_SCORE = 10.0", "MAX_SCORE = 9.0"))
    assert code_digest("stages.score", root=copy) != before["stages.score"]


def test_an_engine_s_identity_sees_its_code_not_its_comments(tmp_path):
    from stages.core.engines import make_engine

    engine = make_engine(LLMSpec(model="m"), EngineParams(backend="openai", batch_size=1))
    source = Path(inspect.getfile(type(engine)))
    copy = tmp_path / source.name
    copy.write_text("# a comment\n" + source.read_text(encoding="utf-8").replace('"""', '"""Reworded. ', 1))
    assert code_meaning(copy) == code_meaning(source) == engine.identity()["code"]
    copy.write_text(source.read_text(encoding="utf-8") + "\nEXTRA = 1\n")
    assert code_meaning(copy) != engine.identity()["code"]


def test_a_comment_edit_everywhere_reuses_every_checkpoint_without_the_cache(
    scored, monkeypatch, fake_engine, tmp_path
):
    """The DVC stages re-run (their code deps changed), and find every shard checkpointed: with the
    response cache off, not one request is sent and the outs are the same bytes."""
    outs = [scored / "data/generated/gemma3.parquet", scored / "data/scored/gemma3.parquet"]
    before = [p.read_bytes() for p in outs]
    copy = tmp_path / "stages"
    shutil.copytree(ROOT / "stages", copy, ignore=shutil.ignore_patterns("__pycache__"))
    _edit_comments_and_docstrings(copy)
    monkeypatch.setattr("stages.core.storage.meaning.PACKAGE_DIR", copy)
    set_params(scored, lambda d: d["engine"].update(cache="off"))
    assert _rerun(monkeypatch, fake_engine, "generate", "score") == []
    assert [p.read_bytes() for p in outs] == before


def test_input_digest_is_the_content_not_the_chunking():
    rows = {"conversation_id": ["a", "b", "c"], "responses": [[{"content": "x"}], None, []]}
    one = pa.table(rows)
    chunked = pa.concat_tables([one.slice(0, 1), one.slice(1, 2)])
    assert chunked["conversation_id"].num_chunks == 2
    assert input_digest(one) == input_digest(chunked)
    rows["responses"][2] = [{"content": "y"}]
    assert input_digest(pa.table(rows)) != input_digest(one)


def _runs_nothing(path: Path) -> bool:
    """A module holding only a docstring (the package markers): no dep can change a row through it."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _covered(path: str, deps: list[str]) -> bool:
    if _runs_nothing(ROOT / path):
        return True
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_dvc_yaml_lists_every_module_each_stage_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    missing = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        entry = re.search(r"python -m (stages\.\w+)", stage["cmd"])[1]
        deps = stage["deps"]
        files = [p.relative_to(ROOT).as_posix() for p in closure(entry, lazy=True).values()]
        missing[name] = [f for f in files if not _covered(f, deps)]
        texts = [(ROOT / f).read_text(encoding="utf-8") for f in files if not f.endswith("prompts.py")]
        renders = any(re.search(r"\b(user_turn|template)\(", text) for text in texts)
        if renders and not any(d == "stages/prompts" or d.startswith("stages/prompts/") for d in deps):
            missing[name].append("stages/prompts")  # the prompt files it renders
    assert missing == {name: [] for name in stages}


def test_dvc_yaml_code_deps_are_the_ones_the_imports_give():
    """dvc.yaml's code deps are generated (scripts/code_deps.py): a new import that reaches another
    layer fails here until `python -m scripts.code_deps` is run; fetch and decrypt reach no engine."""
    from scripts.code_deps import DVC_YAML, code_deps, rewritten

    text = DVC_YAML.read_text(encoding="utf-8")
    assert rewritten(text) == (text, []), "run python -m scripts.code_deps"
    for entry in ("stages.fetch", "stages.decrypt"):
        assert not {"stages/core", "stages/core/engines", "stages/core/release"} & set(code_deps(entry))


# The contract, stage by stage, with the FakeEngine: what makes requests happen and what does not.


@pytest.fixture
def scored(workspace, monkeypatch, fake_engine):
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    for stage in ("generate", "score"):
        run_stage(monkeypatch, stage, "gemma3")
    return workspace


def _rerun(monkeypatch, fake_engine, *stages: str) -> list:
    """Run the gemma3 stages again; return the requests they made."""
    before = len(fake_engine.requests)
    for stage in stages:
        run_stage(monkeypatch, stage, "gemma3")
    return fake_engine.requests[before:]


def test_runtime_knobs_reuse_every_finished_shard(scored, monkeypatch, fake_engine):
    def tune(d):
        d["engine"].update(batch_size=1, max_concurrency=2, base_url="http://10.0.0.9/v1", max_retries=9)
        d["engine"].update(gpu_memory_utilization=0.5, request_timeout=5.0)
        for role in ("generate", "score"):
            d["models"]["gemma3"][role]["llm"]["tensor_parallel_size"] = 4

    set_params(scored, tune)
    assert _rerun(monkeypatch, fake_engine, "generate", "score") == []


def test_an_upstream_edit_generate_does_not_read_reuses_every_response(scored, monkeypatch, fake_engine):
    before = (scored / "data/generated/gemma3.parquet").read_bytes()
    set_params(
        scored,
        lambda d: d["translate"]["templates"].insert(0, {"category": "greeting", "patterns": ["(?i)^hello"]}),
    )
    run_stage(monkeypatch, "translate")
    assert (
        "greeting"
        in pq.read_table(scored / "data/private/translated-ja.parquet")["is_template_instruction"].to_pylist()
    )
    assert _rerun(monkeypatch, fake_engine, "generate") == []
    assert (scored / "data/generated/gemma3.parquet").read_bytes() == before


def test_a_judge_prompt_edit_rescores(scored, monkeypatch, fake_engine, tmp_path):
    # the sample judges with its published prompt (the edit of that file: tests/test_materials.py); ours
    set_params(scored, lambda d: d["models"]["gemma3"]["score"].update(prompt="judge-0to10"))
    _rerun(monkeypatch, fake_engine, "score")
    assert _rerun(monkeypatch, fake_engine, "generate", "score") == []
    prompts = tmp_path / "prompts"
    shutil.copytree(ROOT / "stages" / "prompts", prompts)
    judge = prompts / "judge-0to10.txt"
    judge.write_text(judge.read_text(encoding="utf-8").replace("impartial judge", "impartial, strict judge"))
    monkeypatch.setattr("stages.core.rows.prompts.PROMPT_DIR", prompts)
    judged = _rerun(monkeypatch, fake_engine, "generate", "score")
    responses = sum(
        len(r or [])
        for r in pq.read_table(scored / "data/generated/gemma3.parquet")["responses_ja"].to_pylist()
    )
    assert len(judged) == responses > 0  # generate made none; every response was judged again
    assert all("impartial, strict judge" in r.messages[-1]["content"] for r in judged)


def test_a_code_fix_in_the_judge_rescores(scored, monkeypatch, fake_engine, tmp_path):
    copy = tmp_path / "stages"
    shutil.copytree(ROOT / "stages", copy, ignore=shutil.ignore_patterns("__pycache__"))
    judge = copy / "core" / "rows" / "judge.py"
    judge.write_text(judge.read_text(encoding="utf-8") + "\nFIXED = 1\n", encoding="utf-8")  # a code change
    monkeypatch.setattr("stages.core.storage.meaning.PACKAGE_DIR", copy)
    shards = scored / "data/.checkpoints/score@gemma3"
    before = {p.name for p in shards.iterdir()}
    # the judge's requests did not change: its shards are rebuilt from the cached judgements
    assert _rerun(monkeypatch, fake_engine, "generate", "score") == []
    assert {p.name for p in shards.iterdir()} != before
    judge.write_text(judge.read_text(encoding="utf-8") + "FIXED = 2\n", encoding="utf-8")
    set_params(scored, lambda d: d["engine"].update(cache="off"))  # without the cache, they are asked again
    requests = _rerun(monkeypatch, fake_engine, "generate", "score")
    assert requests and all("impartial judge" in r.messages[-1]["content"] for r in requests)


def test_a_new_model_revision_regenerates(scored, monkeypatch, fake_engine):
    set_params(scored, lambda d: d["models"]["gemma3"]["generate"]["llm"].update(revision="a" * 40))
    assert _rerun(monkeypatch, fake_engine, "generate")


def test_a_new_engine_version_regenerates(scored, monkeypatch, fake_engine):
    monkeypatch.setattr(type(fake_engine), "LIBRARIES", ("pyarrow",))
    assert _rerun(monkeypatch, fake_engine, "generate")


SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")  # README's and pyproject's (tests/test_docs.py)


def _interpreters() -> list[str]:
    """Every supported Python on this machine other than this one (pyenv's, or on PATH)."""
    import glob

    found = {}
    for minor in SUPPORTED_PYTHONS:
        candidates = [
            shutil.which(f"python{minor}"),
            *sorted(glob.glob(f"/root/.pyenv/versions/{minor}*/bin/python")),
        ]
        for path in filter(None, candidates):
            probe = subprocess.run(
                [path, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True
            )
            if probe.returncode == 0:
                found[minor] = path
                break
    return sorted(found.values())


def test_the_code_digest_is_the_same_under_every_supported_python():
    """Checkpoints travel between hosts: the code digest of every stage entry (standard library only,
    stages/core/storage/meaning.py) is computed under each of 3.11, 3.12 and 3.13 found here."""
    script = (
        "import json, sys; from stages.core.storage.meaning import code_digest; "
        "print(json.dumps({m: code_digest(m) for m in sys.argv[1:]}))"
    )
    entries = [f"stages.{p.stem}" for p in sorted((ROOT / "stages").glob("*.py")) if p.stem != "__init__"]
    digests = {}
    for python in _interpreters():
        out = subprocess.run([python, "-c", script, *entries], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        version = subprocess.run([python, "--version"], capture_output=True, text=True).stdout.strip()
        digests[version] = json.loads(out.stdout)
    if len(digests) < 2:
        pytest.skip(f"one supported Python here: {sorted(digests)}")
    first = next(iter(digests.values()))
    assert all(found == first for found in digests.values()), sorted(digests)
