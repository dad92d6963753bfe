"""A production rehearsal without a GPU: generate and score of one variant, composed from the
production configuration with `engine=openai`, against vLLM-like servers on 127.0.0.1
(benchmarks/fake_vllm.py: continuous-batching latency, lognormal response lengths, 429/500 retried,
persistent 500s and context-length 400s), a base_url where nothing listens, and a server that ignores n.

    python benchmarks/rehearsal.py [--instructions 20000] [--responses 10] [--faults KIND=SHARE,...]
                                   [--no-ray] [--workdir DIR]

It measures how failures are counted, not the failure ceiling: the default ceiling (1% of a stage's
requests unfinished) could stop a stage with the injected mix, so models.<variant>.generate and .score
max_failure_rate are raised to three times the mix's share of requests that fail for good, plus 0.05.

One figure per line:
- peak RSS of the generate and score processes (local executor);
- `faults injected <i> counted <c> match`: the requests the servers failed for good (persistent 500s,
  context-length 400s) against the requests the stages recorded with any status but ok (failed,
  skipped_too_long, partial, mode_ignored); the transient 429s and 500s are retried away;
- `dead server <url> exit_status <s> wall_s <t> url_named yes`: generate with a base_url where nothing
  listens (next to a live one) exits non-zero within seconds, its stderr naming that URL;
- `one-choice server ... responses <r> expected <e> match`: generate against a server that ignores n
  (as HF's `transformers serve` does) still gets n responses per instruction asked;
- generate on the Ray executor (two replicas) with two servers against one: the speed-up (not
  with --no-ray);
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
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.fake_vllm import FakeVLLMServer, Faults  # noqa: E402
from stages.core.config.compose import compose_params  # noqa: E402
from stages.core.config.params import validate  # noqa: E402
from stages.core.rows.responses import requests_for  # noqa: E402

print = functools.partial(print, flush=True)  # figures appear as they are measured
VARIANT = "gemma3"
MODEL = "google/gemma-3-27b-it"  # the production generator and judge of gemma3: the served name
CONCURRENCY = 64  # requests in flight, pipeline and bare client alike
FAULTS = "transient_429=0.02,transient_500=0.01,persistent_500=0.002,context_400=0.002"
ONE_CHOICE_ROWS = 2000  # instructions of the one-choice case: n requests each, so fewer than the rest
DEAD_SERVER_S = 30  # the dead-server case prints generate's stderr if it takes longer (or exits 0)
# A server 10-50x faster than a GPU one so the rehearsal takes minutes: 1 ms a token, ~100 tokens
# a response, 64 sequences at once: about 580 responses/s per server.
SERVER = {"model": MODEL, "token_latency_s": 0.001, "first_token_s": 0.01, "median_tokens": 100}
SERVER |= {"sigma": 0.6, "max_num_seqs": 64}
WORDS = ["データ", "分析", "旅行", "料理", "歴史", "音楽", "科学", "健康"]
WORDS += ["仕事", "教育", "環境", "技術", "文化", "経済", "言語", "芸術"]


def translated(n: int) -> pa.Table:
    """n translated instructions, the columns generate (with its annotation table) and score read; a few
    empty or duplicate."""
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
            "is_template_instruction": pa.nulls(n, pa.string()),  # generate's annotation table reads it
            "translation_failed": [False] * n,
        }
    )


def ceiling(faults: Faults) -> float:
    """The failure ceiling the rehearsal's stages get: well above the share of requests failed for good."""
    return min(1.0, 3 * (faults.persistent_500 + faults.context_400) + 0.05)


