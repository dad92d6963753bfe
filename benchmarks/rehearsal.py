"""A production rehearsal without a GPU: generate and score of one variant, composed from the
production configuration with `engine=openai`, against vLLM-like servers on 127.0.0.1
(benchmarks/fake_vllm.py: continuous-batching latency, lognormal response lengths, 429/500 retried,
persistent 500s and context-length 400s).

    python benchmarks/rehearsal.py [--instructions 20000] [--responses 10] [--workdir DIR]

One figure per line:
- peak RSS of the generate and score processes (local executor);
- the faults the servers injected against the failed requests the stages counted (must match);
- generate on the Ray executor (two replicas) with two servers against one: the speed-up;
- last, `ratio <x>`: generate's responses/s over a bare async client sending the same requests to the
  same kind of server with the same concurrency. Both rates are measured over the server's busy
  window (first reply to last), so process start-up is not counted for either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.fake_vllm import FakeVLLMServer, Faults  # noqa: E402
from stages.compose import compose_params  # noqa: E402
from stages.core.responses import requests_for  # noqa: E402

print = functools.partial(print, flush=True)  # figures appear as they are measured
VARIANT = "gemma3"
MODEL = "google/gemma-3-27b-it"  # the production generator and judge of gemma3: the served name
CONCURRENCY = 64  # requests in flight, pipeline and bare client alike
FAULTS = Faults(transient_429=0.02, transient_500=0.01, persistent_500=0.002, context_400=0.002)
# A server 10-50x faster than a GPU one so the rehearsal takes minutes: 1 ms a token, ~100 tokens
# a response, 64 sequences at once: about 580 responses/s per server.
SERVER = {"model": MODEL, "token_latency_s": 0.001, "first_token_s": 0.01, "median_tokens": 100}
SERVER |= {"sigma": 0.6, "max_num_seqs": 64}
WORDS = ["データ", "分析", "旅行", "料理", "歴史", "音楽", "科学", "健康"]
WORDS += ["仕事", "教育", "環境", "技術", "文化", "経済", "言語", "芸術"]


def translated(n: int) -> pa.Table:
    """n translated instructions, the columns generate and score read; a few empty or duplicate."""
    ids = [f"rehearsal-{i:07d}" for i in range(n)]
    ja = [
        f"{WORDS[i % 16]}と{WORDS[i * 7 % 16]}について、例を{i % 5 + 2}つ挙げて説明してください。({i})"
        for i in range(n)
    ]
    return pa.table(
        {
            "conversation_id": ids,
            "instruction": [f"Explain {WORDS[i % 16]} with {i % 5 + 2} examples. ({i})" for i in range(n)],
            "instruction_ja": ja,
            "empty_user_instruction_ja": [i % 500 == 7 for i in range(n)],
            "duplicate_user_instruction_ja": [ids[i - 1] if i % 1000 == 11 else None for i in range(n)],
            "translation_failed": [False] * n,
        }
    )


def workspace(work: Path, n: int, responses: int, urls: list[str], executor: str) -> None:
    overrides = [
        "engine=openai",
        "engine.base_url=[" + ",".join(f"'{u}'" for u in urls) + "]",
        f"engine.max_concurrency={CONCURRENCY}",
        "engine.max_retries=2",
        "engine.api_key_env=REHEARSAL_API_KEY",
        f"engine.executor={executor}",
        f"models.{VARIANT}.generate.n_ja={responses}",
        f"models.{VARIANT}.generate.sampling.max_tokens=1024",
        f"models.{VARIANT}.score.sampling.max_tokens=512",
    ]
    for role in ("generate", "score"):  # prompts are counted with a local tokenizer (no Hub access)
        overrides.append(f"models.{VARIANT}.{role}.llm.tokenizer={ROOT / 'data/sample/tiny-chat'}")
    params = yaml.safe_load(compose_params(overrides))
    params["engine"]["replicas"] = 2 if executor == "ray" else None
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (work / "data/private").mkdir(parents=True, exist_ok=True)
    pq.write_table(translated(n), work / "data/private/translated-ja.parquet")


def stage(work: Path, *args: str) -> tuple[float, float]:
    """Run `python -m args...` in `work` (its log in work/<stage>.log); return (wall s, peak RSS MB)."""
    log = work / f"{args[0].rsplit('.', 1)[-1]}.log"
    began = time.perf_counter()
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=work, stdout=sink, stderr=sink)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed; its log, {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - began, usage.ru_maxrss / 1024


def window_rate(stats: dict) -> float:
    return stats["completions"] / max(stats["last_at"] - stats["first_at"], 1e-9)


def failed(work: Path) -> int:
    """Requests the stages counted as failed: generate's and the judge's."""
    generated = pq.read_table(work / f"data/generated/{VARIANT}.parquet", columns=["status_ja"])
    scored = pq.read_table(work / f"data/scored/{VARIANT}.parquet", columns=["judge_status"])
    judge = pc.list_flatten(scored["judge_status"])
    return (
        pc.sum(pc.equal(generated["status_ja"], "failed")).as_py() + pc.sum(pc.equal(judge, "failed")).as_py()
    )


async def bare_client(url: str, n: int, responses: int) -> None:
    """The same generate requests through a bare AsyncOpenAI client, CONCURRENCY in flight."""
    import openai

    from stages.core.params import validate

    params = validate(yaml.safe_load(compose_params([f"models.{VARIANT}.generate.n_ja={responses}"])))
    spec = params.models[VARIANT].generate
    rows = translated(n).to_pylist()
    _, requests = requests_for(rows, "ja", responses, spec, params.seed)
    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=2)
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(request) -> None:
        async with slots:
            with contextlib.suppress(openai.APIError):  # failures are counted by the server
                await client.chat.completions.create(
                    model=MODEL,
                    messages=request.messages,
                    n=request.n,
                    seed=request.seed,
                    temperature=spec.sampling.temperature,
                    max_tokens=1024,
                    logprobs=True,
                )

    await asyncio.gather(*(one(r) for r in requests))
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=20_000)
    parser.add_argument("--responses", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given; a temporary dir otherwise")
    args = parser.parse_args()
    os.environ["REHEARSAL_API_KEY"] = "rehearsal"
    os.environ["HF_HUB_OFFLINE"] = "1"
    n, r = args.instructions, args.responses
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as tmp:
        base = (args.workdir or Path(tmp)).resolve()

        # 1. generate + score on the local executor, one server with faults: RSS and failure accounting
        work = base / "local"
        work.mkdir(parents=True, exist_ok=True)
        with FakeVLLMServer(**SERVER, faults=FAULTS) as server:
            workspace(work, n, r, [server.base_url], "local")
            gen_s, gen_rss = stage(work, "stages.generate", VARIANT)
            gen_stats = server.stats()
            server.reset_stats()
            score_s, score_rss = stage(work, "stages.score", VARIANT)
            score_stats = server.stats()
        injected = gen_stats["failing_requests"] + score_stats["failing_requests"]
        counted = failed(work)
        pipeline_rate = window_rate(gen_stats)
        print(f"instructions {n} responses_per_instruction {r} completions {gen_stats['completions']}")
        print(f"generate wall_s {gen_s:.1f} peak_rss_mb {gen_rss:.0f}")
        print(f"score wall_s {score_s:.1f} peak_rss_mb {score_rss:.0f}")
        print(f"peak_rss_mb {max(gen_rss, score_rss):.0f}")
        verdict = "match" if injected == counted else "MISMATCH"
        print(f"faults injected {injected} counted {counted} {verdict}")

        # 2. the bare client against the same kind of server (same faults, same requests)
        with FakeVLLMServer(**SERVER, faults=FAULTS) as server:
            began = time.perf_counter()
            asyncio.run(bare_client(server.base_url, n, r))
            bare_s, bare_rate = time.perf_counter() - began, window_rate(server.stats())
        print(f"bare client wall_s {bare_s:.1f} responses_per_s {bare_rate:.0f}")
        print(f"pipeline generate responses_per_s {pipeline_rate:.0f}")

        # 3. generate on Ray (two replicas): two servers against one
        rates = {}
        for servers in (1, 2):
            work = base / f"ray-{servers}"
            work.mkdir(parents=True, exist_ok=True)
            with FakeVLLMServer(**SERVER) as a, FakeVLLMServer(**SERVER) as b:
                urls = [a.base_url, b.base_url][:servers]
                workspace(work, n, r, urls, "ray")
                wall, _ = stage(work, "stages.generate", VARIANT)
                stats = [a.stats(), b.stats()][:servers]
            first = min(s["first_at"] for s in stats)
            last = max(s["last_at"] for s in stats)
            rates[servers] = sum(s["completions"] for s in stats) / (last - first)
            print(f"ray servers {servers} wall_s {wall:.1f} responses_per_s {rates[servers]:.0f}")
        print(f"ray two servers over one speedup {rates[2] / rates[1]:.2f}")
        print(f"ratio {pipeline_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
