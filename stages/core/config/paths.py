"""paths.*: where every stage reads and writes, and the validators of a path param (inside the
repository) and of a location (a path inside it, or an fsspec URL)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from stages.core.config.schema import Strict

SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://")  # an fsspec URL: s3://, hf://, gs://, file://, ...


def _inside(value: str) -> str:
    """A path param: relative to the repository (where params.yaml is) or absolute inside it, and
    never leaving it through `..` (read lexically: a data/ that links to another disk is fine)."""
    if SCHEME.match(value):
        raise ValueError(f"a path of the repository, not a URL: {value!r}")
    path = Path(value)
    if path.is_absolute():
        root = Path.cwd()
        if not Path(os.path.normpath(path)).is_relative_to(root):
            raise ValueError(f"{value!r} is outside the repository ({root}): give a path inside it")
        return value
    if os.path.normpath(path).split(os.sep)[0] == "..":
        raise ValueError(f"{value!r} leaves the repository: give a path inside it")
    return value


def _inside_or_url(value: str) -> str:
    """A location that is an fsspec URL (an explicit scheme: s3://, hf://, file:///mnt/...) or a path
    inside the repository (`_inside`)."""
    return value if SCHEME.match(value) else _inside(value)


RepoPath = Annotated[str, AfterValidator(_inside)]  # paths.*: inside the repository
Location = Annotated[str, AfterValidator(_inside_or_url)]  # sources, stores: a URL or a repository path


class Paths(Strict):
    source: RepoPath  # fetched LMSYS-Chat-1M files, laid out as on the Hub
    released: RepoPath  # fetched encrypted instruction files
    manifest: RepoPath  # every fetched file with its uri, revision, size and sha256
    first_turn: RepoPath  # filtered first-turn table (Parquet)
    metrics: RepoPath  # directory: fetch.json, package-<variant>.json (DVC metrics)
    # decrypted Japanese instructions, <instructions>-<subset>.parquet (plaintext: private remote only)
    instructions: RepoPath
    # one row per conversation with its Japanese instruction, <translated>-<subset>.parquet (private)
    translated: RepoPath
    generated: RepoPath  # directory: <variant>.parquet
    scored: RepoPath  # directory: <variant>.parquet
    release: RepoPath  # directory: <variant>/
    sft: RepoPath  # directory: <variant>/<option set>.jsonl.gz (LMSYS-derived text: private)
    # directory: <variant>.jsonl.gz, the release with its Japanese instructions and LMSYS-Chat-1M's
    # columns, as we read the published merge scripts (docs/assumptions.md 19; stages/merge.py; LMSYS
    # text: private)
    merged: RepoPath
    checkpoints: RepoPath  # shard checkpoints and intermediate files of long stages (not a DVC out)
    # shard checkpoints elsewhere (null: checkpoints): an fsspec URL (s3://, file:///shared/...) or a path
    checkpoint_store: Location | None = None
    response_cache: (
        RepoPath  # the response cache, a SQLite file (stages/core/storage/cache.py; not a DVC out)
    )
    published: RepoPath  # fetched published release files (release/published.py; not a DVC out)
    # fetch's files whose bytes params fix (a sha256 pin, a Hub commit), kept once so a re-run of fetch
    # downloads nothing it has (stages/core/storage/source.py; not a DVC out)
    fetched: RepoPath

    @property
    def shards(self) -> str:
        """Where finished shards are checkpointed."""
        return self.checkpoint_store or self.checkpoints

    def instructions_of(self, subset: str) -> str:
        """decrypt@<subset>'s out: the released Japanese instructions of that subset."""
        return f"{self.instructions}-{subset}.parquet"

    def translated_of(self, subset: str) -> str:
        """translate@<subset>'s out: that subset's conversations with their Japanese instructions."""
        return f"{self.translated}-{subset}.parquet"

    def generated_of(self, variant: str) -> str:
        """generate@<variant>'s out: its responses and their statuses."""
        return f"{self.generated}/{variant}.parquet"

    def annotations_of(self, variant: str) -> str:
        """generate@<variant>'s other out: the flags and two-turn ids of each translated row, the
        published file's or ours (stages/core/release/flags.py)."""
        return f"{self.generated}/{variant}.annotations.parquet"

    def scored_of(self, variant: str) -> str:
        """score@<variant>'s out: its judgements, best responses and second turns."""
        return f"{self.scored}/{variant}.parquet"

    def release_of(self, variant: str) -> str:
        """package@<variant>'s out: the release directory."""
        return f"{self.release}/{variant}"

    def not_released_of(self, subset: str) -> str:
        """translate@<subset>'s list of the conversation_ids its filter keeps that the release lacks."""
        return f"{self.translated}-{subset}.not-released.txt"

    def metrics_of(self, stage: str) -> str:
        """A stage instance's metrics file (`fetch`, `generate@gemma3`, ...): <metrics>/<stage>-<key>.json."""
        return f"{self.metrics}/{stage.replace('@', '-')}.json"

    def plots_of(self, variant: str) -> str:
        """The plot tables of package@<variant> and compare@<variant> (`dvc plots diff`)."""
        return f"{self.metrics}/plots/{variant}"

    def report_of(self, stage: str) -> str:
        """A stage instance's Markdown report (compare@<variant>): <metrics>/<stage>-<key>.md."""
        return f"{self.metrics}/{stage.replace('@', '-')}.md"

    def stage_out(self, stage: str) -> str:
        """The intermediate out of a stage's sharded pass (e.g. translate@ja's translator answers)."""
        return f"{self.checkpoints}/{stage}.parquet"