def workspace(
    work: Path, n: int, responses: int, urls: list[str], executor: str, faults: Faults | None = None
) -> None:
    """params.yaml for generate and score of VARIANT against `urls`, and its translated input."""
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
        # our judge template: the rehearsal has no fetched release (the published prompt's file)
        f"models.{VARIANT}.score.prompt=judge-0to10",
        f"models.{VARIANT}.annotations=ours",  # nor the published file whose flags `published` takes
    ]
    for role in ("generate", "score"):  # prompts are counted with a local tokenizer (no Hub access)
        overrides.append(f"models.{VARIANT}.{role}.llm.tokenizer={ROOT / 'data/sample/tiny-chat'}")
    params = yaml.safe_load(compose_params(overrides))
    params["engine"]["replicas"] = 2 if executor == "ray" else None
    variant = params["models"][VARIANT]
    for role in ("generate", "score"):
        variant[role]["max_failure_rate"] = ceiling(faults or Faults())
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    checked = validate(params, work / "params.yaml")
    out = work / checked.paths.translated_of(checked.models[VARIANT].subset)
    out.parent.mkdir(parents=True, exist_ok=True)
    (work / checked.paths.released).mkdir(parents=True, exist_ok=True)  # score's input (its judge prompt)
    pq.write_table(translated(n), out)


def launch(work: Path, *args: str) -> tuple[int, float, float, str]:
    """Run `python -m args...` in `work` (stderr, where stages log, in work/<stage>.log); return
    (exit status, wall s, peak RSS MB, stderr)."""
    log = work / f"{args[0].rsplit('.', 1)[-1]}.log"
    began = time.perf_counter()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=work, stdout=subprocess.DEVNULL, stderr=sink
        )
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - began
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024, log.read_text()


def stage(work: Path, *args: str) -> tuple[float, float]:
    """Run a stage that must succeed; return (wall s, peak RSS MB)."""
    status, wall, rss, log = launch(work, *args)
    if status != 0:
        raise RuntimeError(f"{' '.join(args)} exited {status}; its stderr (in {work}):\n{log[-3000:]}")
    return wall, rss


def window_rate(stats: dict) -> float:
    return stats["completions"] / max(stats["last_at"] - stats["first_at"], 1e-9)


def statuses(work: Path) -> Counter:
    """Every request status the stages recorded: generate's and the judge's (null: not asked)."""
    generated = pq.read_table(work / f"data/generated/{VARIANT}.parquet", columns=["status_ja"])
    scored = pq.read_table(work / f"data/scored/{VARIANT}.parquet", columns=["judge_status"])
    judge = pc.list_flatten(scored["judge_status"])
    return Counter(s for s in [*generated["status_ja"].to_pylist(), *judge.to_pylist()] if s is not None)


def rehearse_faults(base: Path, n: int, r: int, faults: Faults) -> float:
    """Generate + score on the local executor, one server with faults; return generate's rate."""
    work = base / "local"
    work.mkdir(parents=True, exist_ok=True)
    with FakeVLLMServer(**SERVER, faults=faults) as server:
        workspace(work, n, r, [server.base_url], "local", faults)
        gen_s, gen_rss = stage(work, "stages.generate", VARIANT)
        gen_stats = server.stats()
        server.reset_stats()
        score_s, score_rss = stage(work, "stages.score", VARIANT)
        score_stats = server.stats()
    injected = Counter(gen_stats["failing_by_fault"]) + Counter(score_stats["failing_by_fault"])
    injected["too_long"] = gen_stats["too_long"] + score_stats["too_long"]  # a prompt truly too long
    counted = statuses(work)
    del counted["ok"]
    print(f"instructions {n} responses_per_instruction {r} completions {gen_stats['completions']}")
    print(f"generate wall_s {gen_s:.1f} peak_rss_mb {gen_rss:.0f}")
    print(f"score wall_s {score_s:.1f} peak_rss_mb {score_rss:.0f}")
    print(f"peak_rss_mb {max(gen_rss, score_rss):.0f}")
    print(f"transient faults injected {gen_stats['transient'] + score_stats['transient']} retried away")
    print(f"faults by kind injected {_kinds(injected)} counted {_kinds(counted)}")
    total, found = sum(injected.values()), sum(counted.values())
    print(f"faults injected {total} counted {found} {'match' if total == found else 'MISMATCH'}")
    return window_rate(gen_stats)


