"""Sharded, resumable processing: each finished shard is checkpointed under the stage's resume key
(stages/core/storage/resume.py) with the digests of its input rows and of its own rows; a rerun reuses it
only when it is readable, intact, valid and computed from the same input, and asks again the rows
whose requests did not finish (failed, partial: `engines.unfinished`).

`python -m stages.core.runtime.shards list|prune` shows and removes checkpoints; a run never removes
another key's checkpoints (two runs with different keys may share one store)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from stages.core.config.cli import run
from stages.core.config.errors import PipelineError
from stages.core.rows.requests import unfinished
from stages.core.runtime.progress import RECORD, ProgressRecord
from stages.core.runtime.status import alive
from stages.core.storage.atomic import atomic_path
from stages.core.storage.parquet import PARQUET_OPTIONS, write_table
from stages.core.storage.resume import input_digest

LOG = logging.getLogger(__name__)
INPUT_DIGEST = b"lmsys_synth.input_digest"  # Parquet metadata key of a checkpoint shard
ROWS_DIGEST = b"lmsys_synth.rows_digest"  # ... and of the digest of its own rows, checked on reuse
COMPLETE = "_complete"  # marker file of a key whose run assembled its out (for `prune`)
# written at the root of every store a run writes to: `prune` deletes only under a root that holds it
STORE_MARKER = ".lmsys-synth-checkpoints"
PRUNE_DAYS = 7.0  # prune's default: keys written to or read within this many days are kept


def slices(table: pa.Table, size: int) -> Iterable[pa.Table]:
    """Consecutive slices of an in-memory table, `size` rows each."""
    return (table.slice(start, size) for start in range(0, table.num_rows, size))


def shard_count(path: str | Path, size: int) -> int:
    """How many shards of `size` rows the Parquet file at `path` makes (for progress bars)."""
    return -(-pq.ParquetFile(path).metadata.num_rows // size)


def mismatch(table: pa.Table, schema: pa.Schema, shard: pa.Table) -> str | None:
    """Why `table` is not a valid result for input `shard`, or None when it is."""
    if not table.schema.equals(schema, check_metadata=False):
        return f"schema {table.schema.types} is not {schema.types}"
    if table.num_rows != shard.num_rows:
        return f"{table.num_rows} rows for {shard.num_rows} input rows"
    if not table["conversation_id"].equals(shard["conversation_id"]):
        return "its conversations are not those of the input shard"
    return None


class CheckpointStore:
    """Checkpoint shards under a local directory or any fsspec URL (s3://bucket/prefix, a shared
    filesystem): local files are written through a temporary file and renamed, object-store files in
    one PUT, so a reader never sees half a shard."""

    def __init__(self, root: str | Path) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.local = isinstance(self.fs, LocalFileSystem)
        self._marked = False

    def mark(self) -> None:
        """Say, at the root, that this is a checkpoint store (what `prune` looks for before it deletes)."""
        if not self._marked:
            marker = f"{self.root}/{STORE_MARKER}"
            if not self.fs.exists(marker):
                self.fs.makedirs(self.root, exist_ok=True)
                self.fs.pipe_file(
                    marker, b"checkpoints of lmsys-chat-1m-synth (stages/core/runtime/shards.py)\n"
                )
            self._marked = True

    def path(self, stage: str, key: str, index: int) -> str:
        return f"{self.root}/{stage}/{key}/{index:05d}.parquet"

    def read(self, path: str) -> pa.Table | None:
        if not self.fs.exists(path):
            return None
        return pq.read_table(path, filesystem=None if self.local else self.fs)

    def write(self, table: pa.Table, path: str) -> None:
        self.mark()
        if self.local:
            write_table(table, path)
            return
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **PARQUET_OPTIONS)
        self.fs.pipe_file(path, sink.getvalue().to_pybytes())

    def put(self, name: str, data: bytes) -> None:
        """Write `data` to `<root>/<name>` whole: through a renamed temporary file on a local disk."""
        path = f"{self.root}/{name}"
        self.mark()
        if self.local:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        else:
            self.fs.pipe_file(path, data)

    def complete(self, stage: str, key: str) -> None:
        """Mark `key`'s checkpoints as those of a run that assembled its out."""
        self.fs.pipe_file(f"{self.root}/{stage}/{key}/{COMPLETE}", str(int(time.time())).encode())


def rows_digest(table: pa.Table) -> str:
    """The digest of a checkpoint's own rows, stored beside them and checked when it is reused."""
    return input_digest(table.replace_schema_metadata(None))


