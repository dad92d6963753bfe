"""Row logic of translate: empty, duplicate-of, template and failed-translation flags."""

from __future__ import annotations

import re

import pyarrow as pa

from stages.core.errors import PipelineError


def empty_flags(instructions: list[str | None]) -> list[bool]:
    """An empty instruction is an empty (or blank) text; a failed translation (None) is not empty."""
    return [text is not None and not text.strip() for text in instructions]


def duplicate_of(ids: list[str], instructions: list[str | None]) -> list[str | None]:
    """conversation_id of the first earlier row with the identical (non-empty) instruction, else None."""
    first: dict[str, str] = {}
    out: list[str | None] = []
    for cid, text in zip(ids, instructions, strict=True):
        if not (text or "").strip():
            out.append(None)
            continue
        out.append(first.get(text))
        first.setdefault(text, cid)
    return out


def compile_templates(templates: dict[str, str]) -> list[tuple[str, re.Pattern]]:
    compiled = []
    for category, pattern in templates.items():
        try:
            compiled.append((category, re.compile(pattern)))
        except re.error as err:
            raise PipelineError(f"translate.templates[{category!r}]: bad regex {pattern!r}: {err}") from err
    return compiled


def template_category(text: str | None, templates: list[tuple[str, re.Pattern]]) -> str | None:
    """The first template category whose regex matches the original instruction, else None."""
    for category, pattern in templates:
        if text and pattern.search(text):
            return category
    return None


def with_flags(table: pa.Table, templates: list[tuple[str, re.Pattern]]) -> pa.Table:
    """Append the published flags (over `instruction_ja`; templates over the original `instruction`)
    and `translation_failed` (no Japanese instruction: the translator failed)."""
    ids, texts = table["conversation_id"].to_pylist(), table["instruction_ja"].to_pylist()
    originals = table["instruction"].to_pylist()
    flags = {
        "empty_user_instruction_ja": pa.array(empty_flags(texts), pa.bool_()),
        "duplicate_user_instruction_ja": pa.array(duplicate_of(ids, texts), pa.string()),
        "is_template_instruction": pa.array(
            [template_category(t, templates) for t in originals], pa.string()
        ),
        "translation_failed": pa.array([t is None for t in texts], pa.bool_()),
    }
    for name, column in flags.items():
        table = table.append_column(name, column)
    return table
