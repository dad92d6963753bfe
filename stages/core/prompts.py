"""Prompt templates (stages/prompts/<name>.txt, `string.Template` with $fields) and message builders."""

from __future__ import annotations

import functools
from importlib import resources
from string import Template


@functools.cache
def template(name: str) -> Template:
    """Load stages/prompts/<name>.txt; an unknown name raises listing the available ones."""
    folder = resources.files("stages") / "prompts"
    path = folder / f"{name}.txt"
    if not path.is_file():
        names = sorted(p.name.removesuffix(".txt") for p in folder.iterdir() if p.name.endswith(".txt"))
        raise ValueError(f"prompt {name!r} not found; available: {', '.join(names)}")
    return Template(path.read_text(encoding="utf-8").strip())


def user_turn(name: str, **fields: str) -> list[dict[str, str]]:
    """One user message rendered from template `name`."""
    return [{"role": "user", "content": template(name).substitute(**fields)}]


def with_system(system_prompt: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages
