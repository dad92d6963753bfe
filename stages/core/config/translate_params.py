"""translate@S's params: the LLM or DeepL that translates the rows the release lacks, and the
template rules."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from stages.core.config.engine_params import LLMSpec, Sampling
from stages.core.config.schema import RUNTIME, PromptName, Strict


class DeepLParams(Strict):
    """translate.missing=deepl: the DeepL API through the official `deepl` client (pip extra deepl)."""

    target_lang: str = "JA"
    source_lang: str | None = None  # null: DeepL detects it (a glossary needs it set)
    formality: Literal["default", "more", "less", "prefer_more", "prefer_less"] | None = None
    glossary_id: str | None = None
    model_type: Literal["quality_optimized", "latency_optimized", "prefer_quality_optimized"] | None = None
    # the environment variable holding the key (never the key itself)
    auth_key_env: str = Field("DEEPL_AUTH_KEY", json_schema_extra=RUNTIME)
    # null: the client's own choice (api-free.deepl.com for a key ending in :fx, else api.deepl.com)
    server_url: str | None = Field(None, json_schema_extra=RUNTIME)
    # texts and JSON body bytes per request: DeepL takes at most 50 texts and 128 KiB a request
    batch_texts: int = Field(50, ge=1, le=50, json_schema_extra=RUNTIME)
    batch_bytes: int = Field(128 * 1024, ge=1024, le=128 * 1024, json_schema_extra=RUNTIME)
    max_retries: int = Field(5, ge=0, json_schema_extra=RUNTIME)  # the client's retries of 429, 5xx

    @model_validator(mode="after")
    def _glossary_needs_source(self) -> DeepLParams:
        if self.glossary_id is not None and self.source_lang is None:
            raise ValueError("glossary_id needs source_lang: DeepL applies a glossary to one language pair")
        return self


class TemplateRule(Strict):
    """A template category: regexes (Python `re`, searched) over one text of the first user turn."""

    category: str = Field(min_length=1)
    field: Literal["instruction", "instruction_ja"] = "instruction"  # original turn, or its translation
    patterns: list[str] = Field(min_length=1)


class TranslateParams(Strict):
    # conversations the subset's filter keeps that the released file lacks. drop (faithful): not
    # written, not generated; counted and listed by id (Paths.not_released_of). llm, deepl: an
    # extension of the dataset: translate them. fail: stop when there is one
    missing: Literal["fail", "drop", "llm", "deepl"]
    llm: LLMSpec
    prompt: PromptName
    sampling: Sampling
    shard_size: int = Field(ge=1, json_schema_extra=RUNTIME)
    # is_template_instruction: the first rule (in order) with a pattern that matches its field
    templates: list[TemplateRule]
    retries: int = Field(1, ge=0)  # an empty or failed LLM translation is asked again, with a new seed
    # stop when more than this fraction of the LLM translations failed (after retries)
    max_failure_rate: float = Field(0.05, ge=0.0, le=1.0, json_schema_extra=RUNTIME)
    deepl: DeepLParams = DeepLParams()

    @field_validator("missing", mode="before")
    @classmethod
    def _error_is_fail(cls, value: object) -> object:
        return "fail" if value == "error" else value  # `error`: the earlier name of `fail`
