"""Typed models of params.yaml: every stage loads and validates the whole file before any work."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.core.errors import PipelineError
from stages.core.resume import RUNTIME

PARAMS_FILE = Path(os.environ.get("LMSYS_SYNTH_PARAMS", "params.yaml"))
VARIANT_NAME = r"^[a-z][a-z0-9_]*$"
SHA256 = r"[0-9a-f]{64}"
COMMIT = r"[0-9a-f]{40}"
RELEASE_PROFILE = "production"  # its sources must be pinned to commits


class ParamsError(PipelineError, ValueError):
    """params.yaml is missing, malformed, or holds a value of the wrong type or an unknown key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Strict):
    source: str  # fetched LMSYS-Chat-1M files, laid out as on the Hub
    released: str  # fetched encrypted instruction files
    manifest: str  # every fetched file with its uri, revision, size and sha256
    first_turn: str  # filtered first-turn table (Parquet)
    metrics: str  # directory: fetch.json, package-<variant>.json (DVC metrics)
    instructions: str  # decrypted Japanese instructions (plaintext: private remote only)
    translated: str  # one row per conversation with its Japanese instruction (private)
    generated: str  # directory: <variant>.parquet
    scored: str  # directory: <variant>.parquet
    release: str  # directory: <variant>/
    checkpoints: str  # shard checkpoints and intermediate files of long stages (not a DVC out)
    checkpoint_store: str | None = None  # shard checkpoints elsewhere: an fsspec URL (null: checkpoints)
    response_cache: str  # the response cache, a SQLite file (stages/core/cache.py; not a DVC out)

    @property
    def shards(self) -> str:
        """Where finished shards are checkpointed."""
        return self.checkpoint_store or self.checkpoints


class SourceSpec(Strict):
    uri: str  # local path, s3:// or hf://datasets/<repo>
    revision: str | None = None  # Hub revision: a 40-hex commit in release configs
    include: list[str] = Field(min_length=1)  # globs relative to uri
    sha256: dict[str, str] = {}  # expected checksums by relative path
    # fsspec options that are not secrets, e.g. {endpoint_url: ...} for S3, {endpoint: ...} for a Hub mirror
    storage_options: dict[str, str | int | float | bool] = {}

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, pins: dict[str, str]) -> dict[str, str]:
        bad = [name for name, digest in pins.items() if not re.fullmatch(SHA256, digest)]
        if bad:
            raise ValueError(f"not 64 lowercase hex digits for {bad}")
        return pins


class FilterSpec(Strict):
    languages: list[str] = Field(min_length=1)
    moderation: Literal["drop", "keep"]  # drop flagged conversations, or keep them (ja+unsafe)
    redacted: Literal["drop", "keep"]
    # first user turns longer than this many characters are kept and flagged long_first_turn
    long_first_turn_chars: int = Field(ge=1)


class FetchParams(Strict):
    source: SourceSpec
    released: SourceSpec
    filter: FilterSpec


