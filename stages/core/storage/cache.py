"""The response cache: one entry per request, shared by every run, variant and release, so that a
changed run pays only for its new requests.

An entry's key is a hash of everything that determines the response: the messages after the
model's chat rules, the sampling parameters, n, the request's seed, the model (id, revision, dtype,
quantization, context, engine arguments) and the engine (backend, its version and library
versions). Its value is the completions, with their token counts and finish reasons, or, for a
prompt too long for the context, that status and its token counts: the key decides that too, and a
re-run whose other requests are all cached then loads no model (DeepL translations are stored as
[text, billed characters]). A failed or partial answer is not stored: it is asked
again next time.

The store is SQLite in WAL mode: a lookup is a primary-key read, inserts are batched in one
transaction per engine call, several processes (Ray replicas on one host, two stages) may write at
once, and a transaction interrupted by a crash or `kill -9` leaves nothing behind, so a torn entry
is never read back. Each value also carries its own digest. The cache never stops or poisons a run:
- an entry that fails its digest, is not JSON or has not the shape of a response (`valid_value`)
  is a miss: counted (cache_damaged), logged once per run, and replaced when the answer is stored;
- a file that cannot be opened stops the stage before any request, naming the file and the fix;
- a write that fails (a full disk) is logged once and turns writes off for the rest of the run,
  which goes on (its answers are in its outs).
The file lives outside DVC's outs, like the checkpoints; `python -m stages.core.storage.cache` merges
(checking each entry it imports), prunes and reports.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import orjson

from stages.core.config.errors import PipelineError

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
# a key's entry is kept, unless it is damaged (entry_ok is `decoded`, registered on each connection)
UPSERT = """
INSERT INTO responses VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, digest = excluded.digest, used_at = excluded.used_at
WHERE NOT entry_ok(responses.value, responses.digest)
"""
LOOKUP_BATCH = 500  # keys per SELECT (SQLite's variable limit is 32,766)
MERGE_BATCH = 10_000  # entries read at a time from the file merged in, each batch one write transaction
MERGE_SECONDS = 3600.0  # reading the file merged in stops after this long (a crafted file never ends)
OPEN_SECONDS = 300  # how long opening waits for other processes setting up the same file
# the fields of a stored completion (engines.Completion) and their types; `logprobs` may be absent
COMPLETION_FIELDS = {"text": str, "finish_reason": str, "prompt_tokens": int, "completion_tokens": int}
OPTIONAL_FIELDS = {"logprobs"}


def request_key(identity: bytes, messages: list[dict], sampling: dict, n: int, seed: int) -> bytes:
    """The cache key of one request; `identity` is `engine_identity`'s bytes."""
    return hashlib.sha256(orjson.dumps([identity.decode(), messages, sampling, n, seed])).digest()


def engine_identity(backend: str, libraries: dict, llm: dict, version: int) -> bytes:
    """What of the engine determines a response: backend, the engine's version (Engine.VERSION, raised
    by every change of its code that changes what it returns), library versions and the model recipe."""
    ours = {"backend": backend, "version": version, "libraries": libraries, "llm": llm}
    return orjson.dumps(ours, option=orjson.OPT_SORT_KEYS)


def valid_value(stored: object) -> bool:
    """Whether a decoded value has the shape of what the cache stores: completions (a non-empty list
    of dicts with COMPLETION_FIELDS), a status ({status, detail}), or a DeepL translation ([text,
    billed characters])."""
    if isinstance(stored, dict):
        return (
            stored.keys() == {"status", "detail"}
            and isinstance(stored["status"], str)
            and (stored["detail"] is None or isinstance(stored["detail"], str))
        )
    if not isinstance(stored, list) or not stored:
        return False
    if len(stored) == 2 and isinstance(stored[0], str) and type(stored[1]) is int:
        return True
    return all(_is_completion(item) for item in stored)


def _is_completion(item: object) -> bool:
    return (
        isinstance(item, dict)
        and COMPLETION_FIELDS.keys() <= item.keys() <= COMPLETION_FIELDS.keys() | OPTIONAL_FIELDS
        and all(type(item[name]) is kind for name, kind in COMPLETION_FIELDS.items())
    )


def decoded(value: object, digest: object) -> list | dict | None:
    """The response an entry holds, or None for a damaged entry: a digest that does not match, a
    value that is not JSON or not of a response's shape."""
    if not isinstance(value, bytes) or hashlib.sha256(value).digest() != digest:
        return None
    try:
        stored = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return stored if valid_value(stored) else None