def _reuse(
    store: CheckpointStore, path: str, want: str, shard: pa.Table, schema: pa.Schema, label: str
) -> pa.Table | None:
    """The checkpoint at `path` if it can be read back, was computed from this input, is intact and
    is valid."""
    try:
        table = store.read(path)
    except (pa.ArrowException, OSError) as err:
        LOG.warning("%s: checkpoint %s cannot be read back (%s): recomputing it", label, path, err)
        return None
    if table is None:
        return None
    meta = table.schema.metadata or {}
    if meta.get(INPUT_DIGEST) != want.encode():
        LOG.info("%s: its input rows changed since %s was written: recomputing it", label, path)
        return None
    table = table.replace_schema_metadata(None)
    if meta.get(ROWS_DIGEST) != rows_digest(table).encode():
        LOG.warning("%s: checkpoint %s does not match its digest (altered): recomputing it", label, path)
        return None
    if problem := mismatch(table, schema, shard):
        LOG.warning("%s: checkpoint %s is invalid (%s): recomputing it", label, path, problem)
        return None
    return table


def statuses_of(table: pa.Table, columns: tuple[str, ...]) -> list[list[str]]:
    """Each row's request statuses, from `columns` (a status, or a list of statuses, per row)."""
    found: list[list[str]] = [[] for _ in range(table.num_rows)]
    for name in columns:
        for row, value in zip(found, table[name].to_pylist(), strict=True):
            row.extend(v for v in (value if isinstance(value, list) else [value]) if v is not None)
    return found


def unfinished_rows(table: pa.Table, columns: tuple[str, ...]) -> list[int]:
    """Positions of the rows holding a request status that is not final (failed, partial, ...)."""
    return [i for i, row in enumerate(statuses_of(table, columns)) if any(map(unfinished, row))]


def merged(old: pa.Table, redone: pa.Table, rows: list[int]) -> pa.Table:
    """`old` with its rows at positions `rows` replaced by those of `redone`, in order."""
    order = list(range(old.num_rows))
    for k, i in enumerate(rows):
        order[i] = old.num_rows + k
    return pa.concat_tables([old, redone.replace_schema_metadata(None)]).take(order)


@dataclass
class _Slot:
    """One shard on its way to `out`: its reused checkpoint, and/or its result (a table or a Future)
    for the whole shard (nothing reused) or for the reused checkpoint's rows at `redo`."""

    index: int
    shard: pa.Table
    path: str
    want: str
    reused: pa.Table | None
    redo: list[int]
    result: pa.Table | Future | None = None

    def ready(self) -> bool:
        return not isinstance(self.result, Future) or self.result.done()


def run_checkpointed(
    shards: Iterable[pa.Table],
    fn: Callable[[pa.Table, int], pa.Table | Future],
    *,
    out: str | Path,
    schema: pa.Schema,
    checkpoints: str | Path,
    stage: str,
    key: str,
    total: int | None = None,
    window: int = 1,
    metadata: dict[bytes, bytes] | None = None,
    statuses: tuple[str, ...] = (),
    tally: Counter | None = None,
    counters: Callable[[], dict] | None = None,
) -> int:
    """Apply `fn(shard, index)` to each input shard and stream the results into `out`; return its rows.

    `fn` returns the result, or a Future of it: up to `window` shards are then in flight at once
    (read ahead, computing, or waiting to be written), and results are written in input order.
    Each result (with `schema`, one row per input row, same conversation_id) is written atomically
    to `<checkpoints>/<stage>/<key>/<i:05d>.parquet` with its input digest and its own digest. A
    rerun reuses a shard only if it reads back, matches both digests and is valid; otherwise it is
    recomputed with a warning. Where `statuses` names the out's request-status columns, a reused
    shard's rows holding an unfinished status are given to `fn` again (those rows only) and merged
    back; `tally` counts every status of `out`. `out` (with `metadata` in its schema) takes its
    place only when every shard is done; other keys' checkpoints are never removed here.
    The run's progress (`counters`: the engines' counters so far) is recorded in
    `<checkpoints>/<stage>/progress.json` (stages/core/runtime/progress.py).
    """
    store, rows, count = CheckpointStore(checkpoints), 0, 0
    tally = Counter() if tally is None else tally
    slots: deque[_Slot] = deque()
    out_schema = schema.with_metadata(metadata) if metadata else schema
    record = ProgressRecord(stage, key, total, lambda data: store.put(f"{stage}/{RECORD}", data), counters)
    with (
        record,
        atomic_path(out) as tmp,
        pq.ParquetWriter(tmp, out_schema, **PARQUET_OPTIONS) as writer,
    ):

        def finish(slot: _Slot) -> None:
            nonlocal rows, count
            table = _result(slot, schema, f"{stage} shard {slot.index:05d}")
            if slot.result is not None:
                store.write(_sealed(table, slot.want), slot.path)
            writer.write_table(table.replace_schema_metadata(metadata))
            tally.update(s for row in statuses_of(table, statuses) for s in row)
            rows, count = rows + table.num_rows, count + 1
            record.shard_done(
                table.num_rows, slot.reused is not None and not slot.redo, bool(slot.redo), tally
            )

        try:
            for i, shard in enumerate(tqdm(shards, desc=stage, unit="shard", total=total)):
                slot = _slot(store, stage, key, i, shard, schema, statuses)
                if slot.reused is None or slot.redo:
                    record.computing()
                if slot.reused is None:
                    slot.result = fn(shard, i)
                elif slot.redo:
                    slot.result = fn(shard.take(slot.redo), i)
                slots.append(slot)
                while slots and (len(slots) >= window or slots[0].ready()):
                    finish(slots.popleft())
            while slots:
                finish(slots.popleft())
        except BaseException:
            for slot in slots:
                if isinstance(slot.result, Future):
                    slot.result.cancel()
            _keep_finished(store, slots, schema, stage)
            raise
        if count == 0:
            raise PipelineError(f"{stage}: no input rows: re-run the stage that writes its input")
    store.complete(stage, key)
    return rows


