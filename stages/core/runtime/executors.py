"""Where a stage's engine work runs: one engine in this process (`engine.executor: local`) or a pool
of engine replicas on a Ray cluster (`engine.executor: ray`). Both take the same picklable work,
`work(engine, shard) -> table`, and hand its result to `shards.run_checkpointed`, which checkpoints every
finished shard under the stage's resume key: a killed job, a lost worker or a preempted node costs
only the shards that were not finished. Results do not depend on the executor: every request
carries its own seed."""

from __future__ import annotations

import abc
import json
import logging
import multiprocessing
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.core.config.cli import LOG_FORMAT, run
from stages.core.config.engine_params import EngineParams, LLMSpec
from stages.core.config.errors import PipelineError
from stages.core.engines import Engine, make_engine
from stages.core.engines.base import missing_extra
from stages.core.rows.requests import unfinished
from stages.core.runtime.shards import run_checkpointed
from stages.core.storage.cache import ResponseCache
from stages.core.storage.jsonl import merge_json
from stages.core.storage.parquet import ENGINE_METADATA, engines_of

LOG = logging.getLogger(__name__)
CHILD_GRACE = 30  # seconds a stage's own process has to stop (abort, store answers) on a signal
Work = Callable[[Engine, pa.Table], pa.Table]  # a module-level function or a functools.partial of one


class Executor(abc.ABC):
    """Runs work on engines for `llm`; `capacity` shards may be in flight at once. Each engine
    answers what it can from the response cache file `cache` (engine.cache says how)."""

    def __init__(self, llm: LLMSpec, options: EngineParams, cache: str | Path | None = None) -> None:
        self.llm, self.options, self.cache = llm, options, cache
        self.capacity = options.shards_in_flight

    def request_counts(self) -> dict[str, float]:
        """What the engines did so far (Engine.request_counts, summed over replicas)."""
        return {}

    def failure_details(self) -> Counter:
        """Failed requests by error text, so far."""
        return Counter()

    def identity(self) -> dict:
        """What of the engine determines results (for resume keys and the release manifest)."""
        return make_engine(self.llm, self.options).identity()

    @abc.abstractmethod
    def submit(self, work: Work, shard: pa.Table, index: int = 0) -> Future:
        """Run `work` on shard number `index`; its result, or the error that ended it."""

    def close(self) -> None:  # noqa: B027 - nothing to free by default
        """Free the engines (and their GPUs)."""

    def interrupt(self) -> None:  # noqa: B027 - Ray's replicas end when `close` kills them
        """The stage stops (a signal, a failed shard): engines abort the requests in flight."""

    def run_sharded(
        self,
        work: Work,
        shards: Any,
        *,
        role: str,
        carry: str | Path | None = None,
        statuses: tuple[str, ...] = (),
        ceiling: tuple[str, float] | None = None,
        metrics: str | Path | None = None,
        **kwargs: Any,
    ) -> int:
        """`shards.run_checkpointed` with `work` on this executor's engines. `out` records this engine's
        identity as `role` (and the roles recorded in the Parquet file `carry`, an input). `statuses`
        names the out's request-status columns: unfinished requests of reused shards are asked again,
        and with `ceiling` (its params key, its rate) the stage fails when more than that share of
        the out's requests did not finish. The JSON file `metrics`, where given, gets `role`'s
        figures of this run (request_metrics) beside what it holds."""
        metadata = engines_of(carry) if carry else {}
        metadata[f"{ENGINE_METADATA}{role}".encode()] = json.dumps(self.identity(), sort_keys=True).encode()
        tally, stage, before = Counter(), kwargs.get("stage", role), self.request_counts()
        rows = run_checkpointed(
            shards,
            lambda shard, index: self.submit(work, shard, index),
            window=self.capacity,
            metadata=metadata,
            statuses=statuses,
            tally=tally,
            counters=lambda: since(self.request_counts(), before),
            **kwargs,
        )
        counts = since(self.request_counts(), before)
        LOG.info("%s: %s", stage, ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "no requests")
        if statuses:
            LOG.info("%s: request statuses: %s", stage, dict(tally))
        if metrics is not None:
            merge_json({role: request_metrics(rows, tally, counts)}, metrics)
        if ceiling:
            check_ceiling(stage, tally, *ceiling, self.failure_details())
        return rows


