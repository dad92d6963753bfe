"""The real vLLM (its CPU build, `make check-vllm`; skipped where vllm is not importable) through the
DAG: the sample profile with engine=vllm and the bundled tiny model, generate, score in each judge mode
and package@gemma3 run as stage processes (`python -m stages.<stage> gemma3`), each loading its own
vLLM, one at a time. What a user relies on: n responses per answered instruction, each request's
status, the same seeds giving the same responses, a prompt over the context not sent. Then what the
engine work in progress promises: a second score run sends nothing, Ctrl-C stops generate within
seconds and its re-run asks only the unanswered requests, a killed engine core stops the stage."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm")

from tests.vllm_cpu import (
    FIRST_CALL,
    SUBSET,
    TINY,
    UPSTREAM,
    VARIANT,
    alive,
    copy_workspace,
    descendants,
    engine_core,
    metrics,
    ran,
    read_params,
    run_stage,
    sample_params,
    start_stage,
    stop_tree,
    wait_for,
    workspace,
    write_params,
)

N_JA = 10  # gemma3's responses per instruction (conf/model/gemma3.yaml)
CONTEXT = 256  # generate's max_model_len: the sample's longest instruction does not fit
MODES = ("parse", "structured", "logprob")
JUDGE_TOKENS = 64  # room for the structured mode's JSON (the sample's 12 cut it)


def _generated(path: Path) -> list[dict]:
    return pq.read_table(path / f"data/generated/{VARIANT}.parquet").to_pylist()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """fetch, decrypt and translate of gemma3's subset (no model), generate's context at CONTEXT."""

    def edit(params: dict) -> None:
        params["models"][VARIANT]["generate"]["llm"]["max_model_len"] = CONTEXT
        params["models"][VARIANT]["score"]["sampling"]["max_tokens"] = JUDGE_TOKENS

    path = workspace(tmp_path_factory.mktemp("upstream"), sample_params(edit=edit))
    for args in UPSTREAM:
        done = run_stage(path, *args)
        assert done.returncode == 0, ran(done)
    return path


@pytest.fixture(scope="module")
def generated(upstream, tmp_path_factory) -> Path:
    path = copy_workspace(upstream, tmp_path_factory.mktemp("generated"))
    done = run_stage(path, "generate", VARIANT)
    assert done.returncode == 0, ran(done)
    return path


def test_generate_writes_n_responses_to_each_answered_instruction_and_each_status(generated):
    rows = _generated(generated)
    translated = pq.read_table(generated / f"data/private/translated-{SUBSET}.parquet")
    assert len(rows) == translated.num_rows
    statuses = {r["status_ja"] for r in rows}
    assert statuses == {"ok", "skipped_too_long", None}  # None: empty or duplicate, not asked
    for row in rows:
        if row["status_ja"] == "ok":
            assert len(row["responses_ja"]) == N_JA
            assert all(r["content"] and r["completion_tokens"] >= 1 for r in row["responses_ja"])
        else:
            assert row["responses_ja"] is None
    figures = metrics(generated, "generate")["generate"]
    asked = sum(s is not None for s in (r["status_ja"] for r in rows))
    too_long = sum(r["status_ja"] == "skipped_too_long" for r in rows)
    assert figures["requests"] == asked and figures["sent"] == asked - too_long
    assert figures["statuses"] == {"ok": asked - too_long, "skipped_too_long": too_long}
    assert figures["completion_tokens"] == sum(
        c["completion_tokens"] for r in rows if r["responses_ja"] for c in r["responses_ja"]
    )


def test_a_prompt_over_the_context_is_skipped_and_never_sent(generated):
    rows = _generated(generated)
    skipped = [r for r in rows if r["status_ja"] == "skipped_too_long"]
    assert len(skipped) >= 1  # the sample's longest instruction is over 256 - 16 tokens
    figures = metrics(generated, "generate")["generate"]
    assert figures["sent"] == figures["requests"] - len(skipped)


def test_the_same_seeds_give_the_same_responses_in_another_process(upstream, generated, tmp_path):
    again = copy_workspace(upstream, tmp_path / "again")  # no checkpoint, no response cache
    done = run_stage(again, "generate", VARIANT)
    assert done.returncode == 0, ran(done)
    first, second = _generated(generated), _generated(again)
    assert [r["responses_ja"] for r in second] == [r["responses_ja"] for r in first]
    texts = [c["content"] for r in first if r["responses_ja"] for c in r["responses_ja"]]
    assert len(set(texts)) > len(texts) // 10  # temperature 0.6: the seeds differ, so do many replies


@pytest.fixture(scope="module", params=MODES)
def scored(request, generated, tmp_path_factory) -> tuple[str, Path]:
    """score@gemma3 in judge mode `request.param`, in a copy of the generated workspace."""
    mode = request.param
    path = copy_workspace(generated, tmp_path_factory.mktemp(f"scored-{mode}"))
    params = read_params(path)
    params["models"][VARIANT]["score"]["mode"] = mode
    write_params(path, params)
    done = run_stage(path, "score", VARIANT)
    assert done.returncode == 0, ran(done)
    return mode, path


def test_score_judges_every_response_in_each_judge_mode(scored):
    mode, path = scored
    rows = pq.read_table(path / f"data/scored/{VARIANT}.parquet").to_pylist()
    generated = {r["conversation_id"]: r for r in _generated(path)}
    judged = 0
    for row in rows:
        responses = generated[row["conversation_id"]]["responses_ja"]
        if not responses:
            continue
        assert len(row["annotations"]) == len(row["judge_status"]) == len(responses) == N_JA
        judged += len(responses)
    statuses = {s for row in rows for s in row["judge_status"] or []}
    figures = metrics(path, "score")["judge"]
    assert sum(figures["statuses"].values()) == judged == figures["requests"]
    # vLLM honours every mode (logprobs, the schema): nothing is asked again. With the tiny model a
    # structured judgement is "{" and newlines up to max_tokens (truncated, -1), and a logprob one has
    # its rating inside the token "Rating: [[k]]" (no alternatives after "[[": parsed from the text)
    assert not statuses & {"mode_ignored", "failed", "partial"}, (mode, figures["statuses"])
    scores = [a["preference_score"] for row in rows for a in row["annotations"] or []]
    assert len(scores) == judged and all(s == -1 or 0 <= s <= 10 for s in scores)
    if mode != "structured":
        assert sum(0 <= s <= 10 for s in scores) > judged // 2


def test_package_writes_the_release_from_the_vllm_responses(scored, tmp_path):
    mode, path = scored
    if mode != "parse":
        pytest.skip("one release is enough: the parse mode's")
    done = run_stage(path, "package", VARIANT)
    assert done.returncode == 0, ran(done)
    release = read_params(path)["paths"]["release"]
    files = sorted(p.name for p in (path / release / VARIANT).iterdir())
    assert any(name.endswith(".parquet") for name in files), files
    assert any(name.endswith(".jsonl.gz") for name in files), files


# --- what the engine work in progress promises (issue 27): separate, so each reports on its own ----


def test_a_second_score_run_sends_nothing_and_exits_0(scored):
    mode, path = scored
    done = run_stage(path, "score", VARIANT)
    assert done.returncode == 0, ran(done)
    figures = metrics(path, "score")["judge"]
    assert figures["sent"] == 0, (mode, figures)
    assert "loading" not in done.stderr, "a run with every judgement final loads no model"


@pytest.fixture
def long_generate(upstream, tmp_path) -> Path:
    """generate with longer replies (max_tokens 48, temperature 1.0) in small shards: the first answers
    come back within a second of its first engine call, and it generates for seconds more."""
    path = copy_workspace(upstream, tmp_path / "long")
    params = read_params(path)
    spec = params["models"][VARIANT]["generate"]
    spec["sampling"].update(max_tokens=48, temperature=1.0)
    spec["shard_size"] = 16
    write_params(path, params)
    return path


def test_ctrl_c_stops_generate_within_seconds_and_the_rerun_asks_only_the_unanswered(
    long_generate, generated
):
    path, log = long_generate, long_generate / "first.log"
    process = start_stage(path, log, "generate", VARIANT)
    wait_for(log, FIRST_CALL, process)
    time.sleep(1)
    children = descendants(process.pid)
    stopped = time.monotonic()
    process.send_signal(signal.SIGINT)
    wait_for(log, "aborted the", process, timeout=10)  # the requests in flight, within seconds
    aborted = time.monotonic() - stopped
    try:  # then vLLM shuts its engine core down (it waits up to 5 s for it), and the stage exits
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop_tree(process)
        raise
    took, output = time.monotonic() - stopped, log.read_text(errors="replace")
    assert process.returncode == 128 + signal.SIGINT and aborted < 10, (aborted, took, output[-4000:])
    assert "stopped by SIGINT: finished shards and every answer that came back are kept" in output
    time.sleep(2)
    assert alive(children) == [], "vLLM's engine processes outlive the stage"
    kept = _cached(path)  # how many came back within the second depends on the machine's load
    done = run_stage(path, "generate", VARIANT)
    assert done.returncode == 0, ran(done)
    figures = metrics(path, "generate")["generate"]
    # every request is asked once over both runs: what the first kept (finished shards, answers that
    # came back) is not sent again; the too-long one is never sent (its verdict kept or not)
    total = metrics(generated, "generate")["generate"]["requests"]
    too_long, left = figures["statuses"].get("skipped_too_long", 0), total - kept
    assert left - too_long <= figures["sent"] <= left, (kept, total, figures)
    assert _cached(path) == total


def _cached(path: Path) -> int:
    """Answers (and final verdicts) in workspace `path`'s response cache."""
    with closing(sqlite3.connect(path / read_params(path)["paths"]["response_cache"])) as db:
        return db.execute("SELECT count(*) FROM responses").fetchone()[0]


def test_a_killed_engine_core_stops_the_stage_naming_the_model(long_generate):
    path, log = long_generate, long_generate / "killed.log"
    process = start_stage(path, log, "generate", VARIANT)
    wait_for(log, FIRST_CALL, process)
    time.sleep(1)
    core = engine_core(process.pid)
    killed = time.monotonic()
    core.kill()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stop_tree(process)
        raise
    took, output = time.monotonic() - killed, log.read_text(errors="replace")
    assert process.returncode != 0 and took < 30, (took, output[-4000:])
    tail = output[-3000:]
    assert "EngineDown" in output or "engine died" in tail, tail
    assert TINY.split("/")[-1] in tail, tail
