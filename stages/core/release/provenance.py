"""What a release was built from (package's manifest `provenance`, shown by the dataset card): the code,
its dependency lock and the libraries that write the bytes, the pinned sources, the judge prompt, and a
fingerprint of the params that change the rows, and the sha256 of each of the publisher's materials
fetched beside them."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from stages.core.config.params import Params
from stages.core.config.project import distribution_version
from stages.core.rows.prompts import PROMPT_DIR, PUBLISHED, PUBLISHED_FILE, published_judge
from stages.core.storage.jsonl import sha256_file
from stages.core.storage.resume import digest, recipe

LOCKS = ["requirements/test.lock", "requirements/demo.lock"]  # the dependency locks `make` installs
CODE = ["stages", "scripts", "dvc.yaml", "pyproject.toml", *LOCKS]  # what builds a release
LIBRARIES = ["pyarrow", "polars", "orjson", "zlib-ng", "python-gnupg"]  # what writes its bytes


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def code_provenance(root: Path = Path(".")) -> dict:
    """The code a release is built from, in terms that do not move with unrelated git history: the
    last commit that changed the code (not HEAD, not a describe of the latest tag), the code files
    that differ from it (uncommitted), a digest of the code's content, the dependency lock's digest
    and the versions of the libraries that write the release's bytes. No timestamps."""
    files = sorted(
        p
        for name in CODE
        for p in ([root / name] if (root / name).is_file() else (root / name).rglob("*"))
        if p.is_file() and not _bytecode(p.as_posix())
    )
    lock = next((root / name for name in LOCKS if (root / name).is_file()), None)
    changed = _git(root, "diff", "--name-only", "HEAD", "--", *CODE) or ""
    dirty = changed + "\n" + (_git(root, "ls-files", "--others", "--exclude-standard", "--", *CODE) or "")
    return {
        "git_commit": _git(root, "log", "-1", "--format=%H", "--", *CODE),
        "uncommitted": sorted(f for f in dirty.split() if not _bytecode(f)),
        "code_sha256": _digest_files(files, root),
        "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock else None,
        "libraries": {name: distribution_version(name) for name in LIBRARIES},
    }


def _bytecode(path: str) -> bool:
    return "__pycache__/" in path or path.endswith((".pyc", ".pyo"))


def _digest_files(files: list[Path], root: Path) -> str:
    """sha256 over the files' paths (relative to `root`) and contents, in order."""
    found = hashlib.sha256()
    for path in files:
        found.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return found.hexdigest()


def provenance(params: Params, name: str) -> dict:
    """What a release was built from: code (`code_provenance`), sources (pinned revisions), and a
    fingerprint of every parameter that changes the variant's rows (runtime knobs excluded, like the
    resume keys)."""
    variant, fetch = params.models[name], params.fetch
    return {
        "code": code_provenance(),
        "sources": {
            key: {"uri": spec.uri, "revision": spec.revision}
            for key, spec in (("source", fetch.source), ("released", fetch.released))
        },
        "subset": variant.subset,
        "judge_prompt": judge_prompt(params, name),
        "published_materials": published_materials(params.paths.released),
        "params_fingerprint": digest(
            params.seed,
            recipe(fetch),
            recipe(params.decrypt),
            recipe(params.translate),
            recipe(variant),
            recipe(params.release),
        ),
    }


def published_materials(released: str | Path) -> dict[str, str]:
    """The publisher's own files that fetch copied beside the encrypted instructions (materials/, scripts/,
    the licence texts at the root: conf/source's `released.include`), path -> sha256: which of them a
    release was built beside, at the revision `sources.released` names. The encrypted data (dataset/)
    is not listed: its bytes are the instructions', recorded by the release's own files."""
    root = Path(released)
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).parts[0] != "dataset"
    }


def judge_prompt(params: Params, name: str) -> dict | None:
    """Which prompt scored variant `name`: the setting (`score.prompt`), the prompt's name, the file it
    came from (with the released repository's uri and revision for `published`) and that file's
    sha256. None where score kept the published file's judgements (generate.source published, no
    rejudge: no judge ran, as stages/core/runtime/scoring.py decides)."""
    variant = params.models[name]
    if variant.generate.source == "published" and not variant.score.rejudge:
        return None
    setting = variant.score.prompt
    if setting == PUBLISHED:
        chosen, released = published_judge(params.paths.released), params.fetch.released
        return {
            "setting": setting,
            "name": chosen.name,
            "file": PUBLISHED_FILE,
            "uri": released.uri,
            "revision": released.revision,
            "sha256": chosen.sha256,
        }
    path = PROMPT_DIR / f"{setting}.txt"
    return {
        "setting": setting,
        "name": setting,
        "file": path.relative_to(PROMPT_DIR.parents[1]).as_posix(),  # this project's stages/prompts/
        "uri": None,
        "revision": None,
        "sha256": sha256_file(path),
    }
