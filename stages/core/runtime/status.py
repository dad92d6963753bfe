"""The state of the DAG for the current params.yaml, for `python -m stages.status`: per stage
instance done / running / stale / failed / interrupted / not started, from `dvc status`, DVC's
locks on the outs being written, and the progress records sharded stages keep beside their
checkpoints (stages/core/runtime/progress.py). Reads only: nothing of the project is written
(DVC itself takes its repository lock for the moment `dvc status` runs)."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from stages.core.runtime.progress import HEARTBEAT, RECORD, rate, time_left
from stages.core.storage.atomic import running

# the progress records of a DVC stage: score's judge pass and second turn keep their own
PASSES = {"score": ("score", "second-turn")}
SUMMARY = (  # what summarize gives for each pass
    "stage", "state", "shards_done", "shards_left", "shards_reused", "rows_done", "requests_done",
    "requests_left", "statuses", "tokens_per_second", "cache_hit_rate", "seconds_left", "updated", "error",
)  # fmt: skip
STALE_AFTER = 3 * HEARTBEAT  # a running record not rewritten for this long belongs to a dead process


@dataclass
class StageState:
    name: str
    state: str
    why: str = ""
    passes: list[dict] = field(default_factory=list)


def records(shards: str) -> dict[str, dict]:
    """stage label (generate@gemma3, second-turn@gemma2, ...) -> its last run's progress record; a
    record that is not a progress record's shape is {"stage", "state": "damaged", "error"} (that
    stage's problem, shown as such: the others read as usual)."""
    fs, root = fsspec.core.url_to_fs(shards)
    found = {}
    for path in fs.glob(f"{root}/*/{RECORD}"):
        label = path.rsplit("/", 2)[-2]
        try:
            data = json.loads(fs.cat_file(path))
        except OSError:
            continue  # being replaced: the next look finds it
        except ValueError as err:
            data = {"stage": label, "state": "damaged", "error": f"{path} is not JSON: {err}"}
        if problem := damage(data):
            data = {"stage": label, "state": "damaged", "error": f"{path}: {problem}"}
        found[data["stage"]] = data
    return found


RECORD_FIELDS = {"stage": str, "state": str, "pid": int, "shards_done": int, "rows_done": int}


def damage(record: object) -> str | None:
    """What is wrong with a progress record's shape, or None."""
    if not isinstance(record, dict):
        return f"a progress record is a JSON object, found {type(record).__name__}"
    if record.get("state") == "damaged":
        return None
    for name, kind in RECORD_FIELDS.items():
        value = record.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name} is {value!r}, not {kind.__name__}"
    for name in ("statuses", "requests"):
        if not isinstance(record.get(name, {}), dict):
            return f"{name} is {record[name]!r}, not an object"
    return None


def alive(record: dict, now: float) -> bool:
    """Whether the process that keeps `record` still runs: by its pid on this host, else by the
    age of its last rewrite (it rewrites every HEARTBEAT seconds while running)."""
    if record.get("state") != "running":
        return False
    if record.get("host") == socket.gethostname():
        return running(int(record["pid"]))
    return now - record.get("updated", 0) <= STALE_AFTER


