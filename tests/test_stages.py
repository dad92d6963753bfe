"""The stages in-process on the sample, with a FakeEngine: what each writes, row by row."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.config.errors import PipelineError
from stages.core.config.params import load_params
from stages.core.rows.responses import request_seed
from stages.core.rows.second_turn import selected
from stages.core.storage.crypto import CryptoError, KeySpec, derive_key
from stages.core.storage.jsonl import read_jsonl_gz, sha256_file
from stages.core.storage.parquet import engines_of
from tests.conftest import compose_params, run_stage, set_params

ROOT = Path(__file__).resolve().parent.parent

PUBLIC_FIELDS = [
    "conversation_id",
    "duplicate_user_instruction_ja",
    "empty_user_instruction_ja",
    "is_template_instruction",
    "synthesized_assistant_responses",
    "synthesized_response_scoring_annotations",
]
ENCRYPTED = "lmsys-chat-1m-first-turn-user-instructions-ja.jsonl.gz.gpg"
ENCRYPTED_UNSAFE = "lmsys-chat-1m-first-turn-user-instructions-ja+unsafe.jsonl.gz.gpg"  # gemma3's subset
ANNOTATION_FIELDS = {"response_token_length", "judgement", "repetition_flag", "preference_score"}

TRANSLATED_JA = "data/private/translated-ja.parquet"
SUBSETS = ("ja", "ja+unsafe")


@pytest.fixture
def upstream(workspace, monkeypatch, fake_engine):
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    return workspace


def test_decrypt_and_translate(upstream, fake_engine):
    released = pq.read_table(upstream / "data/private/instructions-ja.parquet")
    assert released.num_rows == 307
    table = pq.read_table(upstream / "data/private/translated-ja.parquet").to_pandas()
    assert len(table) == 314
    assert (table.instruction_source == "llm").sum() == 7  # the release lacks 7 kept conversations
    listed = (upstream / "data/private/translated-ja.not-released.txt").read_text().split()
    assert listed == list(table[table.instruction_source == "llm"].conversation_id)
    translator = json.loads(engines_of(upstream / TRANSLATED_JA)[b"lmsys_synth.engine.translate"])
    assert translator["llm"]["model"] == load_params(upstream / "params.yaml").translate.llm.model
    translated = [r for r in fake_engine.requests if "Translate the following" in r.messages[0]["content"]]
    assert len(translated) == 4  # 7 missing: 2 empty (nothing to translate), 1 too long (never sent)
    first = table.drop_duplicates("instruction_ja").set_index("instruction_ja").conversation_id
    for row in table[table.duplicate_user_instruction_ja.notna()].itertuples():
        assert row.duplicate_user_instruction_ja == first[row.instruction_ja] != row.conversation_id
    assert table.empty_user_instruction_ja.sum() == 4
    assert table[table.empty_user_instruction_ja].duplicate_user_instruction_ja.isna().all()
    assert set(table.is_template_instruction.dropna()) == {
        "company introduction",
        "chemical industry article",
    }


def test_the_faithful_default_writes_the_release_s_rows_and_lists_those_it_lacks(workspace, monkeypatch):
    production = yaml.safe_load(compose_params([]))
    assert production["translate"]["missing"] == "drop"  # the sample profile runs the extension (llm)
    set_params(workspace, lambda d: d["translate"].update(missing="drop"))
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    first = pq.read_table(workspace / "data/interim/first-turn.parquet").to_pandas()
    for subset in SUBSETS:
        released = pq.read_table(workspace / f"data/private/instructions-{subset}.parquet").to_pandas()
        table = pq.read_table(workspace / f"data/private/translated-{subset}.parquet")
        assert set(table["conversation_id"].to_pylist()) == set(released.conversation_id)
        assert set(table["instruction_source"].to_pylist()) == {"released"}
        assert not engines_of(workspace / f"data/private/translated-{subset}.parquet")  # no translator
        ours = first if subset == "ja+unsafe" else first[~first.flagged]
        lacking = [c for c in ours.conversation_id if c not in set(released.conversation_id)]
        listed = (workspace / f"data/private/translated-{subset}.not-released.txt").read_text().split()
        assert listed == lacking and len(lacking) >= 5
        metrics = json.loads((workspace / f"data/metrics/translate-{subset}.json").read_text())
        assert metrics["rows_not_released"] == len(lacking) and metrics["rows_llm"] == 0
        assert metrics["release_rows"] == metrics["rows_released"] == len(released) == table.num_rows
        assert metrics["release_rows_without_first_turn"] == 0
        flagged = first[first.flagged & first.conversation_id.isin(released.conversation_id)]
        assert metrics["release_rows_moderation_flagged"] == len(flagged)


def test_translate_missing_error_names_the_setting(workspace, monkeypatch):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["translate"]["missing"] = "error"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage(monkeypatch, "fetch")
    run_stage(monkeypatch, "decrypt")
    with pytest.raises(
        PipelineError, match=r"7 conversations have no released translation .* translate\.missing"
    ):
        run_stage(monkeypatch, "translate")


def test_decrypt_with_a_wrong_key_leaves_no_plaintext(workspace, monkeypatch):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["decrypt"]["key"] = {"method": "hash", "file": "data/train-00001-of-00002-*.parquet"}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage(monkeypatch, "fetch")
    with pytest.raises(CryptoError, match="could not decrypt"):
        run_stage(monkeypatch, "decrypt")
    assert list((workspace / "data/private").iterdir()) == []


def _release(workspace, name: str) -> list[dict]:
    return list(read_jsonl_gz(workspace / f"data/release/{name}/{name}-lmsys-chat-1m-synth-ja+en.jsonl.gz"))


def test_gemma2_generate_score_package(upstream, monkeypatch):
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "gemma2")
    table = (
        pq.read_table(upstream / "data/private/translated-ja.parquet")
        .to_pandas()
        .set_index("conversation_id")
    )
    status = (
        pq.read_table(upstream / "data/generated/gemma2.parquet").to_pandas().set_index("conversation_id")
    )
    # the flags and two-turn ids: the published file's where it has the row, ours else (test_annotations.py)
    annotated = {
        r["conversation_id"]: r
        for r in pq.read_table(upstream / "data/generated/gemma2.annotations.parquet").to_pylist()
    }
    table = table[~table.translation_failed]  # no Japanese instruction: not released
    records = _release(upstream, "gemma2")
    share, shapes = load_params(upstream / "params.yaml").models["gemma2"].second_turn.share, Counter()
    assert [r["conversation_id"] for r in records] == list(table.index)
    extra = ["synthesized_assistant_responses_en", "synthesized_multiturn_conversation"]
    for record in records:
        assert list(record) == PUBLIC_FIELDS + extra
        flags = annotated[record["conversation_id"]]
        assert [record[f] for f in PUBLIC_FIELDS[1:4]] == [flags[f] for f in PUBLIC_FIELDS[1:4]]
        skipped = flags["empty_user_instruction_ja"] or flags["duplicate_user_instruction_ja"] is not None
        if skipped or status.status_ja[record["conversation_id"]] == "skipped_too_long":
            assert all(record[f] is None for f in PUBLIC_FIELDS[4:] + extra)
            continue
        responses, notes = (
            record["synthesized_assistant_responses"],
            record["synthesized_response_scoring_annotations"],
        )
        assert len(responses) == len(notes) == 6 and len(record["synthesized_assistant_responses_en"]) == 1
        assert {r["role"] for r in responses} == {"assistant"}
        assert all(set(n) == ANNOTATION_FIELDS and 0 <= n["preference_score"] <= 10 for n in notes)
        best = max(range(6), key=lambda i: (notes[i]["preference_score"], -i))
        (turns,) = record["synthesized_multiturn_conversation"]  # as published: a list of one conversation
        two_turn = (
            flags["two_turn"]
            if flags["annotated_by"] == "published"
            else selected(record["conversation_id"], share)
        )
        roles = ["assistant", "user", "assistant"] if two_turn else ["assistant"]
        assert [t["role"] for t in turns] == roles  # the instruction stays encrypted
        assert turns[0] == responses[best] and turns[-1]["content"]
        shapes[len(turns)] += 1
    # the published share of two-turn conversations (134,014 of 451,450: 29.7%), within a few points
    assert shapes[3] / (shapes[1] + shapes[3]) == pytest.approx(0.297, abs=0.04)
    metrics = json.loads((upstream / "data/metrics/package-gemma2.json").read_text())
    assert (metrics["multiturn_conversations"], metrics["single_turn_conversations"]) == (
        shapes[3],
        shapes[1],
    )
    public = gzip.decompress(
        (upstream / "data/release/gemma2/gemma2-lmsys-chat-1m-synth-ja+en.jsonl.gz").read_bytes()
    ).decode()
    for text in table.instruction_ja[table.instruction_ja.str.len() > 0]:
        assert json.dumps(text, ensure_ascii=False)[1:-1] not in public  # no Japanese instruction in public


def test_generate_answers_redacted_conversations_unless_skip_redacted(upstream, monkeypatch):
    """The default (the cards): a redacted conversation is asked like any other; skip_redacted=true
    (the public derivative) gives it no responses and the status skipped_redacted."""
    table = pq.read_table(upstream / TRANSLATED_JA).to_pandas().set_index("conversation_id")
    eligible = table[
        ~table.empty_user_instruction_ja
        & table.duplicate_user_instruction_ja.isna()
        & ~table.translation_failed
    ]
    redacted = set(eligible.index[eligible.redacted])
    assert redacted  # the sample holds some
    generated = upstream / "data/generated/gemma2.parquet"
    run_stage(monkeypatch, "generate", "gemma2")
    rows = pq.read_table(generated).to_pandas().set_index("conversation_id").loc[sorted(redacted)]
    assert set(rows.status_ja) | set(rows.status_en) <= {"ok", "skipped_too_long"}
    answered = rows[rows.status_ja == "ok"]
    assert len(answered) > 0 and {len(r) for r in answered.responses_ja} == {6}
    assert {len(r) for r in answered.responses_en} == {1}

    set_params(upstream, lambda d: d["models"]["gemma2"]["generate"].update(skip_redacted=True))
    run_stage(monkeypatch, "generate", "gemma2")
    rows = pq.read_table(generated).to_pandas().set_index("conversation_id").loc[sorted(redacted)]
    assert set(rows.status_ja) == set(rows.status_en) == {"skipped_redacted"}
    assert rows.responses_ja.isna().all() and rows.responses_en.isna().all()


def test_gemma2_second_turn_selection_is_a_hash_of_the_id_below_the_share():
    """Which conversations get a second turn: SHA-256("second-turn:<id>") below the share, by id alone
    (no seed, no row order), and a larger share keeps every conversation a smaller one picks."""
    ids = [f"c{i}" for i in range(20_000)]
    picked = [c for c in ids if selected(c, 0.297)]
    assert picked[:3] == ["c0", "c2", "c11"]  # pinned: the rule of released files must not drift
    assert picked == [c for c in reversed(ids) if selected(c, 0.297)][::-1]
    assert len(picked) / len(ids) == pytest.approx(0.297, abs=0.01)
    assert set(c for c in ids if selected(c, 0.2)) < set(picked)
    assert not any(selected(c, 0.0) for c in ids) and all(selected(c, 1.0) for c in ids)


def test_encrypted_instructions_are_exactly_those_used(upstream, monkeypatch):
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "gemma3")
    out = upstream / "data/release/gemma3"
    key = derive_key(upstream / "data/raw/lmsys-chat-1m", KeySpec(file="data/train-00000-of-00002-*.parquet"))
    plain = upstream / "plain.jsonl.gz"
    home = upstream / "gnupg"
    home.mkdir(mode=0o700)
    by_hand = subprocess.run(  # users need nothing of ours to read the release
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            "0",
            "--decrypt",
            str(out / ENCRYPTED_UNSAFE),
        ],
        input=f"{key}\n".encode(),
        capture_output=True,
        check=True,
    )
    plain.write_bytes(by_hand.stdout)
    assert not (out / ENCRYPTED).exists()  # named after gemma3's subset, ja+unsafe, as published
    table = pq.read_table(upstream / "data/private/translated-ja+unsafe.parquet").to_pylist()
    table = [r for r in table if not r["translation_failed"]]
    assert list(read_jsonl_gz(plain)) == [
        {
            "conversation_id": r["conversation_id"],
            "translated_conversation": [{"role": "user", "content": r["instruction_ja"]}],
        }
        for r in table
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"][ENCRYPTED_UNSAFE]["plaintext_sha256"] == sha256_file(plain)
    assert manifest["subset"] == "ja+unsafe"
    records = _release(upstream, "gemma3")
    assert all(list(r) == PUBLIC_FIELDS for r in records)  # gemma3: no English, no second turn
    generated = [r for r in records if r["synthesized_assistant_responses"] is not None]
    assert generated and all(len(r["synthesized_assistant_responses"]) == 10 for r in generated)
    assert manifest["metrics"]["responses_ja"] == 10 * len(generated)
    producers = manifest["producers"]
    assert producers["project"]["name"] == "lmsys-chat-1m-synth" and producers["project"]["version"]
    # gemma3 has no second turn; the translator LLM answered first turns the release lacks
    assert set(producers["models"]) == {"translate", "generate", "judge"}
    for role in producers["models"].values():
        tiny = yaml.safe_load((ROOT / "conf/llm/tiny.yaml").read_text())
        assert role["model"] == "data/sample/tiny-chat" and role["revision"] == tiny["revision"]
        assert role["engine"] == "transformers"
        assert isinstance(role["libraries"], dict)  # the fake engine uses none


def test_released_file_with_a_repeated_conversation_is_refused(tmp_path):
    from stages.core.rows.records import instruction_rows
    from stages.core.storage.jsonl import write_jsonl_gz

    record = {"conversation_id": "c1", "translated_conversation": [{"role": "user", "content": "こんにちは"}]}
    path = tmp_path / "ja.jsonl.gz"
    write_jsonl_gz([record, record], path)
    with pytest.raises(ValueError, match="record 2 repeats conversation_id c1"):
        list(instruction_rows(path))
    write_jsonl_gz([record, {"conversation_id": "c2", "translated_conversation": []}], path)
    with pytest.raises(
        ValueError, match=r"record 2 lacks conversation_id or a first user turn .*not the \.gpg"
    ):
        list(instruction_rows(path))


def test_decrypt_and_translate_each_released_subset(workspace, monkeypatch, fake_engine):
    """One fetch serves both subsets: ja leaves the moderation-flagged conversations out, ja+unsafe
    keeps them; each has its own instructions and translated table."""
    run_stage(monkeypatch, "fetch")
    run_stage(monkeypatch, "decrypt")  # every subset of decrypt.subsets
    ja = pq.read_table(workspace / "data/private/instructions-ja.parquet")
    both = pq.read_table(workspace / "data/private/instructions-ja+unsafe.parquet")
    assert both.num_rows == ja.num_rows + 12  # the 12 moderation-flagged conversations
    assert set(ja["conversation_id"].to_pylist()) < set(both["conversation_id"].to_pylist())
    run_stage(monkeypatch, "translate", "ja+unsafe")
    assert not (workspace / "data/private/translated-ja.parquet").exists()  # only the subset named
    run_stage(monkeypatch, "translate", "ja")
    first = pq.read_table(
        workspace / "data/interim/first-turn.parquet", columns=["conversation_id", "flagged"]
    )
    flagged = {c for c, f in zip(*first.to_pydict().values(), strict=True) if f}
    assert len(flagged) == 12
    tables = {
        s: pq.read_table(workspace / f"data/private/translated-{s}.parquet") for s in ("ja", "ja+unsafe")
    }
    assert not flagged & set(tables["ja"]["conversation_id"].to_pylist())
    assert flagged <= set(tables["ja+unsafe"]["conversation_id"].to_pylist())
    for subset in ("ja", "ja+unsafe"):
        metrics = json.loads((workspace / f"data/metrics/translate-{subset}.json").read_text())
        assert metrics["rows_out"] == tables[subset].num_rows


def test_an_unknown_subset_on_the_command_line_is_named(workspace, monkeypatch):
    with pytest.raises(
        PipelineError, match=r"unknown subset ja\+en; params.yaml decrypt.subsets: ja, ja\+unsafe"
    ):
        run_stage(monkeypatch, "decrypt", "ja+en")


def test_decrypt_of_a_truncated_release_leaves_no_plaintext(workspace, monkeypatch):
    run_stage(monkeypatch, "fetch")
    released = (
        workspace / "data/raw/released/dataset/lmsys-chat-1m-first-turn-user-instructions-ja.jsonl.gz.gpg"
    )
    released.write_bytes(released.read_bytes()[:-700])
    with pytest.raises(CryptoError, match="could not decrypt"):
        run_stage(monkeypatch, "decrypt")
    assert list((workspace / "data/private").iterdir()) == []


def test_decrypt_subsets_must_be_those_the_variants_use(workspace, monkeypatch):
    set_params(workspace, lambda d: d["decrypt"].update(subsets=["ja"]))  # gemma3 answers ja+unsafe
    with pytest.raises(
        ValueError,
        match=r"decrypt\.subsets=\['ja'\] must list each subset .*models\.gemma3\.subset=ja\+unsafe",
    ):
        run_stage(monkeypatch, "fetch")


def test_stage_outputs_are_byte_identical_on_rerun(upstream, monkeypatch):
    outputs = ["data/private/instructions-ja.parquet", "data/private/translated-ja.parquet"]
    first = {name: (upstream / name).read_bytes() for name in outputs}
    shutil.rmtree(upstream / "data/.checkpoints")
    for stage in ("decrypt", "translate"):
        run_stage(monkeypatch, stage)
    assert {name: (upstream / name).read_bytes() for name in outputs} == first


def test_package_reruns_give_identical_public_files(upstream, monkeypatch):
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "llama31")
    out = upstream / "data/release/llama31"
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"README.md", "manifest.json", ENCRYPTED} <= set(first)
    run_stage(monkeypatch, "package", "llama31")
    # every file, the card and the manifest included (no timestamps, no git describe), and the .gpg
    # (its plaintext unchanged, the earlier ciphertext is kept)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_a_resumed_stage_skips_finished_shards_without_loading_the_model(upstream, monkeypatch, fake_engine):
    set_params(upstream, lambda d: d["engine"].update(cache="off"))  # the checkpoints alone
    run_stage(monkeypatch, "generate", "gemma3")
    loads, calls = fake_engine.loads, len(fake_engine.requests)
    first = (upstream / "data/generated/gemma3.parquet").read_bytes()
    shards = sorted((upstream / "data/.checkpoints/generate@gemma3").glob("*/0000*.parquet"))
    assert len(shards) == 6  # 326 rows (ja+unsafe) in shards of 64
    shards[-1].unlink()  # as if killed while writing the last shard
    run_stage(monkeypatch, "generate", "gemma3")
    assert len(fake_engine.requests) > calls and fake_engine.loads == loads + 1  # only the last shard ran
    calls = len(fake_engine.requests)
    run_stage(monkeypatch, "generate", "gemma3")
    assert len(fake_engine.requests) == calls and fake_engine.loads == loads + 1  # nothing to do: no load
    assert (upstream / "data/generated/gemma3.parquet").read_bytes() == first


def _generated(workspace, name: str) -> dict[str, dict]:
    subset = "ja+unsafe" if name == "gemma3" else "ja"
    table = pq.read_table(workspace / f"data/private/translated-{subset}.parquet").to_pylist()
    generated = pq.read_table(workspace / f"data/generated/{name}.parquet").to_pylist()
    return {t["conversation_id"]: {**t, **g} for t, g in zip(table, generated, strict=True)}


def test_one_failing_request_and_a_prompt_too_long_never_stop_a_stage(upstream, monkeypatch, fake_engine):
    table = pq.read_table(upstream / "data/private/translated-ja.parquet").to_pylist()
    victim = next(
        r
        for r in table
        if r["instruction_source"] == "released"
        and r["duplicate_user_instruction_ja"] is None
        and not r["empty_user_instruction_ja"]
        and len(r["instruction_ja"]) < 1000
    )
    fake_engine.refuse = (victim["instruction_ja"],)  # the backend rejects any call holding this prompt
    run_stage(monkeypatch, "generate", "gemma2")
    rows = _generated(upstream, "gemma2")
    assert rows[victim["conversation_id"]]["status_ja"] == "failed"
    assert rows[victim["conversation_id"]]["responses_ja"] is None
    assert rows[victim["conversation_id"]]["status_en"] == "ok"  # its English request was another one
    longest = max(table, key=lambda r: len(r["instruction_ja"] or ""))
    assert len(longest["instruction_ja"]) > 4096 * 4  # over the tiny model's context at 4 characters a token
    assert rows[longest["conversation_id"]]["status_ja"] == "skipped_too_long"
    answered = [r for r in rows.values() if r["status_ja"] == "ok"]
    assert answered and all(len(r["responses_ja"]) == 6 for r in answered)
    judged = answered[0]["responses_ja"][2]["content"]
    assert sum(judged in (x["content"] for x in r["responses_ja"]) for r in answered) == 1
    fake_engine.refuse = (f"[The Start of Assistant's Answer]\n{judged}\n",)  # one judge request fails
    for stage in ("score", "package"):
        run_stage(monkeypatch, stage, "gemma2")
    metrics = json.loads((upstream / "data/metrics/package-gemma2.json").read_text())
    assert metrics["generate_failed_requests"] == 1 and metrics["generate_skipped_too_long"] >= 1
    assert metrics["judge_failed_requests"] == 1
    assert metrics["responses_ja"] == 6 * len(answered)
    records = {r["conversation_id"]: r for r in _release(upstream, "gemma2")}
    assert records[victim["conversation_id"]]["synthesized_assistant_responses"] is None
    failed = [
        n
        for r in records.values()
        for n in r["synthesized_response_scoring_annotations"] or []
        if n["judgement"] is None
    ]
    assert len(failed) == 1 and failed[0]["preference_score"] == -1


def test_a_failed_llm_translation_is_not_an_empty_instruction(upstream):
    table = pq.read_table(upstream / "data/private/translated-ja.parquet").to_pandas()
    llm = table[table.instruction_source == "llm"]
    failed = llm[llm.translation_failed]
    assert (failed.translation_status == "skipped_too_long").all() and len(failed) >= 1  # the long first turn
    assert failed.instruction_ja.isna().all() and not failed.empty_user_instruction_ja.any()
    assert (llm[~llm.translation_failed].translation_status.isin(["ok", "empty_source"])).all()


def test_an_empty_translation_is_asked_again_then_counted_as_failed(workspace, monkeypatch, fake_engine):
    for stage in ("fetch", "decrypt"):
        run_stage(monkeypatch, stage)
    set_params(workspace, lambda d: d["translate"].update(retries=2, max_failure_rate=0.1))
    monkeypatch.setattr(
        "tests.conftest.fake_reply", lambda messages, index: "  "
    )  # the translator says nothing
    with pytest.raises(
        PipelineError,
        match=r"translate: 5 of 5 LLM translations failed \(100\.0% > translate\.max_failure_rate=0\.1\)",
    ):
        run_stage(monkeypatch, "translate")
    asked = [r for r in fake_engine.requests if "Translate the following" in r.messages[0]["content"]]
    assert len(asked) == 4 * 3  # 4 short ones, each asked 3 times (the long one is never sent)
    assert not (workspace / "data/private/translated-ja.parquet").exists()


def test_killed_mid_run_then_a_torn_shard_recomputes_only_that_shard(upstream, monkeypatch, fake_engine):
    set_params(upstream, lambda d: d["engine"].update(cache="off"))  # the checkpoints alone
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_ENGINE_DELAY": "0.5"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/run_with_fake_engine.py"), "generate", "gemma3"],
        cwd=upstream,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards = upstream / "data/.checkpoints/generate@gemma3"
    deadline = time.monotonic() + 120
    while len(list(shards.glob("*/0000*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(shards.glob("*/0000*.parquet"))
    assert len(done) == 2 and not (upstream / "data/generated/gemma3.parquet").exists()
    done[1].write_bytes(done[1].read_bytes()[:100])  # torn
    fake_engine.requests.clear()
    run_stage(monkeypatch, "generate", "gemma3")
    table = pq.read_table(upstream / "data/private/translated-ja+unsafe.parquet").to_pylist()
    seed = load_params(upstream / "params.yaml").seed  # a request's seed names its conversation
    first_shard = {request_seed(seed, r["conversation_id"], "ja") for r in table[:64]}
    asked = {r.seed for r in fake_engine.requests}
    assert not asked & first_shard  # shard 0 was reused (its texts may recur in later shards)
    second = {request_seed(seed, r["conversation_id"], "ja") for r in table[64:128]}
    assert second & asked
    assert pq.read_table(upstream / "data/generated/gemma3.parquet").num_rows == len(table)


def _full_disk_while_copying(src, dst):
    Path(dst).write_bytes(Path(src).read_bytes()[:100])
    raise OSError(28, "No space left on device")


def _full_disk_half_way(monkeypatch, workspace):
    from stages.core.rows import records as release

    set_params(workspace, lambda d: d["release"].update(batch_rows=64))
    written, original = [], release.public_table

    def table(*args):
        written.append(1)
        if len(written) > 2:  # after 128 records
            raise OSError(28, "No space left on device")
        return original(*args)

    monkeypatch.setattr("stages.core.rows.records.public_table", table)


@pytest.mark.parametrize("where", ["records", "reused ciphertext"])
def test_a_failed_package_leaves_the_previous_release_whole(upstream, monkeypatch, where):
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "gemma3")
    out = upstream / "data/release/gemma3"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if where == "records":
        _full_disk_half_way(monkeypatch, upstream)
    else:  # the previous ciphertext is found (from the workspace) and copied
        monkeypatch.setattr(
            "stages.core.release.files.previous_ciphertext", lambda *a: out / ENCRYPTED_UNSAFE
        )
        monkeypatch.setattr("stages.core.release.files.shutil.copyfile", _full_disk_while_copying)
    with pytest.raises(OSError, match="No space left on device"):
        run_stage(monkeypatch, "package", "gemma3")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in (upstream / "data/release").iterdir()) == [
        "gemma3"
    ]  # no partial or old dirs


def test_release_bytes_do_not_depend_on_the_batch_size(upstream, monkeypatch):
    for stage in ("generate", "score", "package"):
        run_stage(monkeypatch, stage, "gemma2")
    out = upstream / "data/release/gemma2"
    first = {p.name: p.read_bytes() for p in out.iterdir() if "synth" in p.name}
    set_params(upstream, lambda d: d["release"].update(batch_rows=7))  # a runtime knob: memory, not output
    run_stage(monkeypatch, "package", "gemma2")
    assert {p.name: p.read_bytes() for p in out.iterdir() if "synth" in p.name} == first
    assert pq.ParquetFile(out / "gemma2-lmsys-chat-1m-synth-ja+en.parquet").metadata.num_row_groups == 1