class KeySpec(Strict):
    """How the passphrase is derived from the LMSYS-Chat-1M files (see conf/decrypt/lmsys.yaml).

    The digest runs over the files that `file` matches, in sorted path order: over their bytes,
    or, when `column` is set, over that Parquet column's values in row order, each as UTF-8
    text followed by a newline (independent of how the Parquet file is encoded).
    """

    file: str  # glob relative to the source root
    column: str | None = None  # hash this column's values instead of the file bytes
    hash: Literal["sha256", "sha512", "md5", "sha1"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"


class DecryptParams(Strict):
    subset: Literal["ja", "ja+unsafe"]
    file: str  # released file name, {subset} is replaced
    key: KeySpec


class LLMSpec(Strict):
    """A model and how it is placed: an engine replica takes tensor x pipeline parallel size GPUs."""

    model: str  # Hub id or local path
    revision: str | None = None  # a 40-hex Hub commit in release configs
    system_role: bool = True  # False: the system prompt is merged into the first user turn (Gemma)
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=RUNTIME)
    pipeline_parallel_size: int = Field(1, ge=1, json_schema_extra=RUNTIME)
    # context window: a prompt longer than max_model_len - max_tokens is not sent (null: the model's own)
    max_model_len: int | None = Field(None, ge=256)
    dtype: str = "auto"
    quantization: str | None = None  # vllm: e.g. fp8 (null: the checkpoint's own, if any)
    # vllm: further vllm.LLM / EngineArgs arguments, checked against the installed vllm before loading.
    # They may change outputs (kv_cache_dtype, ...), so they are part of the resume key.
    engine_kwargs: dict[str, Any] = {}
    tokenizer: str | None = None  # openai backend: Hub id or path of the tokenizer that counts prompts

    @property
    def gpus(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class Sampling(Strict):
    temperature: float = Field(ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(ge=1)


class EngineParams(Strict):
    """The backend; every other field is a runtime knob, outside the resume keys."""

    backend: Literal["transformers", "vllm", "openai"]
    # requests per engine call (transformers: sequences per forward batch)
    batch_size: int = Field(ge=1, json_schema_extra=RUNTIME)
    # local: one engine in this process; ray: a pool of engine replicas (Ray actors) on a cluster
    executor: Literal["local", "ray"] = Field("local", json_schema_extra=RUNTIME)
    ray_address: str | None = Field(None, json_schema_extra=RUNTIME)  # null: a local Ray instance
    # ray: engine replicas (null: as many as the cluster's GPUs hold, llm.gpus each; CPUs without GPUs)
    replicas: int | None = Field(None, ge=1, json_schema_extra=RUNTIME)
    # shards in flight per engine: the next shard's requests reach the engine before the last drains
    shards_in_flight: int = Field(2, ge=1, json_schema_extra=RUNTIME)
    # the response cache: read-write (answer from it, store new answers), read, or off
    cache: Literal["off", "read", "read-write"] = Field("read-write", json_schema_extra=RUNTIME)
    # openai backend: one server, or several that requests are spread over
    base_url: str | list[str] | None = Field(None, json_schema_extra=RUNTIME)
    # openai backend: the environment variable holding the key
    api_key_env: str = Field("OPENAI_API_KEY", json_schema_extra=RUNTIME)
    max_concurrency: int = Field(32, ge=1, json_schema_extra=RUNTIME)  # openai: requests in flight in all
    max_retries: int = Field(3, ge=0, json_schema_extra=RUNTIME)  # openai: 429, 5xx, timeouts
    # openai: seconds per attempt; a request fails after (max_retries + 1) attempts of at most this
    request_timeout: float = Field(600.0, gt=0, json_schema_extra=RUNTIME)

    @property
    def base_urls(self) -> list[str | None]:
        return self.base_url if isinstance(self.base_url, list) else [self.base_url]

    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, json_schema_extra=RUNTIME)  # vllm


class TranslateParams(Strict):
    missing: Literal["error", "drop", "llm"]  # conversations the released file lacks
    llm: LLMSpec
    prompt: str
    sampling: Sampling
    shard_size: int = Field(ge=1, json_schema_extra=RUNTIME)
    templates: dict[str, str]  # category -> regex over the original first user turn
    retries: int = Field(1, ge=0)  # an empty or failed LLM translation is asked again, with a new seed
    # stop when more than this fraction of the LLM translations failed (after retries)
    max_failure_rate: float = Field(0.05, ge=0.0, le=1.0, json_schema_extra=RUNTIME)


class GenerateParams(Strict):
    llm: LLMSpec
    n_ja: int = Field(ge=1)
    n_en: int = Field(ge=0)
    system_prompt: str | None = None
    sampling: Sampling
    shard_size: int = Field(ge=1, json_schema_extra=RUNTIME)


class ScoreParams(Strict):
    llm: LLMSpec
    prompt: str
    sampling: Sampling
    # a response of more than this many tokens is flagged as repetitive (published: > 2000)
    repetition_threshold: int = Field(2000, ge=0)
    shard_size: int = Field(ge=1, json_schema_extra=RUNTIME)


class SecondTurnParams(Strict):
    prompt: str  # asks the generator for the user's follow-up
    sampling: Sampling


class VariantParams(Strict):
    release_name: str
    generate: GenerateParams
    score: ScoreParams
    second_turn: SecondTurnParams | None = None


class ReleaseParams(Strict):
    file: str  # release file stem; {name} is the variant's release_name
    instructions_file: str  # the encrypted Japanese instructions
    formats: list[Literal["jsonl.gz", "parquet"]] = Field(min_length=1)
    # rows package holds at a time (ten responses a row: about 1 kB of Python objects per response)
    batch_rows: int = Field(1000, ge=1, json_schema_extra=RUNTIME)
    # zlib-ng level of the jsonl.gz files (0-9). 9: about 0.4% smaller than stdlib gzip 9 (the level used
    # so far) for a quarter less CPU, and parallel; 6 is ~2% larger for less than half of 9's CPU. The
    # published release's level is unknown. It changes the files' bytes, so it is not a runtime knob.
    gzip_level: int = Field(9, ge=0, le=9)
    gzip_threads: int = Field(0, ge=0, json_schema_extra=RUNTIME)  # compressing threads (0: all CPUs)


class Params(Strict):
    profile: str
    seed: int
    paths: Paths
    fetch: FetchParams
    decrypt: DecryptParams
    translate: TranslateParams
    engine: EngineParams
    release: ReleaseParams
    models: dict[str, VariantParams] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _variant_names(cls, models: dict[str, VariantParams]) -> dict[str, VariantParams]:
        bad = [name for name in models if not re.match(VARIANT_NAME, name)]
        if bad:
            raise ValueError(f"variant names must match {VARIANT_NAME}: {bad}")
        return models

    @model_validator(mode="after")
    def _release_pins_and_subset(self) -> Params:
        if self.profile == RELEASE_PROFILE:
            for key in ("source", "released"):
                spec: SourceSpec = getattr(self.fetch, key)
                if spec.uri.startswith("hf://") and not re.fullmatch(COMMIT, spec.revision or ""):
                    raise ValueError(
                        f"fetch.{key}.revision={spec.revision!r}: a release config must pin a 40-hex "
                        "commit, not a branch or tag"
                    )
            for key, llm in self.llms().items():
                if not Path(llm.model).exists() and not re.fullmatch(COMMIT, llm.revision or ""):
                    raise ValueError(
                        f"{key}.revision={llm.revision!r}: a release config must pin {llm.model} to a "
                        "40-hex Hub commit, so that the release records which weights produced it"
                    )
        wanted = "ja+unsafe" if self.fetch.filter.moderation == "keep" else "ja"
        if self.decrypt.subset != wanted:
            raise ValueError(
                f"decrypt.subset={self.decrypt.subset!r} does not match fetch.filter.moderation="
                f"{self.fetch.filter.moderation!r}: use {wanted!r}"
            )
        return self

    def llms(self) -> dict[str, LLMSpec]:
        """Every model the pipeline runs, by its params key."""
        found = {"translate.llm": self.translate.llm}
        for name, variant in self.models.items():
            found[f"models.{name}.generate.llm"] = variant.generate.llm
            found[f"models.{name}.score.llm"] = variant.score.llm
        return found

    def variant(self, name: str) -> VariantParams:
        if name not in self.models:
            raise ParamsError(f"unknown variant {name!r}; params.yaml models: {', '.join(self.models)}")
        return self.models[name]


def _describe(err: ValidationError, source: Path) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"])
        got = "" if item["type"] == "missing" or not item["loc"] else f" (got {item.get('input')!r})"
        lines.append(f"  {key or '<params>'}: {item['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


def validate(data: dict, source: Path = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_describe(err, source)) from None


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError naming each bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run `python -m stages.compose` to write it")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return validate(data, path)
