"""Executors: the Ray pool gives the local executor's output, a worker killed mid-run costs only its
shards, a replica dying past its retries stops the stage at once, checkpoints live on S3 as well as
on disk, score loads each distinct model once, and every engine key is overridden without `+`."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import time
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.core.config.compose import CONF_DIR, compose_params
from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling
from stages.core.config.errors import PipelineError
from stages.core.rows.responses import GENERATED, generate_table
from stages.core.runtime.executors import engine_pool
from stages.core.runtime.shards import slices
from stages.core.storage.parquet import ENGINE_METADATA
from tests.conftest import ROOT, SAMPLE, run_stage, set_params
from tests.s3 import CREDENTIALS, moto_server

TINY_LLM = LLMSpec(model=str(SAMPLE / "tiny-chat"), max_model_len=4096, dtype="float32")
ENGINES = sorted(p.stem for p in (CONF_DIR / "engine").glob("*.yaml"))
# a value other than every conf/engine file's for each EngineParams field but the group's `backend`
ENGINE_OVERRIDES = {
    "batch_size": 7,
    "executor": "ray",
    "ray_address": "auto",
    "replicas": 2,
    "shards_in_flight": 3,
    "cache": "read",
    "base_url": "http://gpu1:8000/v1",
    "api_key_env": "MY_KEY",
    "max_concurrency": 5,
    "max_retries": 1,
    "request_timeout": 9.5,
    "max_consecutive_failures": 4,
    "ray_max_retries": 5,
    "gpu_memory_utilization": 0.5,
}
NOT_SCHEMA_DEFAULT = {("openai", "max_concurrency"), ("openai", "base_url")}  # the openai file's own


def _rows(n: int) -> pa.Table:
    return pa.table(
        {
            "conversation_id": [f"c{i:03d}" for i in range(n)],
            "instruction": [f"Say something about number {i}." for i in range(n)],
            "instruction_ja": [f"数字{i}について何か言ってください。" for i in range(n)],
            "empty_user_instruction_ja": [i == 3 for i in range(n)],
            "duplicate_user_instruction_ja": [None] * n,
            "translation_failed": [False] * n,
        }
    )


def _spec():
    from stages.core.config.variant_params import GenerateParams

    return GenerateParams(
        llm=TINY_LLM,
        n_ja=2,
        n_en=1,
        sampling=Sampling(temperature=0.7, max_tokens=6),
        shard_size=4,
    )


def _generate(
    options: EngineParams, tmp: Path, work=None, cache: Path | None = None, counts=None
) -> pa.Table:
    spec, out = _spec(), tmp / "out.parquet"
    with engine_pool(spec.llm, options, cache) as pool:
        pool.run_sharded(
            work or functools.partial(generate_table, spec=spec, seed=7),
            slices(_rows(12), spec.shard_size),
            out=out,
            schema=GENERATED,
            checkpoints=tmp / "checkpoints",
            stage="generate@t",
            key="k",
            role="generate",
        )
        if counts is not None:
            counts.update(pool.request_counts())
    return pq.read_table(out)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def test_ray_replicas_give_the_local_executors_output(tmp_path, ray_local):
    local = _generate(EngineParams(backend="transformers", batch_size=8), tmp_path / "local")
    ray = _generate(
        EngineParams(backend="transformers", batch_size=8, executor="ray", replicas=2), tmp_path / "ray"
    )
    assert ray.equals(local)
    assert local["status_ja"].to_pylist().count("ok") == 11  # row 3 has an empty instruction
    # the replicas share the response cache file of this host: a second run sends nothing
    options = EngineParams(backend="transformers", batch_size=8, executor="ray", replicas=2)
    first, again = {}, {}
    _generate(options, tmp_path / "cached-1", cache=tmp_path / "c.sqlite", counts=first)
    cached = _generate(options, tmp_path / "cached-2", cache=tmp_path / "c.sqlite", counts=again)
    assert cached.equals(local)
    assert (first["cache_misses"], again["cache_hits"], again["cache_misses"]) == (22, 22, 0)
    assert b'"backend": "transformers"' in ray.schema.metadata[f"{ENGINE_METADATA}generate".encode()]


def kill_once(engine, shard: pa.Table, *, marks: str, victim: str, spec, seed: int) -> pa.Table:
    """generate_table, recording each computation; the first time it meets `victim`, the worker
    process is killed (SIGKILL) mid-shard."""
    first = shard["conversation_id"][0].as_py()
    Path(marks, f"{first}.{os.getpid()}.{len(os.listdir(marks))}").touch()
    if first == victim and not Path(marks, "killed").exists():
        Path(marks, "killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return generate_table(engine, shard, spec, seed)


def test_a_ray_worker_killed_mid_run_costs_only_its_shards(tmp_path, ray_local):
    marks = tmp_path / "marks"
    marks.mkdir()
    options = EngineParams(
        backend="transformers", batch_size=8, executor="ray", replicas=2, shards_in_flight=1
    )
    work = functools.partial(kill_once, marks=str(marks), victim="c004", spec=_spec(), seed=7)
    got = _generate(options, tmp_path / "ray", work)
    assert got.equals(_generate(EngineParams(backend="transformers", batch_size=8), tmp_path / "local"))
    runs = [p.name.split(".")[0] for p in marks.iterdir() if p.name != "killed"]
    assert sorted(runs) == ["c000", "c004", "c004", "c008"]  # only the killed shard ran twice


def kill_always(engine, shard: pa.Table, *, victim: str, spec, seed: int) -> pa.Table:
    """generate_table, except that a shard holding `victim` kills its worker every time (a poisoned
    shard: an input that crashes the engine process)."""
    if victim in shard["conversation_id"].to_pylist():
        os.kill(os.getpid(), signal.SIGKILL)
    return generate_table(engine, shard, spec, seed)


def test_a_shard_that_kills_its_replica_every_time_fails_the_stage_by_name(tmp_path, ray_local):
    options = EngineParams(
        backend="transformers",
        batch_size=8,
        executor="ray",
        replicas=1,
        shards_in_flight=1,
        ray_max_retries=1,
    )
    work = functools.partial(kill_always, victim="c005", spec=_spec(), seed=7)
    with pytest.raises(PipelineError, match=r"shard 00001: its Ray replica died and was restarted 1 times"):
        _generate(options, tmp_path / "ray", work)
    done = sorted(p.name for p in (tmp_path / "ray" / "checkpoints" / "generate@t" / "k").iterdir())
    assert "00000.parquet" in done and "00001.parquet" not in done  # finished shards are kept


def exit_always(engine, shard: pa.Table, *, slow: str) -> pa.Table:
    """Ends its replica's process every time (os._exit, as a crashing engine library does); the
    shard starting with `slow` first takes a long while, as a big shard on a healthy replica does."""
    if shard["conversation_id"][0].as_py() == slow:
        time.sleep(30)
    os._exit(1)


def test_a_replica_dying_past_its_retries_stops_the_stage_at_once_without_a_traceback(
    tmp_path, ray_local, caplog, capfd
):
    """Shard 1's replica dies on every try while shard 0 runs long on the other replica: the stage
    fails by shard 1's name within seconds (not when shard 0 ends), no answer is handed to a future
    that already has one (no InvalidStateError), and closing ends the busy replica at once."""
    options = EngineParams(
        backend="transformers",
        batch_size=8,
        executor="ray",
        replicas=2,
        shards_in_flight=1,
        ray_max_retries=0,  # one death is past the retries: the test stays short
    )
    began = time.monotonic()
    with pytest.raises(PipelineError) as err:
        _generate(options, tmp_path / "ray", functools.partial(exit_always, slow="c000"))
    elapsed = time.monotonic() - began
    time.sleep(2)  # the killed replica's task ends after the stage failed: nothing may be logged
    logged = caplog.text + "".join(capfd.readouterr())
    message = str(err.value)
    assert message.startswith("shard 00001: its Ray replica died and was restarted 0 times"), message
    assert "(engine.ray_max_retries=0)" in message and "\n" not in message
    assert "InvalidStateError" not in logged and "Traceback" not in logged, logged
    assert elapsed < 20, elapsed  # before: 30 s and more, waiting for shard 0


def test_ray_starts_a_replica_per_cpu_by_default_and_records_their_library_versions(tmp_path, ray_local):
    """replicas null, for a backend that takes no GPU: one replica per CPU of the cluster (2 here)."""
    from stages.core.runtime.executors import RayExecutor

    options = EngineParams(backend="transformers", batch_size=8, executor="ray")
    pool = RayExecutor(TINY_LLM, options)
    try:
        found = pool.identity()
        replica = ray_local.get(pool._actors[1].identity.remote())
    finally:
        pool.close()
    assert len(pool._actors) == ray_local.cluster_resources()["CPU"] == 2
    assert found == replica and found["libraries"]["torch"] == metadata.version("torch")


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_key_is_in_each_engine_file_and_overridden_without_a_plus(engine):
    """Hydra refuses `key=value` for a key conf/ lacks (it wants `+key=value`): each conf/engine file
    holds every EngineParams field, with the schema's default where the schema has one."""
    assert set(EngineParams.model_fields) == {"backend", *ENGINE_OVERRIDES}  # a new field: add it here
    conf = yaml.safe_load((CONF_DIR / "engine" / f"{engine}.yaml").read_text(encoding="utf-8"))
    assert set(conf) == set(EngineParams.model_fields), f"conf/engine/{engine}.yaml"
    for name, field in EngineParams.model_fields.items():
        if not field.is_required() and (engine, name) not in NOT_SCHEMA_DEFAULT:
            assert conf[name] == field.default, f"conf/engine/{engine}.yaml: {name}"
    overrides = [f"engine={engine}", *(f"engine.{k}={v}" for k, v in ENGINE_OVERRIDES.items())]
    assert yaml.safe_load(compose_params(overrides))["engine"] == {"backend": engine, **ENGINE_OVERRIDES}