def _keep_finished(store: CheckpointStore, slots: Iterable[_Slot], schema: pa.Schema, stage: str) -> None:
    """A stopping run's shards that finished but were not yet written (they wait for an earlier one):
    each is checkpointed, so the next run reuses it. One that failed or was cancelled is not."""
    for slot in slots:
        done = isinstance(slot.result, Future) and slot.result.done() and not slot.result.cancelled()
        if not done or slot.result.exception() is not None:
            continue
        label = f"{stage} shard {slot.index:05d}"
        try:
            store.write(_sealed(_result(slot, schema, label), slot.want), slot.path)
        except PipelineError as err:  # a result that is no valid shard: recomputed next run
            LOG.warning("%s: not checkpointed: %s", label, err)
            continue
        LOG.info("%s: shard %05d finished before the stop: checkpointed (%s)", stage, slot.index, slot.path)


def _slot(
    store: CheckpointStore,
    stage: str,
    key: str,
    index: int,
    shard: pa.Table,
    schema: pa.Schema,
    statuses: tuple[str, ...],
) -> _Slot:
    """Shard `index` with its checkpoint, if one can be reused, and the rows of it to ask again."""
    path, want, label = store.path(stage, key, index), input_digest(shard), f"{stage} shard {index:05d}"
    reused = _reuse(store, path, want, shard, schema, label)
    redo = unfinished_rows(reused, statuses) if reused is not None and statuses else []
    if redo:
        LOG.info("%s: %d rows with unfinished requests are asked again (%s)", label, len(redo), path)
    elif reused is not None:
        LOG.info("%s: already done, reusing %s", label, path)
    return _Slot(index, shard, path, want, reused, redo)


def _result(slot: _Slot, schema: pa.Schema, label: str) -> pa.Table:
    """The finished table of a slot: computed, reused, or reused with its redone rows merged in."""
    table = slot.result.result() if isinstance(slot.result, Future) else slot.result
    if table is not None:
        part = slot.shard if slot.reused is None else slot.shard.take(slot.redo)
        if problem := mismatch(table, schema, part):
            raise RuntimeError(f"{label}: the stage returned an invalid shard: {problem}")
    if slot.reused is None:
        return table
    return slot.reused if table is None else merged(slot.reused, table, slot.redo)


def _sealed(table: pa.Table, want: str) -> pa.Table:
    """A checkpoint: the table with its input digest and the digest of its rows in its metadata."""
    return table.replace_schema_metadata({INPUT_DIGEST: want, ROWS_DIGEST: rows_digest(table)})


def key_dirs(store: CheckpointStore) -> list[dict]:
    """Every stage/key directory of `store`: its shards, bytes, when its run completed (or None), and
    whether it holds only what a run writes (shards, their temporary files, the completion marker).
    A symbolic link is never followed (nor listed)."""
    found = []
    for stage_dir in _dirs(store, store.root):
        for key_dir in _dirs(store, stage_dir):
            files = store.fs.ls(key_dir, detail=True)
            marker = [f for f in files if f["name"].rstrip("/").endswith(f"/{COMPLETE}")]
            shards = [f for f in files if f["name"].endswith(".parquet")]
            found.append(
                {
                    "stage": stage_dir.rstrip("/").rsplit("/", 1)[-1],
                    "key": key_dir.rstrip("/").rsplit("/", 1)[-1],
                    "path": key_dir,
                    "shards": len(shards),
                    "bytes": sum(f.get("size") or 0 for f in shards),
                    "completed": int(store.fs.cat_file(marker[0]["name"])) if marker else None,
                    "touched": max((_mtime(f) for f in files), default=0.0),
                    "ours": all(_written_by_a_run(f, store) for f in files),
                }
            )
    return found


def _dirs(store: CheckpointStore, under: str) -> list[str]:
    """The directories right under `under`, symbolic links left out."""
    if not store.fs.exists(under):
        return []
    entries = store.fs.ls(under, detail=True)
    return sorted(e["name"] for e in entries if e["type"] == "directory" and not e.get("islink"))


def _written_by_a_run(info: dict, store: CheckpointStore) -> bool:
    name = info["name"].rstrip("/").rsplit("/", 1)[-1]
    plain = info["type"] == "file" and not info.get("islink")
    temporary = name.startswith(".") and name.endswith(".tmp")  # atomic_path's, of a killed writer
    return plain and (name.endswith(".parquet") or name == COMPLETE or temporary)


def running_keys(store: CheckpointStore, dirs: list[dict]) -> set[tuple[str, str]]:
    """(stage, key) of each run in progress: its progress record says `running` and its process is
    alive (`status.alive`: by pid on this host, by its heartbeat elsewhere)."""
    held, now = set(), time.time()
    for stage in {d["stage"] for d in dirs}:
        try:
            record = json.loads(store.fs.cat_file(f"{store.root}/{stage}/{RECORD}"))
            if alive(record, now):
                held.add((stage, str(record.get("key"))))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # no record, or not a record's shape: holds nothing
    return held


def _mtime(info: dict) -> float:
    """Seconds since the epoch a file was last written, from an fsspec `ls` entry (local or S3)."""
    stamp = info.get("mtime") or info.get("LastModified") or 0.0
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


def prunable(
    dirs: list[dict], older_than_days: float, now: float, held: set[tuple[str, str]] = frozenset()
) -> list[dict]:
    """The key directories `prune` removes: all but each stage's most recently completed key, and of
    those only the ones not written to for longer than the age given, held by no running run (`held`)
    and holding nothing a run does not write."""
    latest: dict[str, dict] = {}
    for d in dirs:
        if d["completed"] is not None and d["completed"] >= latest.get(d["stage"], {}).get("completed", -1):
            latest[d["stage"]] = d
    cutoff = now - older_than_days * 86400
    return [
        d
        for d in dirs
        if d is not latest.get(d["stage"])
        and d["touched"] <= cutoff
        and (d["stage"], d["key"]) not in held
        and d.get("ours", True)
    ]


def checked_store(root: str) -> CheckpointStore:
    """The store at `root`, which must be one: a directory holding STORE_MARKER (every run writes it),
    not a symbolic link. Anything else is refused before anything is listed or deleted."""
    store = CheckpointStore(root)
    if store.local and Path(root).is_symlink():
        raise PipelineError(f"{root} is a symbolic link: give the checkpoint store itself (paths.shards)")
    if not store.fs.exists(f"{store.root}/{STORE_MARKER}"):
        raise PipelineError(
            f"{root} is not a checkpoint store: it holds no {STORE_MARKER}, which every run writes at "
            "the store's root. Give paths.shards of params.yaml (data/.checkpoints by default); a store "
            f"written before this marker existed gets it from the next run that uses it"
        )
    return store


def main(argv: list[str] | None = None) -> None:
    """`list` the checkpoint directories of a store, or `prune` old keys (never a stage's latest, nor
    a key a running run holds, nor one used within --older-than days)."""
    parser = argparse.ArgumentParser(prog="python -m stages.core.runtime.shards", description=main.__doc__)
    parser.add_argument("command", choices=["list", "prune"])
    parser.add_argument("store", help="the checkpoint store: paths.shards in params.yaml, or an fsspec URL")
    parser.add_argument(
        "--older-than",
        type=float,
        default=PRUNE_DAYS,
        metavar="DAYS",
        help=f"prune: age in days ({PRUNE_DAYS:g})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="prune: list what would be removed, remove nothing"
    )
    args = parser.parse_args(argv)
    store = checked_store(args.store)
    dirs = key_dirs(store)
    if args.command == "list":
        for d in dirs:
            done = time.strftime("%Y-%m-%d %H:%M", time.gmtime(d["completed"])) if d["completed"] else "-"
            print(f"{d['stage']}\t{d['key']}\t{d['shards']} shards\t{d['bytes']:,} bytes\tcompleted {done}")
        return
    for d in prunable(dirs, args.older_than, time.time(), running_keys(store, dirs)):
        print(f"{'would remove' if args.dry_run else 'removing'} {d['path']} ({d['shards']} shards)")
        if not args.dry_run:
            store.fs.rm(d["path"], recursive=True)


if __name__ == "__main__":
    run(main)
