"""generate@gemma3 with engine=vllm, through the project's executor and engine (shards, checkpoints,
the response cache), against a bare `LLM.chat` over the same requests, on one loaded vLLM (its CPU build
with the bundled tiny model; `make check-vllm` installs it in .venv-vllm).

    .venv-vllm/bin/python benchmarks/vllm_generate.py [--max-tokens 64] [--temperature 1.0] [--rounds 5]
        [--workdir DIR]

It builds the sample's upstream (fetch, decrypt, translate: no model) with engine=vllm, loads the
generator once, then per round runs the stage in this process (`stages.generate`, in a fresh copy:
no checkpoint, no cache) and replays the requests it sent through the same `vllm.LLM`: once as one
`LLM.chat` call (bare), once as one call per shard (bare per shard: what draining each shard before
the next costs vLLM itself). It prints the medians and `ratio <bare / stage>` (target >= 0.9), and
whether the bare replies equal the stage's (the same seeds; shards may reach the engine in any
order)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from stages.core.config.params import load_params  # noqa: E402
from stages.core.engines import ChatRequest, apply_chat_rules, make_engine  # noqa: E402
from tests.vllm_cpu import SUBSET, UPSTREAM, VARIANT, VLLM_ENV, sample_params, workspace  # noqa: E402

print = functools.partial(print, flush=True)  # figures appear as they are measured
SHARD_SIZE = 64  # the sample profile's generate shards: 5 for the sample's 319 rows


def upstream(path: Path, max_tokens: int, temperature: float) -> Path:
    """The sample's fetch, decrypt and translate of gemma3's subset, as stage processes."""

    def edit(params: dict) -> None:
        params["models"][VARIANT]["generate"]["sampling"].update(
            max_tokens=max_tokens, temperature=temperature
        )
        params["models"][VARIANT]["generate"]["shard_size"] = SHARD_SIZE

    path = workspace(path, sample_params(edit=edit))
    for args in UPSTREAM:
        command = [sys.executable, "-m", f"stages.{args[0]}", *args[1:]]
        subprocess.run(command, cwd=path, env=os.environ, check=True, capture_output=True)
    return path


def run_stage(engine, source: Path, target: Path) -> tuple[float, list]:
    """generate@gemma3 in this process on `engine` (already loaded), in a fresh copy of `source`;
    its seconds and the (requests, sampling) of each engine call."""
    from stages import generate
    from stages.core.runtime import executors

    shutil.copytree(source, target)
    calls, chat = [], type(engine)._chat
    engine._chat = lambda requests, sampling: (
        calls.append((requests, sampling)) or chat(engine, requests, sampling)
    )
    engine.unload = lambda: None  # kept loaded across rounds; the executor's close unloads it
    executors.make_engine = lambda llm, options: engine
    here, argv = Path.cwd(), sys.argv
    os.chdir(target)
    sys.argv = ["stages.generate", VARIANT]
    try:
        began = time.perf_counter()
        generate.main()
        seconds = time.perf_counter() - began
    finally:
        os.chdir(here)
        sys.argv = argv
        engine._loaded = True  # the executor's close marked it unloaded
    return seconds, calls


def bare(llm, spec, calls: list, per_shard: bool) -> tuple[float, list]:
    """The same requests through `llm.chat` alone: one call, or one per recorded engine call."""
    import vllm

    def params(request: ChatRequest, sampling) -> vllm.SamplingParams:
        return vllm.SamplingParams(
            n=request.n,
            seed=request.seed,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
        )

    batches = calls if per_shard else [([r for rs, _ in calls for r in rs], calls[0][1])]
    began, texts = time.perf_counter(), []
    for requests, sampling in batches:
        chats = [apply_chat_rules(r.messages, spec) for r in requests]
        outputs = llm.chat(chats, [params(r, sampling) for r in requests], use_tqdm=False)
        texts += [[o.text for o in out.outputs] for out in outputs]
    return time.perf_counter() - began, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="generate's max_tokens")
    parser.add_argument("--temperature", type=float, default=1.0, help="generate's (the sample's: 0.6)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    os.environ.update(VLLM_ENV)
    logging.disable(logging.INFO)  # the stage's and vLLM's progress lines
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vllm-generate-"))
    source = upstream(work / "upstream", args.max_tokens, args.temperature)
    params = load_params(source / "params.yaml")
    spec = params.models[VARIANT].generate
    began = time.perf_counter()
    engine = make_engine(spec.llm, params.engine)
    engine.load()
    print(f"vllm load: {time.perf_counter() - began:.1f} s ({spec.llm.model}, subset {SUBSET})")
    stage, in_engine, one, sharded, equal = [], [], [], [], True
    for i in range(args.rounds):
        seconds, calls = run_stage(engine, source, work / f"round-{i}")
        stage.append(seconds)
        figures = json.loads((work / f"round-{i}/data/metrics/generate-{VARIANT}.json").read_text())
        in_engine.append(figures["generate"]["engine_seconds"])
        ours = [[c["content"] for c in r["responses_ja"] or []] for r in _rows(work / f"round-{i}")]
        one_s, texts = bare(engine._llm, spec.llm, calls, per_shard=False)
        one.append(one_s)
        sharded.append(bare(engine._llm, spec.llm, calls, per_shard=True)[0])
        equal &= sorted(map(tuple, filter(None, ours))) == sorted(map(tuple, filter(None, texts)))
    requests = sum(len(rs) for rs, _ in calls)
    tokens = figures["generate"]["completion_tokens"]
    print(
        f"requests: {requests:,} in {len(calls)} engine calls, max_tokens {args.max_tokens}, "
        f"temperature {args.temperature}, {tokens:,} completion tokens"
    )
    stage_s, engine_s, one_s, sharded_s = (statistics.median(x) for x in (stage, in_engine, one, sharded))
    print(
        f"stage (executor, shards, checkpoints, cache): {stage_s:.2f} s, of which in engine calls "
        f"{engine_s:.2f} s (medians of {args.rounds})"
    )
    print(f"bare LLM.chat, one call: {one_s:.2f} s; one call per shard: {sharded_s:.2f} s")
    print(f"shard drain: {sharded_s - one_s:+.2f} s ({(sharded_s - one_s) / one_s:+.0%} of one call)")
    print(f"replies equal to bare: {'yes' if equal else 'no'}")
    del engine.unload  # the real one again
    engine.unload()
    print(f"ratio {one_s / stage_s:.2f}")


def _rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path / f"data/generated/{VARIANT}.parquet").to_pylist()


if __name__ == "__main__":
    main()
