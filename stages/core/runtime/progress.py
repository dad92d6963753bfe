"""The progress record of a sharded stage: a small JSON file beside its checkpoints
(`<paths.shards>/<stage>/progress.json`), rewritten whole after each shard and every HEARTBEAT
seconds while a shard computes, so `python -m stages.status` can tell what a run that takes days is
doing: shards done and left, request statuses, the engines' counters (requests, cache hits, tokens)
and recent samples of them, from which it derives tokens per second and the time left.

A record is only ever a report: a write that fails is logged once and the stage goes on."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

LOG = logging.getLogger(__name__)
RECORD = "progress.json"
HEARTBEAT = 30.0  # seconds between rewrites while a shard computes
SAMPLES = 60  # (time, counters) samples kept: 30 minutes at one per heartbeat
RATE_WINDOW = 600.0  # seconds of samples behind "tokens per second"


class ProgressRecord:
    """The record of one run of `stage` (resume key `key`, `total` input shards or None). `counters`
    gives the engines' counters so far (Executor.request_counts); `write(bytes)` stores the record."""

    def __init__(
        self,
        stage: str,
        key: str,
        total: int | None,
        write: Callable[[bytes], None],
        counters: Callable[[], dict] | None = None,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self._write, self._counters, self._heartbeat = write, counters, heartbeat
        now = time.time()
        self.data: dict = {
            "stage": stage,
            "key": key,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "state": "running",
            "started": now,
            "updated": now,
            "shards_total": total,
            "shards_done": 0,
            "shards_reused": 0,
            "shards_redone": 0,
            "rows_done": 0,
            "computed_seconds": 0.0,  # wall time since the first shard that was not reused
            "statuses": {},
            "requests": {},
            "samples": [],
        }
        self._lock, self._stop = threading.Lock(), threading.Event()
        # one save at a time (the heartbeat and the shards both save): the file never goes back to
        # an older snapshot than one already written
        self._saving = threading.Lock()
        self._first_computed: float | None = None
        self._failed_write = False
        self._thread = threading.Thread(target=self._beat, name=f"progress {stage}", daemon=True)

    def __enter__(self) -> ProgressRecord:
        self.save()
        self._thread.start()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        self._stop.set()
        self._thread.join()
        if kind is None:
            state = "done"
        elif issubclass(kind, KeyboardInterrupt):
            state = "interrupted"
        else:
            state = "failed"
        with self._lock:
            self.data["state"] = state
            if error is not None:
                self.data["error"] = f"{type(error).__name__}: {error}"[:500]
        self.save()

    def computing(self) -> None:
        """A shard was given to the engines (not reused whole)."""
        with self._lock:
            if self._first_computed is None:
                self._first_computed = time.time()

    def shard_done(self, rows: int, reused: bool, redone: bool, tally: Counter) -> None:
        """A shard was written to the out: `reused` whole from its checkpoint, or `redone` (a
        checkpoint whose unfinished rows were asked again); `tally` counts the statuses so far."""
        with self._lock:
            d = self.data
            d["shards_done"] += 1
            d["shards_reused"] += reused
            d["shards_redone"] += redone
            d["rows_done"] += rows
            d["statuses"] = dict(tally)
        self.save()

    def save(self) -> None:
        with self._saving:
            self._save()

    def _save(self) -> None:
        counters = self._read_counters()
        with self._lock:
            now = time.time()
            d = self.data
            d["updated"] = now
            if self._first_computed is not None:
                d["computed_seconds"] = round(now - self._first_computed, 3)
            if counters is not None:
                d["requests"] = counters
                d["samples"] = [*d["samples"], [round(now, 3), counters]][-SAMPLES:]
            text = json.dumps(d, sort_keys=True).encode("utf-8")
        try:
            self._write(text)
        except OSError as err:  # a report: the stage goes on without it
            if not self._failed_write:
                self._failed_write = True
                LOG.warning("%s: cannot write its progress record (%s); the stage goes on", d["stage"], err)

    def _read_counters(self) -> dict | None:
        if self._counters is None:
            return None
        try:
            return dict(self._counters())
        except Exception as err:  # an engine that cannot answer now is reported, not fatal
            LOG.debug("progress counters unavailable: %s", err)
            return None

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat):
            self.save()


def rate(samples: list, name: str, now: float, window: float = RATE_WINDOW) -> float | None:
    """Per second growth of counter `name` over the samples of the last `window` seconds (at least
    two samples: the last and the oldest within the window, else the two latest)."""
    if len(samples) < 2:
        return None
    recent = [s for s in samples if now - s[0] <= window]
    first, last = (recent[0], recent[-1]) if len(recent) >= 2 else (samples[-2], samples[-1])
    seconds = last[0] - first[0]
    if seconds <= 0:
        return None
    return (last[1].get(name, 0) - first[1].get(name, 0)) / seconds


def time_left(data: dict) -> float | None:
    """Seconds left at the pace of the shards computed in this run (reused shards cost nothing)."""
    total, done = data.get("shards_total"), data["shards_done"]
    computed = done - data["shards_reused"]
    if total is None or computed <= 0 or data["computed_seconds"] <= 0:
        return None
    return (total - done) * data["computed_seconds"] / computed