def test_each_variants_score_mode_is_overridden_without_a_plus():
    models = yaml.safe_load(compose_params([]))["models"]
    overrides = [
        f"models.{m}.score.{k}={v}" for m in models for k, v in (("mode", "logprob"), ("top_logprobs", 5))
    ]
    composed = yaml.safe_load(compose_params(overrides))["models"]
    assert {(m, v["score"]["mode"], v["score"]["top_logprobs"]) for m, v in composed.items()} == {
        (m, "logprob", 5) for m in models
    }


def test_checkpoints_on_s3_are_reused_by_a_rerun(tmp_path, monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with moto_server() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckpt")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        calls = []

        def counted(engine, shard, **kw):
            calls.append(shard["conversation_id"][0].as_py())
            return generate_table(engine, shard, **kw)

        spec = _spec()
        options = EngineParams(backend="transformers", batch_size=8)
        for _ in range(2):
            with engine_pool(spec.llm, options) as pool:
                pool.run_sharded(
                    functools.partial(counted, spec=spec, seed=7),
                    slices(_rows(8), spec.shard_size),
                    out=tmp_path / "out.parquet",
                    schema=GENERATED,
                    checkpoints="s3://ckpt/checkpoints",
                    stage="generate@t",
                    key="k",
                    role="generate",
                )
        s3 = boto3.client("s3", endpoint_url=endpoint)
        keys = s3.list_objects_v2(Bucket="ckpt")["Contents"]
        record = s3.get_object(Bucket="ckpt", Key="checkpoints/generate@t/progress.json")["Body"].read()
        record = json.loads(record)
    assert calls == ["c000", "c004"]  # the second run read both shards back from S3
    assert sorted(k["Key"] for k in keys) == [
        "checkpoints/.lmsys-synth-checkpoints",  # the store's mark: prune deletes only under it
        "checkpoints/generate@t/k/00000.parquet",
        "checkpoints/generate@t/k/00001.parquet",
        "checkpoints/generate@t/k/_complete",  # the mark `python -m stages.core.runtime.shards prune` reads
        "checkpoints/generate@t/progress.json",  # the last run's progress (python -m stages.status)
    ]
    assert (record["state"], record["shards_done"], record["shards_reused"]) == ("done", 2, 2)
    assert (record["requests"]["requests"], record["requests"]["sent"]) == (0, 0)  # nothing asked again


def test_gemma2_score_loads_its_one_model_once(workspace, monkeypatch, fake_engine):
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    run_stage(monkeypatch, "generate", "gemma2")
    fake_engine.loads = 0
    run_stage(monkeypatch, "score", "gemma2")  # the judge pass, then the second turn, same model
    assert fake_engine.loads == 1
    purposes = {m["content"][:40] for r in fake_engine.requests for m in r.messages[-1:]}
    assert any("impartial judge" in p or "Please act" in p for p in purposes)
    scored = pq.read_table(workspace / "data/scored/gemma2.parquet")
    assert scored["multiturn_status"].to_pylist().count("ok") > 0


def test_a_judge_other_than_the_generator_runs_in_its_own_process(workspace, monkeypatch, fake_engine, capfd):
    """Each distinct model is loaded once, the judge in a process of its own (its memory goes back
    to the system before the generator loads); here the judge is the real tiny model."""

    def judge_other(data):
        data["models"]["gemma2"]["generate"]["n_ja"] = 1  # fewer judge requests for the real model
        judge = data["models"]["gemma2"]["score"]
        judge["llm"]["max_model_len"] = 2048  # another model recipe than the generator's
        judge["sampling"]["max_tokens"] = 1

    set_params(workspace, judge_other)
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    run_stage(monkeypatch, "generate", "gemma2")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    fake_engine.loads = 0
    run_stage(monkeypatch, "score", "gemma2")
    # this process made an engine for the generator only (the random tiny judge rated nothing, so the
    # second turn had no best response to continue and never needed to load it)
    assert (fake_engine.llm.max_model_len, fake_engine.loads) == (4096, 0)
    loads = re.findall(r"loading (\S+) \(transformers\) in process (\d+)", capfd.readouterr().err)
    assert [model for model, _ in loads] == ["data/sample/tiny-chat"]  # the judge, in the child
    assert int(loads[0][1]) != os.getpid()
    scored = pq.read_table(workspace / "data/scored/gemma2.parquet")
    # one token of judgement: a rating token ("Rating: [[7]]" is one in the tiny vocabulary) or a cut one
    assert set(scored["judge_status"].combine_chunks().flatten().to_pylist()) <= {"ok", "truncated"}


def test_paths_checkpoint_store_moves_the_shards_of_every_engine_stage(workspace, monkeypatch, fake_engine):
    store = workspace / "shared-store"
    set_params(workspace, lambda data: data["paths"].update(checkpoint_store=str(store)))
    for stage in ("fetch", "decrypt", "translate"):
        run_stage(monkeypatch, stage)
    run_stage(monkeypatch, "generate", "gemma3")
    run_stage(monkeypatch, "score", "gemma3")
    assert {p.name for p in store.iterdir()} == {
        ".lmsys-synth-checkpoints",  # the store's mark (prune)
        "translate@ja",
        "translate@ja+unsafe",
        "generate@gemma3",
        "score@gemma3",
    }
    assert not list((workspace / "data/.checkpoints").glob("*@gemma3"))  # intermediate files only