def since(now: dict, before: dict) -> dict:
    """Counters of `now` less those of `before` (an executor's engines count from their start)."""
    return {
        k: round(v - before.get(k, 0), 3) if isinstance(v, float) else v - before.get(k, 0)
        for k, v in now.items()
    }


def request_metrics(rows: int, tally: Counter, counts: dict) -> dict:
    """One role's figures for `data/metrics`: rows, the requests' final statuses (failed, partial,
    ... by kind), what the engines were asked, answered from the response cache and sent, tokens
    in and out of the answers sent, and the seconds the engines took."""
    return {"rows": rows, "statuses": dict(sorted(tally.items())), **counts}


def check_ceiling(stage: str, tally: Counter, key: str, rate: float, details: Counter) -> None:
    """Raise when more than `rate` of the requests counted in `tally` are unfinished (failed, partial,
    mode ignored): the message names the stage, the counts, the params key and the commonest error."""
    asked = sum(tally.values())
    bad = {status: n for status, n in tally.items() if unfinished(status)}
    failed = sum(bad.values())
    if not asked or failed / asked <= rate:
        return
    common = details.most_common(1)
    why = f"; most common error ({common[0][1]:,}x): {common[0][0]}" if common else ""
    kinds = ", ".join(f"{status} {n:,}" for status, n in bad.items())
    raise PipelineError(
        f"{stage}: {failed:,} of {asked:,} requests did not finish ({kinds}"
        f"; {failed / asked:.1%} > {key}={rate}){why}. The out is written and every finished request "
        "is kept: fix the cause and re-run, and only the unfinished requests are asked again"
    )


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

    def submit(self, work: Work, shard: pa.Table, index: int = 0) -> Future:
        return self._threads.submit(work, self.engine, shard)

    def request_counts(self) -> dict[str, float]:
        return self.engine.request_counts()

    def failure_details(self) -> Counter:
        return Counter(self.engine.failures)

    def interrupt(self) -> None:
        self.engine.stop()

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

    def identity(self) -> dict:
        """The engine's identity where it runs: the library versions of this replica's host."""
        return self.engine.identity()

    def request_counts(self) -> dict[str, float]:
        return self.engine.request_counts()

    def failure_details(self) -> Counter:
        return Counter(self.engine.failures)

    def close(self) -> None:
        self.engine.__exit__(None, None, None)
        if self.engine.cache:
            self.engine.cache.close()


