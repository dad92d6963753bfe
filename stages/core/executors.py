"""Where a stage's engine work runs: one engine in this process (`engine.executor: local`) or a pool
of engine replicas on a Ray cluster (`engine.executor: ray`). Both take the same picklable work,
`work(engine, shard) -> table`, and hand its result to `run_sharded`, which checkpoints every
finished shard under the stage's resume key: a killed job, a lost worker or a preempted node costs
only the shards that were not finished. Results do not depend on the executor: every request
carries its own seed."""

from __future__ import annotations

import abc
import json
import logging
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.core.cache import ResponseCache
from stages.core.cli import LOG_FORMAT, run
from stages.core.engines import Engine, make_engine
from stages.core.engines.base import missing_extra
from stages.core.errors import PipelineError
from stages.core.io import ENGINE_METADATA, engines_of
from stages.core.params import EngineParams, LLMSpec
from stages.core.shards import run_sharded

LOG = logging.getLogger(__name__)
Work = Callable[[Engine, pa.Table], pa.Table]  # a module-level function or a functools.partial of one


class Executor(abc.ABC):
    """Runs work on engines for `llm`; `capacity` shards may be in flight at once. Each engine
    answers what it can from the response cache file `cache` (engine.cache says how)."""

    def __init__(self, llm: LLMSpec, options: EngineParams, cache: str | Path | None = None) -> None:
        self.llm, self.options, self.cache = llm, options, cache
        self.capacity = options.shards_in_flight

    def cache_counts(self) -> dict[str, int]:
        """Requests answered from the response cache, and those sent, so far."""
        return {}

    def identity(self) -> dict:
        """What of the engine determines results (for resume keys and the release manifest)."""
        return make_engine(self.llm, self.options).identity()

    @abc.abstractmethod
    def submit(self, work: Work, shard: pa.Table) -> Future: ...

    def close(self) -> None:  # noqa: B027 - nothing to free by default
        """Free the engines (and their GPUs)."""

    def run_sharded(
        self, work: Work, shards: Any, *, role: str, carry: str | Path | None = None, **kwargs: Any
    ) -> int:
        """`shards.run_sharded` with `work` on this executor's engines. `out` records this engine's
        identity as `role` (and the roles recorded in the Parquet file `carry`, an input)."""
        metadata = engines_of(carry) if carry else {}
        metadata[f"{ENGINE_METADATA}{role}".encode()] = json.dumps(self.identity(), sort_keys=True).encode()
        rows = run_sharded(
            shards,
            lambda shard, _: self.submit(work, shard),
            window=self.capacity,
            metadata=metadata,
            **kwargs,
        )
        if counts := self.cache_counts():
            LOG.info("%s: response cache: %s", kwargs.get("stage", role), counts)
        return rows


class LocalExecutor(Executor):
    """One engine in this process; `shards_in_flight` threads give it the next shard's requests
    (and read and write shards) while it finishes the last."""

    def __init__(self, llm: LLMSpec, options: EngineParams, cache: str | Path | None = None) -> None:
        super().__init__(llm, options, cache)
        self.engine = make_engine(llm, options)
        self.engine.cache = ResponseCache(cache, options.cache) if cache else None
        self._threads = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix="shard")

    def identity(self) -> dict:
        return self.engine.identity()

    def submit(self, work: Work, shard: pa.Table) -> Future:
        return self._threads.submit(work, self.engine, shard)

    def cache_counts(self) -> dict[str, int]:
        return self.engine.cache.counts() if self.engine.cache else {}

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        self.engine.__exit__(None, None, None)
        if self.engine.cache:
            self.engine.cache.close()


