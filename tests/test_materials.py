"""The publisher's materials: fetch takes the judge prompt file and the licence texts (the sample's own,
pinned), score judges with the judge prompt the release ships (`score.prompt: published`, read as
MT-Bench's format), a file of another shape stops fetch in one line with the fix, the card names the
prompt that scored the release and every release carries the licence texts."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.config.params import ParamsError, validate
from stages.core.rows.prompts import JudgePromptError, published_judge, read_judge_prompt
from stages.core.storage.source import ChecksumError
from tests.conftest import SAMPLE, run_stage, set_params

ROOT = Path(__file__).resolve().parent.parent

JUDGE = "materials/judge_prompt.jsonl"
LICENCES = [
    "GEMMA_TERMS_OF_USE.md",
    "LLAMA_3.1_ACCEPTABLE_USE_POLICY",
    "LLAMA_3.1_COMMUNITY_LICENSE_AGREEMENT",
    "Notice",
]
SYNTH = SAMPLE / "lmsys-chat-1m-synth"
VARIANT, SUBSET = "gemma3", "ja+unsafe"
MT_BENCH_KEYS = [
    "name",
    "type",
    "system_prompt",
    "prompt_template",
    "description",
    "category",
    "output_format",
]


def _entry(name: str, kind: str = "single", output: str = "[[rating]]", template: str | None = None) -> dict:
    template = template or "Rate it.\n[Question]\n{question}\n[Answer]\n{answer}"
    values = [name, kind, "You are a judge.", template, "d", "general", output]
    return dict(zip(MT_BENCH_KEYS, values, strict=True))


def _write(path: Path, *entries: dict) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return path


@pytest.fixture
def scored(workspace, monkeypatch, fake_engine):
    """gemma3 fetched, decrypted, translated, generated and judged on the sample (FakeEngine)."""
    run_stage(monkeypatch, "fetch")
    for stage in ("decrypt", "translate"):
        run_stage(monkeypatch, stage, SUBSET)
    for stage in ("generate", "score"):
        run_stage(monkeypatch, stage, VARIANT)
    return workspace


def _judge_requests(engine) -> list:
    return [r for r in engine.requests if any("impartial judge" in m["content"] for m in r.messages)]


def test_the_samples_materials_are_fetched_and_pinned(workspace, monkeypatch):
    params = yaml.safe_load((workspace / "params.yaml").read_text(encoding="utf-8"))
    pins = params["fetch"]["released"]["sha256"]
    for name in [JUDGE, *LICENCES]:
        assert pins[name] == hashlib.sha256((SYNTH / name).read_bytes()).hexdigest()
    assert all(params["models"][v]["score"]["prompt"] == "published" for v in params["models"])
    run_stage(monkeypatch, "fetch")
    listed = {
        f["path"]: f["sha256"]
        for f in json.loads((workspace / "data/raw/manifest.json").read_text())["released"]["files"]
    }
    assert {name: listed[name] for name in pins} == pins
    for name in pins:
        assert (workspace / "data/raw/released" / name).read_bytes() == (SYNTH / name).read_bytes()
    notice = workspace / "data/sample/lmsys-chat-1m-synth/Notice"
    notice.write_text(notice.read_text(encoding="utf-8") + "edited\n", encoding="utf-8")
    shutil.rmtree(workspace / "data/.cache/fetched")  # else the pinned copy kept by the first run serves
    with pytest.raises(ChecksumError, match=r"Notice: sha256 is [0-9a-f]{64} but params pin"):
        run_stage(monkeypatch, "fetch")


def test_the_sample_judge_prompt_file_is_mt_bench_shaped_and_written_for_this_project():
    lines = (SYNTH / JUDGE).read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    assert [list(e) for e in entries] == [MT_BENCH_KEYS] * len(entries)
    assert [e["name"] for e in entries] == ["single-v1", "pair-v2", "single-math-v1"]
    assert all("Written for lmsys-chat-1m-synth" in e["description"] for e in entries)
    for name in LICENCES:
        assert (
            (SYNTH / name)
            .read_text(encoding="utf-8")
            .startswith("Placeholder written for lmsys-chat-1m-synth")
        )


def test_score_with_published_renders_the_mt_bench_template(scored, fake_engine):
    single = json.loads((SYNTH / JUDGE).read_text(encoding="utf-8").splitlines()[0])
    requests = _judge_requests(fake_engine)
    assert requests
    for request in requests:
        system, user = request.messages
        assert system == {"role": "system", "content": single["system_prompt"]}
        assert user["role"] == "user" and user["content"].startswith("Please act as an impartial judge")
        question = re.search(r"\[Question\]\n(.*)\n\n\[The Start", user["content"], re.S)[1]
        answer = re.search(r"Answer\]\n(.*)\n\[The End", user["content"], re.S)[1]
        assert user["content"] == single["prompt_template"].format(question=question, answer=answer)
    assert "{" not in requests[0].messages[1]["content"].replace(answer, "")


def test_the_published_prompt_is_picked_by_name_type_and_output_format(tmp_path, caplog):
    path = tmp_path / "judge_prompt.jsonl"
    with caplog.at_level(logging.INFO, logger="stages.core.rows.prompts"):
        pair, math = (
            _entry("pair-v2", "pairwise", "[[A]]"),
            _entry("math", template="{question}{answer}{ref}"),
        )
        chosen = read_judge_prompt(
            _write(path, pair, math, _entry("mine"), _entry("single-v1"), _entry("later"))
        )
        assert chosen.name == "single-v1"
        assert chosen.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert read_judge_prompt(_write(path, pair, math, _entry("mine"), _entry("later"))).name == "mine"
    logged = [r.getMessage() for r in caplog.records]
    assert "judge prompt single-v1 of" in logged[0] and "taken by its name single-v1" in logged[0]
    assert "judge prompt mine of" in logged[1] and "the first that fits" in logged[1]


def test_the_published_prompt_renders_braces_as_mt_bench_does(tmp_path):
    entry = _entry("single-v1", template='Reply as {{"rating": k}}.\n{question}\n{answer}')
    chosen = read_judge_prompt(_write(tmp_path / "judge_prompt.jsonl", entry))
    system, user = chosen.messages("{x} に答えて", "答え: {y}")
    assert system == {"role": "system", "content": "You are a judge."}
    assert user["content"] == 'Reply as {"rating": k}.\n{x} に答えて\n答え: {y}'
    assert (
        read_judge_prompt(_write(tmp_path / "b.jsonl", entry | {"system_prompt": ""})).messages("q", "a")[0][
            "role"
        ]
        == "user"
    )  # no system message where the entry has none


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ('{"id": 1, "prompt": "Rate {answer}"}\n', "keys found: id, prompt; lacking (as text): name, type"),
        ('{"single-v1": {"prompt_template": "x"},\n "pair-v2": {}}\n', "keys found: pair-v2, single-v1"),
        ('["a", "b"]\n', "1 of 1 JSON values not objects, keys found: none"),
        ("name\tprompt\nsingle-v1\tRate it\n", "not JSON lines"),
        ("", "keys found: none"),
        (json.dumps(_entry("single-v1", "single", 10)) + "\n", "lacking (as text): output_format"),
    ],
)
def test_a_malformed_judge_prompt_file_stops_fetch_in_one_line_with_the_fix(
    workspace, monkeypatch, content, found
):
    (workspace / "data/sample/lmsys-chat-1m-synth" / JUDGE).write_text(content, encoding="utf-8")
    set_params(workspace, lambda d: d["fetch"]["released"]["sha256"].pop(JUDGE))
    with pytest.raises(JudgePromptError) as raised:
        run_stage(monkeypatch, "fetch")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"data/sample/lmsys-chat-1m-synth/{JUDGE}: not an MT-Bench judge prompt file")
    assert found in message
    keys = (
        "models.gemma2.score.prompt, models.gemma3.score.prompt, models.llama31.score.prompt"  # params' order
    )
    assert message.endswith(
        f"; set {keys} to judge-0to10 (our prompt, stages/prompts/judge-0to10.txt; conf/judge/)"
    )
    assert not (workspace / "data/raw/released").exists()  # all or nothing: nothing took its place


def test_a_file_without_a_single_answer_prompt_stops_fetch_naming_its_prompts(workspace, monkeypatch):
    path = workspace / "data/sample/lmsys-chat-1m-synth" / JUDGE
    _write(
        path,
        _entry("pair-v2", "pairwise", "[[A]]"),
        _entry("math", template="{question}{answer}{ref_answer_1}"),
    )
    set_params(workspace, lambda d: d["fetch"]["released"]["sha256"].pop(JUDGE))
    with pytest.raises(JudgePromptError) as raised:
        run_stage(monkeypatch, "fetch")
    assert (
        "no single-answer prompt (type single, output_format [[rating]], a prompt_template taking {question} "
        "and {answer} only) among its 2: pair-v2 (type pairwise, [[A]], fields answer, question); math (type "
        "single, [[rating]], fields answer, question, ref_answer_1); set models.gemma2.score.prompt"
    ) in str(raised.value)


def test_fetch_without_the_judge_prompt_file_names_the_include_and_the_fix(workspace, monkeypatch):
    def drop(d):
        d["fetch"]["released"]["include"].remove(JUDGE)
        d["fetch"]["released"]["sha256"].pop(JUDGE)

    set_params(workspace, drop)
    with pytest.raises(JudgePromptError) as raised:
        run_stage(monkeypatch, "fetch")
    assert (
        "took no materials/judge_prompt.jsonl from data/sample/lmsys-chat-1m-synth: add it to "
        "fetch.released.include (conf/source/), or set models.gemma2.score.prompt"
    ) in str(raised.value)


def test_with_our_prompt_fetch_does_not_read_the_judge_prompt_file(workspace, monkeypatch):
    (workspace / "data/sample/lmsys-chat-1m-synth" / JUDGE).write_text("not json\n", encoding="utf-8")

    def ours(d):
        d["fetch"]["released"]["sha256"].pop(JUDGE)
        for variant in d["models"].values():
            variant["score"]["prompt"] = "judge-0to10"

    set_params(workspace, ours)
    run_stage(monkeypatch, "fetch")
    assert (workspace / "data/raw/released" / JUDGE).read_text(encoding="utf-8") == "not json\n"


def test_score_without_the_fetched_judge_prompt_says_how_to_get_it(tmp_path):
    with pytest.raises(JudgePromptError, match=r"judge_prompt\.jsonl does not exist: run `dvc repro fetch`"):
        published_judge(tmp_path)


def test_the_judge_prompt_text_enters_the_resume_key(scored, monkeypatch, fake_engine):
    judged = len(_judge_requests(fake_engine))
    run_stage(monkeypatch, "score", VARIANT)
    assert len(_judge_requests(fake_engine)) == judged  # the same file: every shard reused
    path = scored / "data/raw/released" / JUDGE
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    entries[0]["prompt_template"] = entries[0]["prompt_template"].replace(
        "impartial judge", "impartial, strict judge"
    )
    _write(path, *entries)
    before = len(fake_engine.requests)
    run_stage(monkeypatch, "score", VARIANT)
    again = fake_engine.requests[before:]
    assert len(again) == judged  # the cache key holds the messages: every response judged again
    assert all("impartial, strict judge" in r.messages[1]["content"] for r in again)


def test_the_card_names_the_prompt_and_the_release_holds_the_licence_texts(scored, monkeypatch):
    run_stage(monkeypatch, "package", VARIANT)
    release = scored / "data/release" / VARIANT
    sha256 = hashlib.sha256((SYNTH / JUDGE).read_bytes()).hexdigest()
    manifest = json.loads((release / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["provenance"]["judge_prompt"] == {
        "setting": "published",
        "name": "single-v1",
        "file": JUDGE,
        "uri": "data/sample/lmsys-chat-1m-synth",
        "revision": None,
        "sha256": sha256,
    }
    card = (release / "README.md").read_text(encoding="utf-8")
    assert (
        f"Judge prompt: `single-v1` from `{JUDGE}` of `data/sample/lmsys-chat-1m-synth` (the publisher's), "
        f"sha256 `{sha256}` (`score.prompt: published`)."
    ) in card
    for name in LICENCES:
        assert (release / name).read_bytes() == (SYNTH / name).read_bytes()
        assert manifest["files"][name] == {
            "sha256": hashlib.sha256((SYNTH / name).read_bytes()).hexdigest(),
            "size": (SYNTH / name).stat().st_size,
        }
        terms = "a licence text, copied unchanged from the published repository (its own terms)"
        assert f"| `{name}` | {terms} |" in card
    assert "copied unchanged beside these files: `GEMMA_TERMS_OF_USE.md`, `LLAMA_3.1_ACCEPTABLE" in card
    # every publisher's file fetched beside the encrypted instructions, by sha256 (not the dataset/ files)
    fetched = sorted(
        p.relative_to(SYNTH).as_posix() for p in SYNTH.rglob("*") if p.is_file() and "dataset" not in p.parts
    )
    materials = manifest["provenance"]["published_materials"]
    assert sorted(materials) == fetched and JUDGE in fetched and "Notice" in fetched
    for path, sha in materials.items():
        assert sha == hashlib.sha256((SYNTH / path).read_bytes()).hexdigest()
        assert f"| publisher's `{path}` (at the released revision) | sha256 `{sha}` |" in card


def test_the_card_names_our_prompt_with_its_file(scored, monkeypatch):
    set_params(scored, lambda d: d["models"][VARIANT]["score"].update(prompt="judge-0to10"))
    run_stage(monkeypatch, "score", VARIANT)
    run_stage(monkeypatch, "package", VARIANT)
    card = (scored / "data/release" / VARIANT / "README.md").read_text(encoding="utf-8")
    sha256 = hashlib.sha256((ROOT / "stages/prompts/judge-0to10.txt").read_bytes()).hexdigest()
    ours = "Judge prompt: `judge-0to10` from `stages/prompts/judge-0to10.txt` (this project's)"
    assert f"{ours}, sha256 `{sha256}` (`score.prompt: judge-0to10`)." in card


@pytest.mark.parametrize("profile", ["production", "sample"])
def test_every_profile_judges_with_the_published_prompt_and_fetches_it(profile):
    data = yaml.safe_load(compose_params([f"profile={profile}"]))
    assert {v["score"]["prompt"] for v in data["models"].values()} == {"published"}
    assert {JUDGE, "LLAMA_3.1_COMMUNITY_LICENSE_AGREEMENT", "Notice", "GEMMA_TERMS_OF_USE.md"} <= set(
        data["fetch"]["released"]["include"]
    )
    if profile == "production":
        assert (
            data["fetch"]["released"]["sha256"] == {}
        )  # unknown offline: pinned from data/raw/manifest.json
    data["models"]["gemma3"]["score"]["prompt"] = "../judge"
    with pytest.raises(
        ParamsError, match=r"score\.prompt: the judge prompt is 'published' .* or names a file"
    ):
        validate(data)
