"""Prompt templates (stages/prompts/<name>.txt, `string.Template` with $fields) and message builders."""

from __future__ import annotations

import functools
from pathlib import Path
from string import Template

from stages.core.config.errors import PipelineError

PROMPT_DIR = Path(__file__).resolve().parents[2] / "prompts"


def template(name: str) -> Template:
    """Load stages/prompts/<name>.txt; an unknown name raises listing the available ones."""
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        names = sorted(p.name.removesuffix(".txt") for p in PROMPT_DIR.iterdir() if p.name.endswith(".txt"))
        raise PipelineError(f"prompt {name!r} not found in {PROMPT_DIR}; available: {', '.join(names)}")
    return _load(path)


@functools.cache
def _load(path: Path) -> Template:
    return Template(path.read_text(encoding="utf-8").strip())


def user_turn(name: str, **fields: str) -> list[dict[str, str]]:
    """One user message rendered from template `name`."""
    return [{"role": "user", "content": template(name).substitute(**fields)}]


def with_system(system_prompt: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages
