"""sft: the SFT files of the sample's Gemma-2 release, row by row, a licensee's rebuild of them
from the public files and the decrypted instructions, and the best response taken as score stored
it on a published-shaped file with tied top scores."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.config.errors import PipelineError, SourceError
from stages.core.config.params import ParamsError, load_params, validate
from stages.core.config.release_params import SftOption
from stages.core.rows import sft
from stages.core.rows.scores import best_index
from stages.core.storage.crypto import decrypt_file, derive_key
from stages.core.storage.jsonl import read_jsonl_gz, write_jsonl_gz
from tests.conftest import SAMPLE, FakeEngine, run_stage

ROOT = Path(__file__).resolve().parent.parent
STEM = "gemma2-lmsys-chat-1m-synth-ja+en"
ENCRYPTED = "lmsys-chat-1m-first-turn-user-instructions-ja.jsonl.gz.gpg"
JA, JA_WO = "lmsys-chat-1m-synth-ja", "lmsys-chat-1m-synth-ja-wo-pii-and-template-instructions"
MIN_8 = "lmsys-chat-1m-synth-ja-min-score-8-wo-pii-and-template-instructions"
EN_WO = "lmsys-chat-1m-synth-en-wo-pii-and-template-instructions"
TWO_TURN = "lmsys-chat-1m-synth-ja-gemma2-2turn-wo-pii-and-template-instructions"  # Swallow v0.3's
GEMMA2_SETS = [JA, JA_WO, MIN_8, EN_WO, TWO_TURN]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The sample run through package@gemma2 and sft@gemma2 (FakeEngine), in a workspace of its own."""
    ws = tmp_path_factory.mktemp("sft")
    shutil.copytree(SAMPLE, ws / "data" / "sample")
    (ws / "params.yaml").write_text(compose_params(["profile=sample"]), encoding="utf-8")
    engine = FakeEngine()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setattr("stages.core.runtime.executors.make_engine", lambda llm, options: engine)
        for stage in ("fetch", "decrypt", "translate"):
            run_stage(mp, stage)
        for stage in ("generate", "score", "package", "sft"):
            run_stage(mp, stage, "gemma2")
    return ws


def _lines(path: Path) -> list[dict]:
    return list(read_jsonl_gz(path))


def _expected(ws: Path, option: SftOption) -> list[dict]:
    """The conversations an option set must give, worked out from the release, the translated table
    and score's out (its best_index: the best response is the one score stored, never recomputed)."""
    users = {
        r["conversation_id"]: r for r in pq.read_table(ws / "data/private/translated-ja.parquet").to_pylist()
    }
    picks = {  # score's best_index
        r["conversation_id"]: r["best_index"]
        for r in pq.read_table(ws / "data/scored/gemma2.parquet").to_pylist()
    }
    found = []
    for record in pq.read_table(ws / f"data/release/gemma2/{STEM}.parquet").to_pylist():
        user = users[record["conversation_id"]]
        if (option.exclude_template and record["is_template_instruction"]) or (
            option.exclude_redacted and user["redacted"]
        ):
            continue
        if option.language == "en":
            if record["synthesized_assistant_responses_en"]:
                answer = record["synthesized_assistant_responses_en"][0]
                found.append([{"role": "user", "content": user["instruction"]}, answer])
            continue
        notes = record["synthesized_response_scoring_annotations"]
        scores = [n["preference_score"] for n in notes or []]
        if not any(s >= 0 for s in scores):
            continue
        best = picks[record["conversation_id"]]
        if option.min_score is not None and scores[best] < option.min_score:
            continue
        turns = [{"role": "user", "content": user["instruction_ja"]}]
        if option.turns == 2:
            if not record["synthesized_multiturn_conversation"]:
                continue
            (stored,) = record["synthesized_multiturn_conversation"]
            turns += stored
        else:
            turns.append(record["synthesized_assistant_responses"][best])
        found.append(turns)
    return [{option.output_key: turns} for turns in found]


def test_sft_files_row_by_row_on_the_sample(built: Path):
    params = load_params(built / "params.yaml")
    out = built / "data/sft/gemma2"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.jsonl.gz" for name in GEMMA2_SETS)
    metrics = json.loads((built / "data/metrics/sft-gemma2.json").read_text())
    assert metrics["rows_in"] == 313  # the release's records (314 translated, 1 failed translation)
    for name in GEMMA2_SETS:
        lines = _lines(out / f"{name}.jsonl.gz")
        assert lines == _expected(built, params.sft[name]), name
        counts = metrics["sets"][name]
        assert counts["written"] == len(lines) and counts["written"] + sum(counts["skipped"].values()) == 313
    skipped = {name: metrics["sets"][name]["skipped"] for name in GEMMA2_SETS}
    assert skipped[JA]["template"] == skipped[JA]["redacted"] == 0
    assert skipped[JA_WO]["template"] > 0
    assert skipped[JA_WO]["redacted"] > 0
    assert skipped[MIN_8]["below_min_score"] > 0
    assert skipped[JA]["no_responses"] > 0  # empty, duplicate and too-long instructions
    multiturn = _lines(out / f"{TWO_TURN}.jsonl.gz")
    shapes = Counter(tuple(t["role"] for t in line["conversation"]) for line in multiturn)
    assert set(shapes) == {("user", "assistant", "user", "assistant"), ("user", "assistant")}
    # single-turn entries are one-turn conversations: as many as the best-response set keeps
    assert len(multiturn) == len(_lines(out / f"{JA_WO}.jsonl.gz"))
    assert shapes[("user", "assistant")] > shapes[("user", "assistant", "user", "assistant")] > 0
    first = gzip.decompress((out / f"{JA}.jsonl.gz").read_bytes()).split(b"\n")[0]
    assert first.startswith(b'{"conversation":[{"role":"user","content":"')  # the default output_key


def test_best_response_is_not_always_the_first(built: Path):
    """The sample's scores pick a later response for some instructions: selection is exercised."""
    records = pq.read_table(built / f"data/release/gemma2/{STEM}.parquet").to_pylist()
    picks = [
        best_index([n["preference_score"] for n in r["synthesized_response_scoring_annotations"]])
        for r in records
        if r["synthesized_response_scoring_annotations"]
    ]
    assert len(set(picks)) > 2


def _decrypted(ws: Path, dst: Path) -> Path:
    """The release's instructions, decrypted as a licensee does (in the workspace: its params.yaml)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        params = load_params()
        decrypt_file(
            f"data/release/gemma2/{ENCRYPTED}",
            dst,
            derive_key(params.paths.source, params.decrypt.key, released_root=params.paths.released),
        )
    return dst


def _licensee(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "stages.sft", "gemma2", *args]
    return subprocess.run(command, cwd=ws, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("public", ["parquet", "jsonl.gz"])
def test_a_licensee_rebuilds_the_same_files_from_the_public_release(built: Path, tmp_path: Path, public):
    release = tmp_path / "release"  # one public records file only, as a licensee downloads it
    release.mkdir()
    shutil.copy(built / f"data/release/gemma2/{STEM}.{public}", release)
    plain = _decrypted(built, tmp_path / "lmsys-chat-1m-first-turn-user-instructions-ja.jsonl.gz")
    done = _licensee(
        built,
        *("--release-dir", str(release), "--instructions", str(plain)),
        *("--lmsys", str(built / "data/raw/lmsys-chat-1m"), "--out", str(tmp_path / "sft")),
    )
    assert done.returncode == 0, done.stderr
    for name in GEMMA2_SETS:
        rebuilt = (tmp_path / "sft" / f"{name}.jsonl.gz").read_bytes()
        assert rebuilt == (built / "data/sft/gemma2" / f"{name}.jsonl.gz").read_bytes(), name


def test_without_lmsys_a_licensee_gets_the_japanese_sets_that_need_no_redacted_flag(
    built: Path, tmp_path: Path
):
    plain = _decrypted(built, tmp_path / "instructions.jsonl.gz")
    done = _licensee(built, "--instructions", str(plain), "--out", str(tmp_path / "sft"))
    assert done.returncode == 2
    assert f"'{EN_WO}'" in done.stderr and "pass --lmsys DIR" in done.stderr
    assert not (tmp_path / "sft").exists()
    done = _licensee(built, "--instructions", str(plain), "--set", JA, "--out", str(tmp_path / "sft"))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "sft").iterdir()] == [f"{JA}.jsonl.gz"]
    assert (tmp_path / f"sft/{JA}.jsonl.gz").read_bytes() == (
        built / f"data/sft/gemma2/{JA}.jsonl.gz"
    ).read_bytes()


def test_instructions_of_another_release_are_refused(built: Path, tmp_path: Path):
    rows = list(read_jsonl_gz(_decrypted(built, tmp_path / "plain.jsonl.gz")))
    other = tmp_path / "other.jsonl.gz"
    write_jsonl_gz(rows[:10] + rows[11:], other)  # one conversation missing
    done = _licensee(built, "--instructions", str(other), "--set", JA, "--out", str(tmp_path / "sft"))
    assert done.returncode == 2
    assert f"{other} has no conversation {rows[10]['conversation_id']}" in done.stderr
    assert not (tmp_path / "sft").exists()


def _params(**option) -> dict:
    data = yaml.safe_load(compose_params(["profile=sample"]).split("\n", 1)[1])
    data["sft"] = {"mine": option}
    return data


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"turns": 2}, "sft.mine.turns=2: variant llama31 has no second turn"),
        ({"turns": 2, "variants": ["gemma3"]}, "sft.mine.turns=2: variant gemma3 has no second turn"),
        ({"language": "en", "variants": ["gemma3"]}, "sft.mine.language=en: variant gemma3 has no English"),
        ({"language": "en", "min_score": 5}, "min_score needs language ja"),
        ({"variants": ["gemma4"]}, "sft.mine.variants: unknown ['gemma4']"),
        ({"output_key": "text"}, "sft.mine.output_key"),
    ],
)
def test_an_option_a_variant_cannot_have_fails_naming_the_key(option, message):
    with pytest.raises(
        ParamsError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        validate(_params(**option))
    validate(_params(turns=2, variants=["gemma2"]))  # where the variant has a second turn


def test_option_sets_for_a_variant():
    params = validate(_params(turns=2, variants=["gemma2"]))
    assert list(sft.options_for(params, "gemma2")) == ["mine"]
    assert sft.options_for(params, "gemma3") == {}
    with pytest.raises(PipelineError, match=r"sft option sets \['mine'\] do not apply to gemma3"):
        sft.options_for(params, "gemma3", ["mine"])


def _record(scores, multiturn=None, template=None, en=("en",)) -> dict:
    responses = [{"role": "assistant", "content": f"r{i}"} for i in range(len(scores))]
    return {
        "conversation_id": "c1",
        "is_template_instruction": template,
        "synthesized_assistant_responses": responses or None,
        "synthesized_response_scoring_annotations": [{"preference_score": s} for s in scores] or None,
        "synthesized_assistant_responses_en": [{"role": "assistant", "content": c} for c in en] or None,
        "synthesized_multiturn_conversation": multiturn,
    }


USER = {"instruction_ja": "質問", "instruction": "question", "redacted": False}


@pytest.mark.parametrize(
    ("scores", "min_score", "want"),
    [
        ([3.0, 9.0, 9.0, 1.0], None, "r1"),  # the first of tied best scores
        ([-1.0, 2.0, -1.0], None, "r1"),  # failed judgements never win
        ([-1.0, -1.0], None, "no_scored_response"),
        ([], None, "no_responses"),  # an empty, duplicate or too-long instruction
        ([4.0, 7.0], 7.0, "r1"),  # min_score is inclusive
        ([4.0, 6.5], 7.0, "below_min_score"),
    ],
)
def test_best_response_and_min_score(scores, min_score, want):
    turns, reason = sft.conversation(_record(scores), USER, SftOption(min_score=min_score))
    if want.startswith("r"):
        assert reason is None
        assert turns == [{"role": "user", "content": "質問"}, {"role": "assistant", "content": want}]
    else:
        assert turns is None and reason == want


def test_exclusions_languages_and_two_turns():
    record = _record([5.0, 8.0], template="company introduction")
    assert sft.conversation(record, USER, SftOption(exclude_template=True)) == (None, "template")
    redacted = {**USER, "redacted": True}
    assert sft.conversation(_record([5.0]), redacted, SftOption(exclude_redacted=True)) == (None, "redacted")
    assert sft.conversation(_record([5.0]), redacted, SftOption())[1] is None  # kept unless excluded
    turns, _ = sft.conversation(record, USER, SftOption(language="en"))
    assert turns == [{"role": "user", "content": "question"}, {"role": "assistant", "content": "en"}]
    assert sft.conversation(_record([5.0], en=()), USER, SftOption(language="en")) == (None, "no_responses")
    assert sft.conversation(record, USER, SftOption(turns=2)) == (None, "no_second_turn")
    follow = [
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "もっと"},
        {"role": "assistant", "content": "はい"},
    ]
    turns, _ = sft.conversation(_record([5.0, 8.0], multiturn=[follow]), USER, SftOption(turns=2))
    assert turns == [{"role": "user", "content": "質問"}, *follow]
    # a single-turn entry: a one-turn conversation, as the best-response set gives
    single = _record([5.0, 8.0], multiturn=[follow[:1]])
    assert sft.conversation(single, USER, SftOption(turns=2)) == sft.conversation(single, USER, SftOption())
    flat = _record([5.0, 8.0], multiturn=follow)  # the older flat shape, as score reads it
    assert sft.conversation(flat, USER, SftOption(turns=2)) == (turns, None)
    elsewhere = [{"role": "assistant", "content": "not one of its responses"}, *follow[1:]]
    for wrong, message in [
        ([elsewhere], "does not start at one of its synthesized_assistant_responses"),
        ([follow, follow], "is not one conversation"),
        ([[]], "is not one conversation"),
    ]:
        for option in (SftOption(turns=2), SftOption()):  # a one-turn set reads the stored choice too
            with pytest.raises(
                SourceError, match=f"conversation c1: synthesized_multiturn_conversation {message}"
            ):
                sft.conversation(_record([5.0, 8.0], multiturn=wrong), USER, option)


def test_the_stored_conversation_decides_the_best_response_whatever_the_scores():
    """score keeps the publisher's choice (the response its conversation continues): so does sft."""
    follow = [{"role": "assistant", "content": "r1"}, {"role": "user", "content": "もっと"}]
    record = _record([9.0, 8.0], multiturn=[[*follow, {"role": "assistant", "content": "はい"}]])
    assert sft.best_response(record) == 1
    assert sft.conversation(record, USER, SftOption())[0][1] == {"role": "assistant", "content": "r1"}
    assert sft.conversation(record, USER, SftOption(min_score=8.5)) == (None, "below_min_score")  # r1's 8.0
    assert sft.best_response(_record([9.0, 8.0])) == 0  # no conversation: the judge's rule
    assert sft.best_response(_record([-1.0, -1.0], multiturn=[follow[:1]])) is None  # nothing scored