class ResponseCache:
    """Lookups and inserts of completions by request key; `mode` off, read or read-write. The file
    is opened here, before any request is sent."""

    def __init__(self, path: str | Path, mode: str = "read-write") -> None:
        if mode not in MODES:
            raise PipelineError(f"engine.cache={mode!r}: allowed are {', '.join(MODES)}")
        self.path, self.mode = Path(path), mode
        self.hits = self.misses = self.stored = self.damaged = 0
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, shared by the shards in flight
        self._reported = False
        if self.enabled:
            self._connect()

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = _open(self.path)
            except (sqlite3.DatabaseError, OSError) as err:
                raise self._unusable(err) from err
        return self._db

    def _unusable(self, err: Exception) -> PipelineError:
        return PipelineError(
            f"response cache {self.path} cannot be read: {err}; move the file away (a new cache is "
            "started) or set engine.cache=off"
        )

    def get_many(self, keys: list[bytes]) -> dict[bytes, list | dict]:
        """The stored value of each key that has a valid entry; a damaged entry is a miss."""
        if not self.enabled or not keys:
            return {}
        with self._lock:
            return self._get_many(keys)

    def _get_many(self, keys: list[bytes]) -> dict[bytes, list | dict]:
        db, found, damaged = self._connect(), {}, 0
        try:
            for start in range(0, len(keys), LOOKUP_BATCH):
                chunk = keys[start : start + LOOKUP_BATCH]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT key, value, digest FROM responses WHERE key IN ({marks})"
                for key, value, digest in db.execute(sql, chunk):
                    stored = decoded(value, digest)
                    if stored is None:
                        damaged += 1
                    else:
                        found[bytes(key)] = stored
        except sqlite3.DatabaseError as err:
            raise self._unusable(err) from err
        self.hits += len(found)
        self.misses += len(set(keys)) - len(found)
        self.damaged += damaged
        if found:
            self._write(
                "UPDATE responses SET used_at = ? WHERE key = ?", [(int(time.time()), k) for k in found]
            )
        return found

    def put_many(self, items: Iterable[tuple[bytes, list | dict]]) -> None:
        """Store values by key, all in one transaction: a key's valid entry is kept, a damaged one
        replaced. A write that fails (a full disk) is logged and turns writes off; it never raises."""
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
            if self._write(UPSERT, rows):
                self.stored += len(rows)

    def _write(self, statement: str, rows: list[tuple]) -> bool:
        """Run `statement` over `rows` in one transaction; whether it was written. The first write
        that fails turns writes off for the rest of the run (reads go on)."""
        if self.mode != "read-write":
            return False
        db = self._connect()
        try:
            with _transaction(db):
                db.executemany(statement, rows)
        except (sqlite3.DatabaseError, OSError) as err:
            if isinstance(err, sqlite3.IntegrityError | sqlite3.ProgrammingError):
                raise  # a bug of ours, not the file's
            self.mode = "read"
            LOG.warning(
                "response cache %s: cannot write (%s): no more answers are stored in this run, which goes on",
                self.path,
                err,
            )
            return False
        return True

    def counts(self) -> dict[str, int]:
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_stored": self.stored,
            "cache_damaged": self.damaged,
        }

    def close(self) -> None:
        if self.damaged and not self._reported:
            self._reported = True
            LOG.warning(
                "response cache %s: %d damaged entries (digest, JSON or shape wrong) were asked again%s",
                self.path,
                self.damaged,
                " and replaced" if self.mode == "read-write" else "",
            )
        if self._db is not None:
            self._db.close()
            self._db = None


def _open(path: Path) -> sqlite3.Connection:
    """A connection to the cache file `path` (created if missing); its header and schema are read.
    Replicas that open one new file at once (Ray actors on one host) wait for each other: SQLite
    answers "database is locked" at once, without its busy handler, to a connection that sets up WAL
    while another one does, so the setup is tried again until OPEN_SECONDS have passed."""
    deadline, pause = time.monotonic() + OPEN_SECONDS, 0.01
    while True:
        try:
            return _setup(path)
        except sqlite3.OperationalError as err:
            busy = err.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(2 * pause, 0.5)


