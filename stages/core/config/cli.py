"""What every stage entry module shares: logging, the variant argument, validated params, a check
that its inputs exist, timing."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from stages.core.config.errors import PipelineError, SourceError
from stages.core.config.params import Params, load_params

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
TRACEBACK_ENV = "LMSYS_SYNTH_TRACEBACK"  # set to 1 to see the traceback of an expected failure
EXIT_EXPECTED = 2
# stage -> the data it reads, as dvc.yaml's deps list them (tests/test_cli.py compares them), each
# checked before any work
READS = {
    "fetch": (),
    "decrypt": ("source", "released"),
    "translate": ("first_turn", "instructions"),
    "generate": ("translated",),
    "score": ("released", "translated", "generated", "annotations"),
    "package": ("source", "released", "translated", "generated", "annotations", "scored"),
    "compare": ("translated", "release"),
    "merge": ("source", "translated", "release"),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop): the stage stops as on Ctrl-C."""


def summary(doc: str | None) -> str:
    """A --help description: the docstring's first paragraph on one line, so it ends where its
    sentence does (not where the docstring's first line breaks)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def run(main: Callable[[], None]) -> None:
    """Run an entry point; an expected failure (PipelineError) becomes a few lines and exit status 2.

    Any other exception is a bug and keeps its traceback. SIGINT (Ctrl-C) and SIGTERM (`kill`, a
    scheduler's stop) abort the engines' requests in flight, keep every finished shard and answer, run
    every `finally` (temporary files and plaintext are removed) and end in one line, exit status
    128 + the signal's number.
    """
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except KeyboardInterrupt as stop:
        signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
        print(
            f"stopped by {signum.name}: finished shards and every answer that came back are kept; "
            "re-run to go on",
            file=sys.stderr,
        )
        sys.exit(128 + signum)
    except PipelineError as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {err}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        sys.exit(EXIT_EXPECTED)


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def start(
    stage: str, doc: str, variant: bool = False, check: Callable[[Params, str], None] | None = None
) -> tuple[Params, str | None]:
    """Parse the command line, set up logging, load params.yaml (validated), check the variant, run
    the stage's own params `check` (a bad setting is named before a missing input), then check that
    the stage's inputs exist."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=summary(doc))
    if variant:
        parser.add_argument("variant", help="a key of `models` in params.yaml, e.g. gemma3")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    params = load_params()
    name = getattr(args, "variant", None)
    if name is not None:
        params.variant(name)
    if check is not None:
        check(params, name)
    check_inputs(params, stage, name, params.models[name].subset if name else None)
    return params, name


def start_subsets(stage: str, doc: str) -> tuple[Params, list[str]]:
    """As `start`, for a stage that runs per released subset: the subsets named on the command line
    (each one of decrypt.subsets), or every one of decrypt.subsets when none is named."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=summary(doc))
    parser.add_argument(
        "subsets", nargs="*", help="released subsets (ja, ja+unsafe); default: decrypt.subsets"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    params = load_params()
    unknown = [s for s in args.subsets if s not in params.decrypt.subsets]
    if unknown:
        raise PipelineError(
            f"unknown subset {', '.join(unknown)}; params.yaml decrypt.subsets: "
            + ", ".join(params.decrypt.subsets)
        )
    subsets = args.subsets or list(params.decrypt.subsets)
    for subset in subsets:
        check_inputs(params, stage, subset, subset)
    return params, subsets


def stage_input(params: Params, kind: str, name: str | None, subset: str | None) -> tuple[str, str]:
    """The file of `kind` (a value of READS) that a stage of variant or subset `name` reads (`subset`:
    the variant's subset), and the stage that writes it."""
    paths = params.paths
    return {
        "source": (paths.source, "fetch"),
        "released": (paths.released, "fetch"),
        "first_turn": (paths.first_turn, "fetch"),
        "instructions": (paths.instructions_of(subset), f"decrypt@{subset}"),
        "translated": (paths.translated_of(subset), f"translate@{subset}"),
        "generated": (paths.generated_of(name), f"generate@{name}"),
        "annotations": (paths.annotations_of(name), f"generate@{name}"),
        "scored": (paths.scored_of(name), f"score@{name}"),
        "release": (paths.release_of(name), f"package@{name}"),
    }[kind]


def check_inputs(params: Params, stage: str, name: str | None, subset: str | None) -> None:
    """Raise SourceError naming the first input of `stage` (for variant or subset `name`) that does
    not exist, and the `dvc repro` that makes it."""
    running = f"{stage}@{name}" if name else stage
    for kind in READS[stage]:
        path, made_by = stage_input(params, kind, name, subset)
        if not Path(path).exists():
            raise SourceError(
                f"{path} does not exist: run `dvc repro {made_by}` (or `dvc repro {running}`, which "
                "runs what it needs)"
            )


@contextlib.contextmanager
def timed(log: logging.Logger, what: str) -> Iterator[Counter]:
    """Log `what` with the counts (rows in/out...) the block records and the seconds it took."""
    counts: Counter = Counter()
    began = time.perf_counter()
    yield counts
    detail = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in counts.items())
    log.info("%s: %s in %.1f s", what, detail, time.perf_counter() - began)
