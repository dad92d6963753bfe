"""The base of every params model (Strict), the markers of its fields that resume keys read, and the
field types and patterns several params modules share."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

RUNTIME = {"runtime": True}  # json_schema_extra of a params field that never changes results
# json_schema_extra of a params field left out of resume.recipe() while it holds its default: a knob
# added later, whose default changes nothing, leaves the keys of configs that do not set it as they were
OMIT_DEFAULT = {"omit_default": True}
SHA256 = r"[0-9a-f]{64}"
COMMIT = r"[0-9a-f]{40}"
FILE_NAME = r"^[A-Za-z0-9{][A-Za-z0-9._+{}-]*$"  # a name that becomes one path component, never ../ or /


def _hex_digests(pins: dict[str, str]) -> dict[str, str]:
    bad = [name for name, digest in pins.items() if not re.fullmatch(SHA256, digest)]
    if bad:
        raise ValueError(f"not 64 lowercase hex digits for {bad}")
    return pins


Pins = Annotated[dict[str, str], AfterValidator(_hex_digests)]  # sha256 checksums by file name
# a prompt template's name: stages/prompts/<name>.txt, never a path (no "/", no ".."), so a prompt is
# always a file of the repository and never any text file the user can read
PROMPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")


def _prompt_name(value: str) -> str:
    if not PROMPT_NAME.fullmatch(value):
        raise ValueError("a prompt names a file of stages/prompts/ (without .txt), not a path")
    return value


PromptName = Annotated[str, AfterValidator(_prompt_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
