"""status: where the DAG stands for the current params.yaml, on one screen (or --json).

Per stage instance: done, running, stale (what changed), failed or interrupted (its last run's
error), not started; for the sharded stages (generate, score and its second turn, an LLM
translator), shards and requests done and left, request statuses, tokens per second over the last
ten minutes, the response cache's hit rate and the time left at the pace of this run. Read from
dvc.lock and the deps and outs (as `dvc status` compares them, without DVC's locks), DVC's write
locks and the progress records beside the checkpoints (paths.shards). It takes no lock and writes
nothing of the project; run it beside a `dvc repro` that takes days, on the host or any other that
sees the checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stages.core.config.cli import LOG_FORMAT, run, summary
from stages.core.config.errors import PipelineError
from stages.core.config.params import load_params
from stages.core.runtime.status import dag_state, render


def dvc_view(root: Path) -> tuple[list[tuple[str, list[str]]], dict]:
    """Stage instances in DAG order (upstream first) with their outs, and each one's changes against
    dvc.lock (`dvc status`'s answer), read without DVC's locks (`changes`)."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            graph = repo.index.graph
            order = [s for s in reversed(list(nx.lexicographical_topological_sort(graph, key=str)))]
            stages = [(s.addressing, [str(o.def_path) for o in s.outs]) for s in order if s.addressing]
            changed = {}
            for stage in order:
                if stage.addressing:
                    changed.update(changes(stage))
    except DvcException as err:
        raise PipelineError(f"dvc status failed in {root}: {err}") from err
    return stages, changed


def changes(stage: Any) -> dict:
    """What `dvc status` says of one stage (its changed deps, outs, params and command against
    dvc.lock), by the steps of DVC 3's `Stage.status` without the read locks it takes on the stage's
    deps and outs: a running `dvc repro` holds a write lock on those, and `dvc status` fails beside it
    ("is busy"). The outs of a running stage are then missing or half-written; dag_state reads that
    stage as running from DVC's lock file. tests/test_pipeline.py runs this beside a live repro."""
    found: list = []
    if not stage.frozen:
        stage._status_deps(found)
    stage._status_outs(found, filter_info=None)
    stage._status_always_changed(found)
    stage._status_stage(found)
    return {stage.addressing: found} if found else {}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.status", description=summary(__doc__))
    parser.add_argument("--json", action="store_true", help="print the state as JSON, for scripts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    params, root = load_params(), Path.cwd()
    stages, changed = dvc_view(root)
    states = dag_state(stages, changed, params.paths.shards, root)
    if args.json:
        json.dump([asdict(s) for s in states], sys.stdout, indent=2)
        print()
    else:
        print(render(states))


if __name__ == "__main__":
    run(main)
