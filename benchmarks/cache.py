"""The response cache at production size: inserts and lookups at 10 million entries, two writer
processes at once, against the per-request cost of the engine bookkeeping it sits in.

    python benchmarks/cache.py [--entries 10000000] [--probe 200000] [--value-bytes 400] [--workdir DIR]

It fills a cache file with `entries` entries in transactions of 2,000 (one engine call's
requests), then times: inserting `probe` (200,000) more; looking up `probe` present and `probe`
absent keys (500 a query, as the engine does); two processes inserting `probe` entries each at once
(then an integrity check and a count); and `Engine.chat` on an engine that answers instantly for
`probe / 4` requests, with the cache off, all misses and all hits, per request. The last line is
`ratio <x>`: the cache's cost per request (a miss: lookup + insert) over the bookkeeping's own cost
per request.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from stages.core.config.engine_params import EngineParams, LLMSpec, Sampling  # noqa: E402
from stages.core.engines import ChatRequest, Completion, Engine, Reply  # noqa: E402
from stages.core.storage.cache import ResponseCache  # noqa: E402

print = functools.partial(print, flush=True)  # figures appear as they are measured
BATCH = 2000
SAMPLING = Sampling(temperature=0.6, max_tokens=64)


def keys(start: int, count: int) -> list[bytes]:
    return [i.to_bytes(8, "little") * 4 for i in range(start, start + count)]  # 32 bytes, like sha256


def value(size: int) -> list[dict]:
    return [{"text": "x" * size, "finish_reason": "stop", "prompt_tokens": 20, "completion_tokens": 90}]


def fill(path: Path, start: int, count: int, size: int) -> float:
    """Insert `count` entries from `start` in transactions of BATCH; return seconds."""
    cache, payload = ResponseCache(path), value(size)
    began = time.perf_counter()
    for first in range(start, start + count, BATCH):
        cache.put_many((k, payload) for k in keys(first, min(BATCH, start + count - first)))
    cache.close()
    return time.perf_counter() - began


def lookup(path: Path, start: int, count: int) -> tuple[float, int]:
    cache, found = ResponseCache(path, "read"), 0
    began = time.perf_counter()
    for first in range(start, start + count, BATCH):
        found += len(cache.get_many(keys(first, min(BATCH, start + count - first))))
    cache.close()
    return time.perf_counter() - began, found


class Instant(Engine):
    """Answers every request at once: what remains is the engine's own bookkeeping (each prompt is
    counted with a real tokenizer first, as every production engine does)."""

    def load(self) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.llm.model)

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        return [Reply([Completion("答え" * 50, "stop", 20, 100) for _ in range(r.n)]) for r in requests]


def per_request(cache: ResponseCache | None, requests: list[ChatRequest]) -> float:
    llm = LLMSpec(model=str(ROOT / "data/sample/tiny-chat"), max_model_len=4096)
    engine = Instant(llm=llm, options=EngineParams(backend="transformers", batch_size=1))
    engine.cache = cache
    engine.load()  # the tokenizer is loaded before timing
    engine._loaded = True
    began = time.perf_counter()
    for first in range(0, len(requests), BATCH):
        engine.chat(requests[first : first + BATCH], SAMPLING)
    return (time.perf_counter() - began) / len(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000_000)
    parser.add_argument("--probe", type=int, default=200_000, help="entries inserted and looked up to time")
    parser.add_argument("--value-bytes", type=int, default=400)
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given; a temporary dir otherwise")
    args = parser.parse_args()
    n, size, probe = args.entries, args.value_bytes, args.probe
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        path = work / "responses.sqlite"
        seconds = fill(path, 0, n, size)
        print(f"fill {n:,} entries of {size} B: {seconds:.1f} s, {n / seconds:,.0f}/s")
        print(f"file {path.stat().st_size / 2**30:.2f} GiB")
        seconds = fill(path, n, probe, size)
        print(f"insert at {n:,}: {probe / seconds:,.0f}/s ({seconds / probe * 1e6:.1f} us each)")
        present, found = lookup(path, n // 3, probe)
        absent, none = lookup(path, 10 * n, probe)
        assert (found, none) == (probe, 0)
        print(f"lookup present: {probe / present:,.0f}/s ({present / probe * 1e6:.1f} us each)")
        print(f"lookup absent: {probe / absent:,.0f}/s ({absent / probe * 1e6:.1f} us each)")
        began = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            pool.starmap(fill, [(path, 20 * n, probe, size), (path, 30 * n, probe, size)])
        both = time.perf_counter() - began
        db = sqlite3.connect(path)
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        total = db.execute("SELECT count(*) FROM responses").fetchone()[0]
        db.close()
        rate = 2 * probe / both
        print(f"two writers: {rate:,.0f} inserts/s together, integrity {integrity}, entries {total:,}")
        assert integrity == "ok" and total == n + 3 * probe

        requests = [
            ChatRequest([{"role": "user", "content": f"質問 {i}: " + "説明してください。" * 20}], n=1, seed=i)
            for i in range(probe // 4)
        ]
        bare = per_request(None, requests)
        fresh = work / "stage.sqlite"
        miss = per_request(ResponseCache(fresh), requests)
        hit = per_request(ResponseCache(fresh), requests)
        print(f"engine bookkeeping per request: {bare * 1e6:.1f} us without cache")
        print(f"with cache: miss {miss * 1e6:.1f} us, hit {hit * 1e6:.1f} us")
        os.remove(fresh)
        print(f"ratio {(miss - bare) / bare:.2f}")


if __name__ == "__main__":
    main()