# A release file as published (tokyotech-llm/lmsys-chat-1m-synth, Gemma-2): the published field names,
# tied top scores, and each conversation continuing the publisher's pick among the tied responses,
# which is not always the first (the first-on-ties rule picks r0 in each of these records).
TIED = [9.0, 6.0, 9.0, 9.0]
NO_RESPONSES = dict.fromkeys(  # an empty or duplicate instruction: no generation
    [
        "synthesized_assistant_responses",
        "synthesized_response_scoring_annotations",
        "synthesized_assistant_responses_en",
    ]
)


def _published_record(cid: str, pick: int | None, follow_up: bool = True, **flags) -> dict:
    responses = [{"role": "assistant", "content": f"{cid}-r{i}"} for i in range(len(TIED))]
    notes = [
        {"response_token_length": 10, "judgement": "[[9]]", "repetition_flag": False, "preference_score": s}
        for s in TIED
    ]
    conversation = None
    if pick is not None:
        conversation = [[responses[pick]]]
        if follow_up:
            conversation[0] += [
                {"role": "user", "content": f"{cid}: もう少し詳しく"},
                {"role": "assistant", "content": f"{cid}: 詳しくは"},
            ]
    record = {
        "conversation_id": cid,
        "duplicate_user_instruction_ja": None,
        "empty_user_instruction_ja": False,
        "is_template_instruction": None,
        "synthesized_assistant_responses": responses,
        "synthesized_response_scoring_annotations": notes,
        "synthesized_assistant_responses_en": [{"role": "assistant", "content": f"{cid}-en"}],
        "synthesized_multiturn_conversation": conversation,
    }
    return record | flags


