"""The response cache: one entry per request, shared by every run, variant and release, so that a
changed run pays only for its new requests.

An entry's key is a hash of everything that determines the response: the messages after the
model's chat rules, the sampling parameters, n, the request's seed, the model (id, revision, dtype,
quantization, context, engine arguments) and the engine (backend and library versions). Its value
is the completions, with their token counts and finish reasons, or, for a prompt too long for the
context, that status and its token counts: the key decides that too, and a re-run whose other
requests are all cached then loads no model. A failed or partial answer is not stored: it is asked
again next time.

The store is SQLite in WAL mode: a lookup is a primary-key read, inserts are batched in one
transaction per engine call, several processes (Ray replicas on one host, two stages) may write at
once, and a transaction interrupted by a crash or `kill -9` leaves nothing behind, so a torn entry
is never read back. Each value also carries its own digest, checked on every read. The file lives
outside DVC's outs, like the checkpoints; `python -m stages.core.cache` merges, prunes and reports.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import orjson

from stages.core.errors import PipelineError

LOG = logging.getLogger(__name__)
MODES = ("off", "read", "read-write")
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key BLOB PRIMARY KEY,     -- sha256 of the request (request_key)
    value BLOB NOT NULL,      -- orjson of the completions (a list) or of {status, detail} (too long)
    digest BLOB NOT NULL,     -- sha256 of value: a value that does not match is never served
    used_at INTEGER NOT NULL  -- unix seconds of the last run that stored or read it (for prune)
) WITHOUT ROWID
"""
LOOKUP_BATCH = 500  # keys per SELECT (SQLite's variable limit is 32,766)


def request_key(identity: bytes, messages: list[dict], sampling: dict, n: int, seed: int) -> bytes:
    """The cache key of one request; `identity` is `engine_identity`'s bytes."""
    return hashlib.sha256(orjson.dumps([identity.decode(), messages, sampling, n, seed])).digest()


def engine_identity(backend: str, libraries: dict, llm: dict) -> bytes:
    """What of the engine determines a response: backend, library versions and the model recipe
    (not the engine's own source: an edit there that changes outputs must bump a version)."""
    return orjson.dumps({"backend": backend, "libraries": libraries, "llm": llm}, option=orjson.OPT_SORT_KEYS)


class ResponseCache:
    """Lookups and inserts of completions by request key; `mode` off, read or read-write."""

    def __init__(self, path: str | Path, mode: str = "read-write") -> None:
        if mode not in MODES:
            raise PipelineError(f"engine.cache={mode!r}: allowed are {', '.join(MODES)}")
        self.path, self.mode = Path(path), mode
        self.hits = self.misses = self.stored = 0
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, shared by the shards in flight

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=300, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: atomic, never corrupt; fsync at checkpoints
            # checkpoint the WAL every ~400 MB, not every 4 MB: random keys dirty pages all over the
            # tree, and each checkpoint's fsync cost more than the inserts (10k -> 23k inserts/s)
            db.execute("PRAGMA wal_autocheckpoint=100000")
            db.execute("PRAGMA cache_size=-262144")  # 256 MiB of pages
            db.execute(SCHEMA)
            self._db = db
        return self._db

    def get_many(self, keys: list[bytes]) -> dict[bytes, list | dict]:
        """The stored value of each key that has a valid entry."""
        if not self.enabled or not keys:
            return {}
        with self._lock:
            return self._get_many(keys)

    def _get_many(self, keys: list[bytes]) -> dict[bytes, list | dict]:
        db, found = self._connect(), {}
        for start in range(0, len(keys), LOOKUP_BATCH):
            chunk = keys[start : start + LOOKUP_BATCH]
            marks = ",".join("?" * len(chunk))
            for key, value, digest in db.execute(
                f"SELECT key, value, digest FROM responses WHERE key IN ({marks})", chunk
            ):
                if hashlib.sha256(value).digest() == digest:
                    found[bytes(key)] = orjson.loads(value)
                else:
                    LOG.warning("response cache %s: entry %s fails its digest: ignored", self.path, key.hex())
        self.hits += len(found)
        self.misses += len(set(keys)) - len(found)
        if found and self.mode == "read-write":
            self._touch(list(found))
        return found

    def put_many(self, items: Iterable[tuple[bytes, list | dict]]) -> None:
        """Store values by key, all in one transaction (kept if the key exists)."""
        if self.mode != "read-write":
            return
        now = int(time.time())
        rows = []
        for key, stored in items:
            value = orjson.dumps(stored)
            rows.append((key, value, hashlib.sha256(value).digest(), now))
        if not rows:
            return
        with self._lock:
            db = self._connect()
            with _transaction(db):
                db.executemany("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?)", rows)
            self.stored += len(rows)

    def _touch(self, keys: list[bytes]) -> None:
        db, now = self._connect(), int(time.time())
        with _transaction(db):
            db.executemany("UPDATE responses SET used_at = ? WHERE key = ?", [(now, k) for k in keys])

    def counts(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_stored": self.stored}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def merge(into: Path, other: Path) -> int:
    """Copy the entries of the cache file `other` that `into` lacks; return how many."""
    db = ResponseCache(into)._connect()
    before = db.execute("SELECT count(*) FROM responses").fetchone()[0]
    db.execute("ATTACH DATABASE ? AS other", (str(other),))
    with _transaction(db):
        db.execute("INSERT OR IGNORE INTO responses SELECT * FROM other.responses")
    db.execute("DETACH DATABASE other")
    return db.execute("SELECT count(*) FROM responses").fetchone()[0] - before


def prune(path: Path, unused_days: float) -> int:
    """Delete the entries no run stored or read in the last `unused_days` days; return how many."""
    db = ResponseCache(path)._connect()
    cutoff = int(time.time() - unused_days * 86400)
    with _transaction(db):
        gone = db.execute("DELETE FROM responses WHERE used_at < ?", (cutoff,)).rowcount
    db.execute("VACUUM")
    return gone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.core.cache", description="The response cache file."
    )
    parser.add_argument("--path", type=Path, help="the cache file (default: paths.response_cache)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="entries and size")
    merging = sub.add_parser("merge", help="add the entries of another cache file (a teammate's, a host's)")
    merging.add_argument("other", type=Path)
    pruning = sub.add_parser("prune", help="delete entries no run used lately")
    pruning.add_argument("--unused-days", type=float, required=True)
    args = parser.parse_args(argv)
    if args.path is None:
        from stages.core.params import load_params

        args.path = Path(load_params().paths.response_cache)
    if args.command == "merge":
        print(f"{merge(args.path, args.other):,} entries added to {args.path}")
    elif args.command == "prune":
        print(f"{prune(args.path, args.unused_days):,} entries deleted from {args.path}")
    else:
        db = ResponseCache(args.path)._connect()
        entries = db.execute("SELECT count(*) FROM responses").fetchone()[0]
        print(f"{args.path}: {entries:,} entries, {args.path.stat().st_size / 2**20:,.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
