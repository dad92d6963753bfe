"""translate.missing=deepl: the real `deepl` client against a local DeepL stand-in (tests/deepl_server.py)
on the sample: what is sent, what is written, what a 429, a 456 and a 403 do, and what the response
cache saves."""

from __future__ import annotations

import json
import shutil

import deepl
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.config.compose import compose_params
from stages.core.config.errors import PipelineError
from stages.core.config.params import ParamsError, validate
from stages.core.runtime.deepl_translate import batches
from tests.conftest import run_stage, set_params
from tests.deepl_server import FakeDeepL

TRANSLATED = "data/private/translated-ja.parquet"
SETTINGS = {
    "source_lang": "EN",
    "formality": "more",
    "glossary_id": "gl-1",
    "model_type": "quality_optimized",
}


@pytest.fixture
def server():
    with FakeDeepL() as fake:
        yield fake


@pytest.fixture
def decrypted(workspace, monkeypatch, server):
    """The sample after fetch and decrypt, with translate.missing=deepl against `server`, shards of 2
    rows, the key in DEEPL_AUTH_KEY and the client's backoff cut to milliseconds."""
    for stage in ("fetch", "decrypt"):
        run_stage(monkeypatch, stage)
    set_params(
        workspace,
        lambda d: d["translate"].update(
            missing="deepl", shard_size=2, deepl={**d["translate"]["deepl"], "server_url": server.url}
        ),
    )
    monkeypatch.setenv("DEEPL_AUTH_KEY", server.key)
    monkeypatch.setattr(deepl.http_client._BackoffTimer, "BACKOFF_INITIAL", 0.01)
    return workspace


def _deepl(workspace, **changes) -> None:
    set_params(workspace, lambda d: d["translate"]["deepl"].update(changes))


def _missing_texts(workspace) -> list[str]:
    """The non-empty first turns the release lacks, in first-turn order: what DeepL must translate."""
    first = pq.read_table(workspace / "data/interim/first-turn.parquet").to_pylist()
    released = pq.read_table(workspace / "data/private/instructions-ja.parquet")
    has = set(released.filter(pc.is_valid(released["instruction_ja"]))["conversation_id"].to_pylist())
    first = [r for r in first if not r["flagged"]]  # subset ja: the moderation-flagged ones are not in it
    return [r["instruction"] for r in first if r["conversation_id"] not in has and not r["empty_first_turn"]]


def _metrics(workspace) -> dict:
    return json.loads((workspace / "data/metrics/translate-ja.json").read_text())


def test_deepl_translates_the_missing_rows_with_the_configured_settings(
    decrypted, server, fake_engine, monkeypatch
):
    _deepl(decrypted, **SETTINGS)
    run_stage(monkeypatch, "translate", "ja")
    texts = _missing_texts(decrypted)
    assert len(texts) == 5 and max(map(len, texts)) == 60_000  # the sample's long turn is sent too
    assert server.texts == texts  # each once, in first-turn order
    assert [len(r.texts) for r in server.answered] == [2, 2, 1]  # one request a shard of 2 rows
    assert all(
        r.settings == {"target_lang": "JA", **SETTINGS, "show_billed_characters": True}
        for r in server.answered
    )
    table = pq.read_table(decrypted / TRANSLATED).to_pandas()
    assert table.instruction_source.value_counts().to_dict() == {"released": 307, "deepl": 7}
    ours = table[table.instruction_source == "deepl"]
    sent = ours[~ours.empty_first_turn]
    assert (sent.instruction_ja == "JA/more: " + sent.instruction).all()
    assert (sent.translation_status == "ok").all() and not ours.translation_failed.any()
    assert (ours[ours.empty_first_turn].instruction_ja == "").all()  # nothing to translate, nothing sent
    metrics = _metrics(decrypted)
    assert metrics["deepl_billed_characters"] == server.used == sum(map(len, texts)) > 60_000
    assert (metrics["rows_released"], metrics["rows_deepl"], metrics["rows_llm"]) == (307, 7, 0)
    assert metrics["deepl_sent_texts"] == 5 and metrics["deepl_requests"] == 3
    assert fake_engine.requests == []  # the translator LLM is not asked


def test_requests_stay_within_the_text_and_body_limits(decrypted, server, monkeypatch):
    _deepl(decrypted, batch_texts=2, batch_bytes=1024)
    set_params(decrypted, lambda d: d["translate"].update(shard_size=64))
    run_stage(monkeypatch, "translate", "ja")
    assert server.refused == [] and len(server.answered) >= 2
    assert all(len(r.texts) <= 2 and r.body_bytes <= 1024 for r in server.answered)
    table = pq.read_table(decrypted / TRANSLATED).to_pandas()
    long = table[table.instruction.str.len() == 60_000]
    assert long.translation_status.tolist() == ["skipped_too_long"]  # over 1 KiB alone: never sent
    assert long.translation_failed.all() and long.instruction_ja.isna().all()
    assert sorted(server.texts) == sorted(t for t in _missing_texts(decrypted) if len(t) < 60_000)


def test_429_and_503_are_retried_by_the_client(decrypted, server, monkeypatch):
    server.faults = [429, 503]
    run_stage(monkeypatch, "translate", "ja")
    assert server.refused == [429, 503]
    assert server.texts == _missing_texts(decrypted)  # the refused request was sent again, once answered
    table = pq.read_table(decrypted / TRANSLATED).to_pandas()
    assert (table[table.instruction_source == "deepl"].translation_status != "failed").all()