def _kinds(counts: Counter) -> str:
    return " ".join(f"{kind} {n}" for kind, n in sorted(counts.items()) if n) or "none"


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (the OS's pick, released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rehearse_dead_server(base: Path, r: int) -> None:
    """Generate with one live server and one base_url where nothing listens: a non-zero exit within
    seconds, its stderr naming the dead URL."""
    work = base / "dead-server"
    work.mkdir(parents=True, exist_ok=True)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with FakeVLLMServer(**SERVER) as live:
        workspace(work, 100, r, [live.base_url, dead], "local")
        status, wall, _, log = launch(work, "stages.generate", VARIANT)
    named = "yes" if any(dead in line for line in log.splitlines() if line.startswith("error:")) else "NO"
    print(f"dead server {dead} exit_status {status} wall_s {wall:.1f} url_named {named}")
    if status == 0 or named != "yes" or wall > DEAD_SERVER_S:
        print(f"dead server: generate's stderr (in {work}):\n{log[-3000:]}")


def rehearse_one_choice(base: Path, n: int, r: int) -> None:
    """Generate against a server that ignores n and answers one choice: still n responses for each
    instruction asked (the engine asks for the missing choices one at a time)."""
    work = base / "one-choice"
    work.mkdir(parents=True, exist_ok=True)
    with FakeVLLMServer(**SERVER, one_choice=True) as server:
        workspace(work, n, r, [server.base_url], "local")
        wall, _ = stage(work, "stages.generate", VARIANT)
        requests = server.stats()["requests"]
    out = pq.read_table(work / f"data/generated/{VARIANT}.parquet", columns=["responses_ja", "status_ja"])
    asked = out.num_rows - out["status_ja"].null_count
    got = pc.sum(pc.list_value_length(out["responses_ja"])).as_py() or 0
    verdict = "match" if got == asked * r else "MISMATCH"
    print(f"one-choice server wall_s {wall:.1f} requests {requests} instructions_asked {asked}")
    print(f"one-choice server responses {got} expected {asked * r} {verdict}")


async def bare_client(url: str, n: int, responses: int) -> None:
    """The same generate requests through a bare AsyncOpenAI client, CONCURRENCY in flight."""
    import openai

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


def rehearse_ray(base: Path, n: int, r: int) -> float:
    """Generate on Ray (two replicas) with two servers against one; return the speed-up."""
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
    return rates[2] / rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=20_000)
    parser.add_argument("--responses", type=int, default=10)
    parser.add_argument("--faults", type=Faults.parse, default=Faults.parse(FAULTS), help=f"default {FAULTS}")
    parser.add_argument("--no-ray", action="store_true", help="skip generate on the Ray executor")
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given; a temporary dir otherwise")
    args = parser.parse_args()
    os.environ["REHEARSAL_API_KEY"] = "rehearsal"
    os.environ["HF_HUB_OFFLINE"] = "1"
    n, r = args.instructions, args.responses
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as tmp:
        base = (args.workdir or Path(tmp)).resolve()
        pipeline_rate = rehearse_faults(base, n, r, args.faults)
        rehearse_dead_server(base, r)
        rehearse_one_choice(base, min(n, ONE_CHOICE_ROWS), r)
        with FakeVLLMServer(**SERVER, faults=args.faults) as server:  # same faults, same requests
            began = time.perf_counter()
            asyncio.run(bare_client(server.base_url, n, r))
            bare_s, bare_rate = time.perf_counter() - began, window_rate(server.stats())
        print(f"bare client wall_s {bare_s:.1f} responses_per_s {bare_rate:.0f}")
        print(f"pipeline generate responses_per_s {pipeline_rate:.0f}")
        if not args.no_ray:
            print(f"ray two servers over one speedup {rehearse_ray(base, n, r):.2f}")
        print(f"ratio {pipeline_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