def _published_file(built: Path, tmp_path: Path) -> tuple[list[dict], Path, Path]:
    """A tiny published-shaped gemma2 release over the sample's first unredacted conversations (so the
    sample's LMSYS-Chat-1M holds them, in its order), and their decrypted-instructions file."""
    users = pq.read_table(built / "data/private/translated-ja.parquet").to_pylist()
    ids = [u["conversation_id"] for u in users if not u["redacted"]][:6]
    records = [
        _published_record(ids[0], 2),  # two-turn, from the second of three tied responses
        _published_record(ids[1], 3, follow_up=False),  # single-turn, from the third
        _published_record(ids[2], 0),  # the first: the one rule that both agree on
        _published_record(ids[3], 2, is_template_instruction="company introduction"),
        _published_record(ids[4], None, empty_user_instruction_ja=True) | NO_RESPONSES,
        _published_record(ids[5], None, duplicate_user_instruction_ja=ids[0]) | NO_RESPONSES,
    ]
    release = tmp_path / "published"
    release.mkdir()
    write_jsonl_gz(records, release / f"{STEM}.jsonl.gz")
    plain = tmp_path / "instructions.jsonl.gz"
    write_jsonl_gz(
        [
            {"conversation_id": c, "translated_conversation": [{"role": "user", "content": f"{c}?"}]}
            for c in ids
        ],
        plain,
    )
    return records, release, plain


def test_a_published_file_with_tied_top_scores_gives_the_published_best_response(built: Path, tmp_path: Path):
    records, release, plain = _published_file(built, tmp_path)
    done = _licensee(
        built,
        *("--release-dir", str(release), "--instructions", str(plain)),
        *("--lmsys", str(built / "data/raw/lmsys-chat-1m"), "--out", str(tmp_path / "sft")),
    )
    assert done.returncode == 0, done.stderr  # the Gemma-2 two-turn set (v0.3's) builds
    ids = [r["conversation_id"] for r in records]
    user = {c: {"role": "user", "content": f"{c}?"} for c in ids}
    picked = {ids[0]: 2, ids[1]: 3, ids[2]: 0, ids[3]: 2}
    one_turn = {c: [user[c], {"role": "assistant", "content": f"{c}-r{i}"}] for c, i in picked.items()}
    assert _lines(tmp_path / f"sft/{JA}.jsonl.gz") == [{"conversation": one_turn[c]} for c in ids[:4]]
    kept = ids[:3]  # the template instruction is left out
    assert _lines(tmp_path / f"sft/{JA_WO}.jsonl.gz") == [{"conversation": one_turn[c]} for c in kept]
    assert _lines(tmp_path / f"sft/{MIN_8}.jsonl.gz") == [{"conversation": one_turn[c]} for c in kept]
    two_turn = [
        {"conversation": [user[c], *records[i]["synthesized_multiturn_conversation"][0]]}
        for i, c in enumerate(kept)
    ]
    assert _lines(tmp_path / f"sft/{TWO_TURN}.jsonl.gz") == two_turn
    assert [len(line["conversation"]) for line in two_turn] == [4, 2, 4]
    english = _lines(tmp_path / f"sft/{EN_WO}.jsonl.gz")  # the LMSYS first turns, the English response
    assert [line["conversation"][1]["content"] for line in english] == [f"{c}-en" for c in kept]


def test_the_first_on_ties_rule_would_have_refused_the_published_two_turn_set():
    """The published pick among tied responses is not the first: the issue this guards against."""
    record = _published_record("c9", 2)
    scores = [n["preference_score"] for n in record["synthesized_response_scoring_annotations"]]
    assert best_index(scores) == 0 != sft.best_response(record) == 2
    turns, reason = sft.conversation(record, USER, SftOption(turns=2, exclude_template=True))
    assert reason is None and turns[1] == {"role": "assistant", "content": "c9-r2"}


@pytest.mark.parametrize("key", ["messages", "conversation"])
def test_the_output_key_option_names_each_line_key(tmp_path: Path, key):
    pairs = [(_published_record("c1", 2), USER), (_published_record("c2", None, follow_up=False), USER)]
    options = {"set": SftOption(output_key=key), "default": SftOption()}
    metrics = sft.write_sft(pairs, options, tmp_path)
    assert metrics["sets"]["set"]["written"] == 2
    lines = gzip.decompress((tmp_path / "set.jsonl.gz").read_bytes()).splitlines()
    assert all(line.startswith(f'{{"{key}":[{{"role":"user","content":"質問"}}'.encode()) for line in lines)
    assert [json.loads(line)[key] for line in lines] == [
        json.loads(line)["conversation"]
        for line in gzip.decompress((tmp_path / "default.jsonl.gz").read_bytes()).splitlines()
    ]
