"""Release notes of two tagged releases from DVC's own diffs: params, metrics and outputs that changed."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from stages.core.config.errors import PipelineError

LOG = logging.getLogger("stages.release_notes")
DVC = [sys.executable, "-m", "dvc"]  # the DVC installed beside this project, whether or not on PATH


def dvc_json(*args: str) -> dict:
    """Run `dvc <args> --json` and return its output; a failure names the command and DVC's message."""
    command = ["dvc", *args, "--json"]
    done = subprocess.run([*DVC, *command[1:]], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PipelineError(f"`{' '.join(command)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return json.loads(done.stdout or "{}")


def _cell(value: object, figure: bool) -> str:
    """A table cell: a figure formatted for reading (1,234; 5.25), a parameter as its YAML/JSON value."""
    if value is None:
        return "—"
    if not figure:
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"`{value}`"


def _change_rows(diff: dict) -> list[tuple[str, str, dict]]:
    """(file, key, {old, new, diff}) of a `dvc params/metrics diff --json` output, sorted."""
    return sorted((path, key, change) for path, keys in diff.items() for key, change in keys.items())


def _section(title: str, rows: list[tuple[str, str, dict]], empty: str, with_diff: bool) -> list[str]:
    lines = [f"## {title}", ""]
    if not rows:
        return [*lines, empty, ""]
    header = "| file | key | old | new |" + (" change |" if with_diff else "")
    lines += [header, "|---" * (5 if with_diff else 4) + "|"]
    for path, key, change in rows:
        cells = [
            f"`{path}`",
            f"`{key}`",
            _cell(change.get("old"), with_diff),
            _cell(change.get("new"), with_diff),
        ]
        if with_diff:
            cells.append(_cell(change.get("diff"), True))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _outputs(diff: dict) -> list[str]:
    lines = ["## Outputs", ""]
    kinds = [
        (kind, sorted(e["path"] for e in diff.get(kind, []))) for kind in ("added", "modified", "deleted")
    ]
    renamed = [f"{e['path']['old']} → {e['path']['new']}" for e in diff.get("renamed", [])]
    kinds.append(("renamed", sorted(renamed)))
    if not any(paths for _, paths in kinds):
        return [*lines, "No output changed.", ""]
    for kind, paths in kinds:
        lines += [f"- **{kind}**: `{p}`" for p in paths]
    missing = diff.get("not in cache", [])
    if missing:
        lines.append(f"- {len(missing)} output(s) not in the local cache: `dvc pull` for their file lists")
    return [*lines, ""]


def release_notes(old: str, new: str) -> str:
    """The Markdown notes between two revisions."""
    params = _change_rows(dvc_json("params", "diff", old, new))
    metrics = _change_rows(dvc_json("metrics", "diff", old, new))
    outputs = dvc_json("diff", old, new)
    return "\n".join(
        [
            f"# Release notes: {old} → {new}",
            "",
            *_section("Parameters", params, "No parameter changed.", with_diff=False),
            *_section("Figures", metrics, "No metric changed.", with_diff=True),
            *_outputs(outputs),
            f"Plots side by side: `dvc plots diff {old} {new} --open`.",
            "",
        ]
    )
