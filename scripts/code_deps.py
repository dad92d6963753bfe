"""`python -m scripts.code_deps [--check]`: write each dvc.yaml stage's code deps from its imports.

A stage's code deps are its entry module and the layer folders of stages/core (config, storage, rows,
engines, runtime, release) holding a module the entry imports, transitively, lazy imports included
(`closure`), or all of stages/core where it reaches every layer: so fetch and decrypt, which import no
engine and no release code, never re-run for an engine or release change. Folders, not modules,
because every dep costs every DVC command time (benchmarks/README.md: the no-op `dvc repro`); the
resume keys, which see the exact modules, decide what a re-run really recomputes. `--check` changes
nothing and exits 1 naming the stages whose deps differ (tests/test_resume.py runs it)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from stages.core.config.cli import summary
from stages.core.storage.meaning import closure

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = ROOT / "dvc.yaml"
ENTRY = re.compile(r"^\s*cmd: python -m (stages\.\w+)")
CODE_DEP = re.compile(r"^(\s*)- stages/(?:core(?:/\w+)?|\w+\.py)\s*(?:#.*)?$")  # one generated line
MARK = "  # code: python -m scripts.code_deps"


def code_deps(entry: str) -> list[str]:
    """The entry module's file and the stages/core layer folders its imports reach (a package marker
    that only holds a docstring, stages/core/__init__.py, runs nothing and is left out)."""
    files = [p.relative_to(ROOT).as_posix() for p in closure(entry, lazy=True).values()]
    layers = sorted({"/".join(f.split("/")[:3]) for f in files if f.count("/") >= 3})
    own = [f for f in files if f.count("/") == 1 and f != "stages/__init__.py"]
    every = sorted(
        p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "stages/core").glob("*/__init__.py")
    )
    return own + (["stages/core"] if layers == every else layers)  # every layer: one dep, not six


def rewritten(text: str) -> tuple[str, list[str]]:
    """dvc.yaml's text with each stage's code deps generated, and the stages whose deps changed."""
    out: list[str] = []
    changed: list[str] = []
    entry, block, indent = None, [], ""

    def flush() -> None:
        nonlocal block
        if block:
            want = [f"{indent}- {dep}" for dep in code_deps(entry)]
            want[0] += MARK
            if [line.split("  #")[0].rstrip() for line in block] != [w.split("  #")[0] for w in want]:
                changed.append(entry)
            out.extend(want)
            block = []

    for line in text.splitlines():
        if found := ENTRY.match(line):
            entry = found[1]
        code = CODE_DEP.match(line)
        if code and entry is not None:
            indent = code[1]
            block.append(line)
            continue
        flush()
        out.append(line)
    flush()
    return "\n".join(out) + "\n", changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.code_deps", description=summary(__doc__))
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if dvc.yaml differs")
    args = parser.parse_args(argv)
    text = DVC_YAML.read_text(encoding="utf-8")
    new, changed = rewritten(text)
    if args.check:
        if new != text:
            print(f"dvc.yaml's code deps differ from the imports of {', '.join(changed) or 'a stage'}: run "
                  "python -m scripts.code_deps", file=sys.stderr)  # fmt: skip
            sys.exit(1)
        return
    DVC_YAML.write_text(new, encoding="utf-8")
    print(f"dvc.yaml: code deps of {', '.join(changed) or 'no stage'} rewritten")


if __name__ == "__main__":
    main()