def test_exhausted_quota_stops_the_stage_and_the_rerun_sends_only_untranslated_texts(
    decrypted, server, monkeypatch
):
    texts = _missing_texts(decrypted)  # shards: [0, 1], [2, 3], [4]
    _deepl(decrypted, batch_texts=1)  # one text a request: the quota runs out inside shard 1
    server.quota = sum(map(len, texts[:3]))
    with pytest.raises(PipelineError) as err:
        run_stage(monkeypatch, "translate", "ja")
    billed = f"{server.quota:,} characters billed in this run"
    assert "quota exhausted (HTTP 456)" in str(err.value) and billed in str(err.value)
    assert f"{server.quota} of {server.quota} characters used" in str(err.value)  # from /v2/usage
    assert server.texts == texts[:3] and server.refused == [456]
    shards = sorted(p.name for p in (decrypted / "data/.checkpoints/translate@ja").glob("*/*.parquet"))
    assert shards == ["00000.parquet"]  # shard 0 kept; shard 1's first text is in the response cache
    assert not (decrypted / TRANSLATED).exists()

    server.quota, server.answered = None, []  # the quota resets
    run_stage(monkeypatch, "translate", "ja")
    assert server.texts == texts[3:]  # only what was not translated before
    assert _metrics(decrypted)["deepl_billed_characters"] == sum(map(len, texts[3:]))
    table = pq.read_table(decrypted / TRANSLATED).to_pandas()
    sent = table[(table.instruction_source == "deepl") & ~table.empty_first_turn]
    assert sorted(sent.instruction_ja) == sorted(f"JA: {t}" for t in texts)


def test_a_rejected_key_stops_the_stage_naming_the_variable(decrypted, server, monkeypatch):
    monkeypatch.setenv("DEEPL_AUTH_KEY", "revoked")
    with pytest.raises(PipelineError, match=r"DeepL rejected the key in \$DEEPL_AUTH_KEY \(HTTP 403\)"):
        run_stage(monkeypatch, "translate", "ja")
    assert server.refused == [403] and server.answered == []  # a 403 is not retried
    assert not (decrypted / TRANSLATED).exists()


def test_a_missing_key_fails_before_any_work(decrypted, server, monkeypatch):
    _deepl(decrypted, auth_key_env="MY_DEEPL_KEY")
    with pytest.raises(PipelineError, match=r"needs a DeepL API key in \$MY_DEEPL_KEY"):
        run_stage(monkeypatch, "translate", "ja")
    assert server.refused == server.answered == []
    assert not (decrypted / TRANSLATED).exists()


def test_a_rerun_after_new_generation_params_sends_zero_characters(decrypted, server, monkeypatch):
    run_stage(monkeypatch, "translate", "ja")
    first = pq.read_table(decrypted / TRANSLATED)
    paid = len(server.answered)
    set_params(decrypted, lambda d: d["models"]["gemma3"]["generate"]["sampling"].update(temperature=0.3))
    (decrypted / TRANSLATED).unlink()  # a forced re-run: no output, no checkpoints
    shutil.rmtree(decrypted / "data/.checkpoints")
    run_stage(monkeypatch, "translate", "ja")
    assert len(server.answered) == paid and server.refused == []  # every text from the response cache
    assert pq.read_table(decrypted / TRANSLATED).equals(first)
    metrics = _metrics(decrypted)
    assert (metrics["deepl_billed_characters"], metrics["deepl_cached_texts"]) == (0, 5)

    _deepl(decrypted, formality="less")  # other settings, another translation: paid for once more
    run_stage(monkeypatch, "translate", "ja")
    assert server.texts[5:] == _missing_texts(decrypted) and len(server.texts) == 10
    table = pq.read_table(decrypted / TRANSLATED).to_pandas()
    sent = table[(table.instruction_source == "deepl") & ~table.empty_first_turn]
    assert (sent.instruction_ja == "JA/less: " + sent.instruction).all()


def test_batches_respect_the_text_count_and_the_json_body_size():
    groups, too_long = batches(["hi"] * 120, base_bytes=50, max_texts=50, max_bytes=128 * 1024)
    assert [len(g) for g in groups] == [50, 50, 20] and too_long == []
    assert [i for g in groups for i in g] == list(range(120))
    texts = ["a" * 30, "b" * 30, "x" * 500, "c" * 30, "d" * 30]  # a 30-char text costs 34 bytes
    groups, too_long = batches(texts, base_bytes=100, max_texts=50, max_bytes=202)
    assert groups == [[0, 1, 3], [4]] and too_long == [2]
    # non-ASCII text travels as \u escapes: 6 bytes a character
    groups, too_long = batches(["あ" * 100, "い" * 100], base_bytes=0, max_texts=50, max_bytes=700)
    assert groups == [[0], [1]] and too_long == []


def test_missing_error_is_the_old_name_of_fail_and_a_glossary_needs_a_source_language():
    data = yaml.safe_load(compose_params(["profile=sample", "translate.missing=error"]))
    assert validate(data).translate.missing == "fail"
    data["translate"]["deepl"]["glossary_id"] = "gl-1"
    with pytest.raises(ParamsError, match=r"translate\.deepl: glossary_id needs source_lang"):
        validate(data)