class RayExecutor(Executor):
    """`replicas` Ray actors, each owning one engine and the GPUs it needs (tensor x pipeline
    parallel size; none for the openai and transformers backends). A shard goes to the least busy
    replica. Ray restarts a replica whose process dies and retries its shards there; a replica that
    dies past `engine.ray_max_retries` fails every shard in flight at once, naming its shard. Each
    replica opens the response cache file on its own host (SQLite: safe for several processes on one
    host, not over a network filesystem; `python -m stages.core.storage.cache merge` joins the hosts'
    files)."""

    CLOSE_TIMEOUT = 60  # seconds an idle replica may take to free its engine before it is killed

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
            # a replica whose process dies is started again and its unfinished shards retried on it,
            # a bounded number of times: a shard that kills its replica each time fails the stage
            max_restarts=options.ray_max_retries,
            max_task_retries=options.ray_max_retries,
            max_concurrency=options.shards_in_flight,
        )
        self._actors = [actor.remote(llm, options, str(cache) if cache else None) for _ in range(replicas)]
        self._busy = [0] * replicas
        self._lock = threading.Lock()  # guards _busy, _dead, _fatal, _waiting and every result handed on
        self._dead: set[int] = set()  # replicas that died past their retries
        self._fatal: PipelineError | None = None  # the first such death: it stops the stage
        self._waiting: dict[Future, Any] = {}  # results not yet handed on, with their Ray task
        self.capacity = replicas * options.shards_in_flight
        LOG.info("%s: %d Ray replicas, %d GPUs each", llm.model, replicas, gpus)

    def identity(self) -> dict:
        """The engine's identity as the replicas report it (their hosts' library versions); replicas
        that disagree (hosts with other versions) stop the stage."""
        found = self._ray.get([a.identity.remote() for a in self._actors])
        if any(other != found[0] for other in found[1:]):
            versions = sorted({json.dumps(f["libraries"], sort_keys=True) for f in found})
            raise PipelineError(f"{self.llm.model}: the Ray replicas run different engines: {versions}")
        return found[0]

    def submit(self, work: Work, shard: pa.Table, index: int = 0) -> Future:
        """A cancelled result cancels its Ray task if it has not started (a running one ends when
        `close` kills its replica)."""
        result: Future = Future()
        with self._lock:
            if self._fatal is not None:  # the stage is stopping: no shard goes to a pool that lost a replica
                result.set_exception(self._fatal)
                return result
            i = min(range(len(self._actors)), key=self._busy.__getitem__)
            self._busy[i] += 1
            task = self._actors[i].run.remote(work, shard)
            self._waiting[result] = task
        result.add_done_callback(lambda r: self._ray.cancel(task) if r.cancelled() else None)
        task.future().add_done_callback(lambda done: self._done(i, index, done, result))
        return result

    def _done(self, i: int, index: int, done: Future, result: Future) -> None:
        """Hand a replica's answer on; a replica that died past its retries fails the stage."""
        error = done.exception()  # `done` is Ray's future of the task: nothing here cancels it
        if isinstance(error, self._ray.exceptions.RayActorError):
            error = self._replica_died(i, index, error)
        with self._lock:
            self._busy[i] -= 1
        self._hand_on(result, error, None if error is not None else done.result())

    def _replica_died(self, i: int, index: int, error: Exception) -> PipelineError:
        """The error that stops the stage: the first replica that died past its retries, named by
        its shard. Every shard in flight fails with it now (one not started never starts), so the
        stage stops at once rather than when the other replicas finish their shards."""
        retries = self.options.ray_max_retries
        with self._lock:
            self._dead.add(i)
            if self._fatal is not None:
                return self._fatal
            self._fatal = PipelineError(
                f"shard {index:05d}: its Ray replica died and was restarted {retries} times "
                f"(engine.ray_max_retries={retries}), so the stage stops; finished shards are kept "
                f"(Ray: {self._first_line(error)} The replica's log says why it died)"
            )
            waiting = list(self._waiting.items())
        for result, task in waiting:
            self._hand_on(result, self._fatal)
            self._ray.cancel(task)
        return self._fatal

    def _hand_on(self, result: Future, error: BaseException | None, value: Any = None) -> None:
        """Give `result` its outcome once: one the caller cancelled, or that a replica's death
        already failed, takes nothing."""
        with self._lock:  # claimed (running: a caller can no longer cancel it) by one thread only
            self._waiting.pop(result, None)
            if result.running() or result.done() or not result.set_running_or_notify_cancel():
                return
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(value)

    @staticmethod
    def _first_line(error: BaseException) -> str:
        """The first line of an error's text (Ray's run to a dozen lines), or its type's name."""
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__

    def failure_details(self) -> Counter:
        totals: Counter = Counter()
        for details in self._ray.get([a.failure_details.remote() for a in self._actors]):
            totals.update(details)
        return totals

    def request_counts(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for counts in self._ray.get([a.request_counts.remote() for a in self._actors]):
            for name, value in counts.items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def close(self) -> None:
        """Close the engine of each idle replica (within CLOSE_TIMEOUT), then end every actor's
        process, which returns its GPUs. A replica that died, or still runs a shard of a stage that
        stopped, is ended without waiting for it."""
        ray = self._ray
        with self._lock:
            idle = [a for i, a in enumerate(self._actors) if not self._busy[i] and i not in self._dead]
        try:
            ray.get([a.close.remote() for a in idle], timeout=self.CLOSE_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as err:  # ended below all the same
            LOG.warning("closing the Ray replicas: %s", self._first_line(err))
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
    except BaseException:  # Ctrl-C, SIGTERM, a failed shard: in-flight requests are aborted, not awaited
        executor.interrupt()
        raise
    finally:
        executor.close()


def in_own_process(target: Callable[..., None], *args: Any, what: str) -> None:
    """Run `target(*args)` in a fresh (spawned) process and wait: whatever it loads, GPU memory
    included, goes back to the system when it exits. Its failure is a PipelineError here."""
    LOG.info("%s: in its own process", what)
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(target, *args), name=what)
    process.start()
    try:
        process.join()
    except BaseException:  # a signal here: the child stops as a stage does (SIGTERM), then is waited for
        process.terminate()
        process.join(CHILD_GRACE)
        if process.is_alive():
            process.kill()
        raise
    if process.exitcode != 0:
        raise PipelineError(f"{what} failed in its own process (exit status {process.exitcode}): see above")


def _child(target: Callable[..., None], *args: Any) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    run(lambda: target(*args))