class Replica:
    """A Ray actor that owns one engine (loaded on its first request) and runs work on it."""

    def __init__(self, llm: LLMSpec, options: EngineParams, cache: str | None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.engine = make_engine(llm, options)
        self.engine.cache = ResponseCache(cache, options.cache) if cache else None

    def run(self, work: Work, shard: pa.Table) -> pa.Table:
        return work(self.engine, shard)

    def cache_counts(self) -> dict[str, int]:
        return self.engine.cache.counts() if self.engine.cache else {}

    def close(self) -> None:
        self.engine.__exit__(None, None, None)
        if self.engine.cache:
            self.engine.cache.close()


class RayExecutor(Executor):
    """`replicas` Ray actors, each owning one engine and the GPUs it needs (tensor x pipeline
    parallel size; none for the openai and transformers backends). A shard goes to the least busy
    replica. Ray restarts a replica whose process dies and retries its shards there. Each replica
    opens the response cache file on its own host (SQLite: safe for several processes on one host,
    not over a network filesystem; `python -m stages.core.cache merge` joins the hosts' files)."""

    def __init__(self, llm: LLMSpec, options: EngineParams, cache: str | Path | None = None) -> None:
        super().__init__(llm, options, cache)
        try:
            import ray
        except ImportError as err:
            raise missing_extra("ray", "ray") from err
        self._ray, self._started = ray, not ray.is_initialized()
        if self._started:
            ray.init(address=options.ray_address, log_to_driver=True)
        gpus = llm.gpus if options.backend == "vllm" else 0
        resources = ray.cluster_resources()
        replicas = options.replicas or int(
            resources.get("GPU", 0) // gpus if gpus else max(1, resources.get("CPU", 1))
        )
        if replicas < 1:
            raise PipelineError(
                f"{llm.model} needs {gpus} GPUs per replica (tensor x pipeline parallel size); the Ray "
                f"cluster at {options.ray_address or 'local'} has {resources.get('GPU', 0):g}"
            )
        actor = ray.remote(Replica).options(
            num_gpus=gpus,
            num_cpus=1,
            max_restarts=-1,  # a replica whose process dies is started again ...
            max_task_retries=-1,  # ... and its unfinished shards are retried on it
            max_concurrency=options.shards_in_flight,
        )
        self._actors = [actor.remote(llm, options, str(cache) if cache else None) for _ in range(replicas)]
        self._busy = [0] * replicas
        self._lock = threading.Lock()
        self.capacity = replicas * options.shards_in_flight
        LOG.info("%s: %d Ray replicas, %d GPUs each", llm.model, replicas, gpus)

    def submit(self, work: Work, shard: pa.Table) -> Future:
        with self._lock:
            i = min(range(len(self._actors)), key=self._busy.__getitem__)
            self._busy[i] += 1
        future = self._actors[i].run.remote(work, shard).future()
        future.add_done_callback(lambda _: self._done(i))
        return future

    def _done(self, i: int) -> None:
        with self._lock:
            self._busy[i] -= 1

    def cache_counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for counts in self._ray.get([a.cache_counts.remote() for a in self._actors]):
            for name, value in counts.items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def close(self) -> None:
        """Close each engine, then end the actors' processes, which returns their GPUs."""
        ray = self._ray
        try:
            ray.get([a.close.remote() for a in self._actors], timeout=300)
        except (ray.exceptions.RayError, TimeoutError) as err:
            LOG.warning("closing the Ray replicas: %s", err)
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        if self._started:
            ray.shutdown()


@contextmanager
def engine_pool(llm: LLMSpec, options: EngineParams, cache: str | Path | None = None) -> Iterator[Executor]:
    """The executor `engine.executor` names, for `llm`, answering from the response cache file
    `cache` where it can; its engines are freed on exit."""
    executor = (RayExecutor if options.executor == "ray" else LocalExecutor)(llm, options, cache)
    try:
        yield executor
    finally:
        executor.close()


def in_own_process(target: Callable[..., None], *args: Any, what: str) -> None:
    """Run `target(*args)` in a fresh (spawned) process and wait: whatever it loads, GPU memory
    included, goes back to the system when it exits. Its failure is a PipelineError here."""
    LOG.info("%s: in its own process", what)
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(target, *args), name=what)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise PipelineError(f"{what} failed in its own process (exit status {process.exitcode}): see above")


def _child(target: Callable[..., None], *args: Any) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    run(lambda: target(*args))
