"""The params of what a finished variant becomes: its release files, its SFT files, and the
published release it is compared with or takes responses from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.core.config.paths import Location
from stages.core.config.schema import FILE_NAME, RUNTIME, Pins, Strict
from stages.core.config.source_params import SourceSpec


class ReleaseParams(Strict):
    file: str = Field(pattern=FILE_NAME)  # release file stem; {name} is the variant's release_name
    instructions_file: str = Field(pattern=FILE_NAME)  # the encrypted Japanese instructions
    formats: list[Literal["jsonl.gz", "parquet"]] = Field(min_length=1)
    # rows package holds at a time (ten responses a row: about 1 kB of Python objects per response)
    batch_rows: int = Field(1000, ge=1, json_schema_extra=RUNTIME)
    # zlib-ng level of the jsonl.gz files (0-9). 9: about 0.4% smaller than stdlib gzip 9 (the level used
    # so far) for a quarter less CPU, and parallel; 6 is ~2% larger for less than half of 9's CPU. The
    # published release's level is unknown. It changes the files' bytes, so it is not a runtime knob.
    gzip_level: int = Field(9, ge=0, le=9)
    gzip_threads: int = Field(0, ge=0, json_schema_extra=RUNTIME)  # compressing threads (0: all CPUs)


class CardFigures(Strict):
    """One published file's figures on the dataset card ([V]); instructions count those with at least
    one response ([I])."""

    instructions: int = Field(ge=0)
    responses: int = Field(ge=0)
    instructions_en: int | None = Field(None, ge=0)
    responses_en: int | None = Field(None, ge=0)
    multiturn: int | None = Field(None, ge=0)  # two-turn entries of synthesized_multiturn_conversation


class PublishedCard(Strict):
    uri: str  # the release the card describes: compare@M shows its figures when published.uri is it
    files: dict[str, CardFigures] = {}  # by the variant's release_name


class PublishedParams(Strict):
    """The published release files (tokyotech-llm/lmsys-chat-1m-synth): compare@M reads the variant's
    public file, and so does generate@M when models.<v>.generate.source is `published`."""

    uri: Location  # a path inside the repository, or a URL (s3://, hf://datasets/<repo>), as fetch.released
    revision: str | None = None  # Hub revision: a 40-hex commit in release configs
    file: str  # a variant's public file, relative to uri; {name} is its release_name
    sha256: Pins = {}  # expected checksums by file (after {name} is filled in)
    storage_options: dict[str, str | int | float | bool] = {}  # fsspec options that are not secrets
    card: PublishedCard | None = None  # the dataset card's figures of each file

    def figures(self, release_name: str) -> dict[str, int | None] | None:
        """The card's figures of a variant's file when the published files are the card's release."""
        if self.card is None or self.card.uri != self.uri or release_name not in self.card.files:
            return None
        return self.card.files[release_name].model_dump()

    def path(self, release_name: str) -> str:
        return self.file.format(name=release_name)

    def source(self, release_name: str) -> SourceSpec:
        """The fetch of one variant's file, with its pin if there is one."""
        path = self.path(release_name)
        pins = {path: self.sha256[path]} if path in self.sha256 else {}
        return SourceSpec(
            uri=self.uri,
            revision=self.revision,
            include=[path],
            sha256=pins,
            storage_options=self.storage_options,
        )


SFT_NAME = r"^[a-z0-9][a-z0-9._-]*$"  # an option set's name is its file name


class SftOption(Strict):
    """One SFT file per variant it applies to (stages/core/rows/sft.py): the best response to each
    instruction as score stored it, one `{<output_key>: [...]}` a line (`conversation`: as we assume
    the published converter writes, docs/assumptions.md 11; `messages`: TRL's conversational form)."""

    language: Literal["ja", "en"] = "ja"  # en: the LMSYS first turn and the English response
    min_score: float | None = Field(None, ge=0.0, le=10.0)  # the best response's score must reach it
    exclude_template: bool = False  # leave out instructions with is_template_instruction set
    exclude_redacted: bool = False  # leave out conversations LMSYS-Chat-1M marks `redacted` (PII)
    turns: Literal[1, 2] = 1  # 2: the instruction and the variant's synthesized_multiturn_conversation
    variants: list[str] | None = None  # the variants it applies to (null: every variant)
    output_key: Literal["conversation", "messages"] = "conversation"  # each line's key; messages: TRL

    @model_validator(mode="after")
    def _english_is_one_unscored_turn(self) -> SftOption:
        if self.language == "en" and self.min_score is not None:
            raise ValueError("min_score needs language ja: the English responses are not scored")
        if self.language == "en" and self.turns == 2:
            raise ValueError("turns=2 needs language ja: the second turn is Japanese")
        return self