def written_outs(repo_root: Path) -> set[str]:
    """Outs DVC holds a write lock on for a live process (`dvc repro` running their stage)."""
    try:
        lock = json.loads((repo_root / ".dvc" / "tmp" / "rwlock").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    outs, root = set(), repo_root.resolve()
    for path, info in (lock.get("write") or {}).items() if isinstance(lock, dict) else ():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            continue
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
        if os.path.isabs(path):  # DVC records absolute paths; outs are relative to the repository
            path = os.path.relpath(path, root)
        outs.add(os.path.normpath(path))
    return outs


def summarize(record: dict, now: float) -> dict:
    """A record's figures for the screen: shards, requests, statuses, tokens/s, cache hit rate, ETA."""
    if record.get("state") == "damaged":
        return dict.fromkeys(SUMMARY, None) | {
            "stage": record["stage"],
            "state": "damaged",
            "error": record["error"],
            "shards_done": 0,
            "shards_reused": 0,
            "requests_done": 0,
            "statuses": {},
        }
    requests = record.get("requests", {})
    asked = requests.get("requests", 0)
    total, done = record.get("shards_total"), record.get("shards_done", 0)
    per_shard = asked / max(1, done - record.get("shards_reused", 0))
    state = record["state"] if record["state"] != "running" or alive(record, now) else "stopped"
    return {
        "stage": record["stage"],
        "state": state,
        "shards_done": done,
        "shards_left": None if total is None else total - done,
        "shards_reused": record.get("shards_reused", 0),
        "rows_done": record.get("rows_done", 0),
        "requests_done": asked,
        "requests_left": None if total is None else round((total - done) * per_shard),
        "statuses": record.get("statuses", {}),
        "tokens_per_second": rate(record.get("samples", []), "completion_tokens", now),
        "cache_hit_rate": requests.get("from_cache", 0) / asked if asked else None,
        "seconds_left": time_left(record) if state == "running" else None,
        "updated": record.get("updated"),
        "error": record.get("error"),
    }


def dag_state(
    stages: list[tuple[str, list[str]]], changed: dict, shards: str, repo_root: Path
) -> list[StageState]:
    """Each stage instance (name, its outs) in DAG order with its state. `changed` is `dvc status`'s
    answer (stage -> its changes; absent: up to date)."""
    now, found, writing = time.time(), records(shards), written_outs(repo_root)
    states = []
    for name, outs in stages:
        stage, _, key = name.partition("@")
        labels = [f"{p}@{key}" if key else p for p in PASSES.get(stage, (stage,))]
        passes = [summarize(found[label], now) for label in labels if label in found]
        if any(os.path.normpath(o) in writing for o in outs) or any(p["state"] == "running" for p in passes):
            states.append(StageState(name, "running", passes=passes))
            continue
        if name not in changed:
            states.append(StageState(name, "done", passes=passes))
            continue
        ended = [p for p in passes if p["state"] in ("failed", "interrupted", "stopped", "damaged")]
        if ended:
            why = ended[-1]["error"] or f"its last run {ended[-1]['state']}"
            states.append(StageState(name, ended[-1]["state"], why, passes))
        elif outs and all(not Path(repo_root, o).exists() for o in outs):
            states.append(StageState(name, "not started", passes=passes))
        else:
            states.append(StageState(name, "stale", describe(changed[name]), passes))
    return states


def describe(changes: list) -> str:
    """`dvc status`'s changes of one stage in a few words (what changed: deps, outs, params)."""
    parts = []
    for change in changes:
        if isinstance(change, str):
            parts.append(change)
            continue
        for kind, what in change.items():
            names = ", ".join(sorted(what)) if isinstance(what, dict) else str(what)
            parts.append(f"{kind}: {names}")
    text = "; ".join(parts)
    return text if len(text) <= 160 else text[:157] + "..."


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    return (
        f"{days}d {hours}h"
        if days
        else f"{hours}h {minutes:02d}m"
        if hours
        else f"{minutes}m {seconds % 60:02d}s"
    )


def render(states: list[StageState]) -> str:
    """One screen of plain text: a line per stage instance, an indented line per sharded pass."""
    lines = []
    for s in states:
        lines.append(f"{s.name:<24} {s.state:<12} {s.why}".rstrip())
        for p in s.passes:
            if p["state"] == "damaged":
                lines.append(f"  {p['stage']:<22} damaged     {p['error']}")
                continue
            total = "?" if p["shards_left"] is None else p["shards_done"] + p["shards_left"]
            tps = "-" if p["tokens_per_second"] is None else f"{p['tokens_per_second']:,.0f}"
            hits = "-" if p["cache_hit_rate"] is None else f"{p['cache_hit_rate']:.0%}"
            statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(p["statuses"].items())) or "-"
            left = "?" if p["requests_left"] is None else f"{p['requests_left']:,}"
            lines.append(
                f"  {p['stage']:<22} {p['state']:<11} shards {p['shards_done']}/{total} "
                f"(reused {p['shards_reused']})  requests {p['requests_done']:,} done, ~{left} left  "
                f"tokens/s {tps}  cache hits {hits}  left {duration(p['seconds_left'])}"
            )
            lines.append(f"  {'':<22} statuses: {statuses}")
    return "\n".join(lines)
