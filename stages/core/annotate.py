"""Row logic of translate: empty, duplicate-of and template annotations of Japanese instructions."""

from __future__ import annotations

import re


def empty_flags(instructions: list[str | None]) -> list[bool]:
    return [not (text or "").strip() for text in instructions]


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
            raise ValueError(f"translate.templates[{category!r}]: bad regex {pattern!r}: {err}") from err
    return compiled


def template_category(text: str | None, templates: list[tuple[str, re.Pattern]]) -> str | None:
    """The first template category whose regex matches the original instruction, else None."""
    for category, pattern in templates:
        if text and pattern.search(text):
            return category
    return None