def _setup(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=OPEN_SECONDS, isolation_level=None, check_same_thread=False)
    try:
        db.create_function("entry_ok", 2, lambda value, digest: decoded(value, digest) is not None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: atomic, never corrupt; fsync at checkpoints
        # checkpoint the WAL every ~400 MB, not SQLite's ~4 MB: random keys dirty pages all over the
        # tree, so fewer checkpoints (figures: benchmarks/README.md)
        db.execute("PRAGMA wal_autocheckpoint=100000")
        db.execute("PRAGMA cache_size=-262144")  # 256 MiB of pages
        db.execute(SCHEMA)
        db.execute("SELECT 1 FROM responses LIMIT 1").fetchall()
    except BaseException:
        db.close()
        raise
    return db


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self.db.execute("COMMIT")
        finally:
            if self.db.in_transaction:  # the block failed, or COMMIT did (a full disk)
                self.db.execute("ROLLBACK")


def merge(into: Path, other: Path, seconds: float = MERGE_SECONDS) -> dict[str, int]:
    """Import the entries of the cache file `other` that `into` lacks or holds damaged. Each is
    checked first (digest, JSON, shape): a damaged one is skipped. Returns the counts: added,
    replaced (a damaged entry of `into`), kept (`into` had it) and skipped.

    `other` may come from anyone: it is opened read-only, its `responses` must be a plain table of
    this schema (not a view, no generated column, nothing a SELECT would compute), reading it stops
    after `seconds`, and `into`'s write lock is held only to write one batch already read (never
    while `other` is read), so other writers wait for a batch, not for the whole merge. A merge that
    stops midway keeps the batches it wrote (each entry stands alone)."""
    if not Path(other).is_file():
        raise PipelineError(f"{other}: no such cache file")
    source = _foreign(Path(other), seconds)
    db = ResponseCache(into)._connect()
    counts = dict.fromkeys(("added", "replaced", "kept", "skipped"), 0)
    try:
        rows = source.execute("SELECT key, value, digest, used_at FROM responses")
        while batch := rows.fetchmany(MERGE_BATCH):
            good = [row for row in batch if _importable(*row)]
            counts["skipped"] += len(batch) - len(good)
            with _transaction(db):
                before, changes = _entries(db), db.total_changes
                db.executemany(UPSERT, good)
                added = _entries(db) - before
                replaced = db.total_changes - changes - added
            counts["added"] += added
            counts["replaced"] += replaced
            counts["kept"] += len(good) - added - replaced
    except sqlite3.DatabaseError as err:
        why = f"it took over {seconds:g} s" if "interrupt" in str(err) else str(err)
        raise PipelineError(f"cannot merge {other} into {into}: {why}") from err
    finally:
        source.close()
    return counts


def _foreign(path: Path, seconds: float) -> sqlite3.Connection:
    """A read-only connection to another cache file, refused unless its `responses` is a plain table
    with this schema's columns; every statement on it is interrupted after `seconds` in all."""
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    deadline = time.monotonic() + seconds
    source.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        kind = source.execute("SELECT type FROM sqlite_master WHERE name = 'responses'").fetchone()
        columns = [(c[1], c[2].upper(), c[6]) for c in source.execute("PRAGMA table_xinfo(responses)")]
    except sqlite3.DatabaseError as err:
        source.close()
        raise PipelineError(f"{path} is not a response cache file: {err}") from err
    want = [("key", "BLOB", 0), ("value", "BLOB", 0), ("digest", "BLOB", 0), ("used_at", "INTEGER", 0)]
    if kind is None or kind[0] != "table" or columns != want:
        source.close()
        found = "no `responses`" if kind is None else f"`responses` is a {kind[0]} with columns {columns}"
        raise PipelineError(f"{path} is not a response cache file: {found}, not the table {want}")
    return source


def _importable(key: object, value: object, digest: object, used_at: object) -> bool:
    """Whether an entry of another cache file is sound: a request key, a value that is a response."""
    return (
        isinstance(key, bytes)
        and len(key) == 32
        and type(used_at) is int
        and decoded(value, digest) is not None
    )


def _entries(db: sqlite3.Connection) -> int:
    return db.execute("SELECT count(*) FROM responses").fetchone()[0]


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
        prog="python -m stages.core.storage.cache", description="The response cache file."
    )
    parser.add_argument("--path", type=Path, help="the cache file (default: paths.response_cache)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="entries and size")
    merging = sub.add_parser("merge", help="add the entries of another cache file (a teammate's, a host's)")
    merging.add_argument("other", type=Path)
    merging.add_argument(
        "--seconds",
        type=float,
        default=MERGE_SECONDS,
        help=f"stop reading it after this long ({MERGE_SECONDS:g})",
    )
    pruning = sub.add_parser("prune", help="delete entries no run used lately")
    pruning.add_argument("--unused-days", type=float, required=True)
    args = parser.parse_args(argv)
    if args.path is None:
        from stages.core.config.params import load_params

        args.path = Path(load_params().paths.response_cache)
    if args.command == "merge":
        counts = merge(args.path, args.other, args.seconds)
        print(
            f"{counts['added']:,} entries added to {args.path}, {counts['replaced']:,} damaged ones "
            f"replaced, {counts['kept']:,} already there; {counts['skipped']:,} damaged entries of "
            f"{args.other} skipped (digest, JSON or shape wrong)"
        )
    elif args.command == "prune":
        print(f"{prune(args.path, args.unused_days):,} entries deleted from {args.path}")
    else:
        db = ResponseCache(args.path)._connect()
        entries = _entries(db)
        print(f"{args.path}: {entries:,} entries, {args.path.stat().st_size / 2**20:,.1f} MiB")


if __name__ == "__main__":
    from stages.core.config.cli import run  # a PipelineError (a file that is not a cache) is one line

    run(main)
