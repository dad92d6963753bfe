"""Typed models of params.yaml: every stage loads and validates the whole file before any work."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stages.core.config.errors import PipelineError

RUNTIME = {"runtime": True}  # json_schema_extra of a params field that never changes results
# json_schema_extra of a params field left out of resume.recipe() while it holds its default: a knob
# added later, whose default changes nothing, leaves the keys of configs that do not set it as they were
OMIT_DEFAULT = {"omit_default": True}
PARAMS_FILE = Path(os.environ.get("LMSYS_SYNTH_PARAMS", "params.yaml"))
VARIANT_NAME = r"^[a-z][a-z0-9_]*$"
SHA256 = r"[0-9a-f]{64}"


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
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://")  # an fsspec URL: s3://, hf://, gs://, file://, ...


def _inside(value: str) -> str:
    """A path param: relative to the repository (where params.yaml is) or absolute inside it, and
    never leaving it through `..` (read lexically: a data/ that links to another disk is fine)."""
    if SCHEME.match(value):
        raise ValueError(f"a path of the repository, not a URL: {value!r}")
    path = Path(value)
    if path.is_absolute():
        root = Path.cwd()
        if not Path(os.path.normpath(path)).is_relative_to(root):
            raise ValueError(f"{value!r} is outside the repository ({root}): give a path inside it")
        return value
    if os.path.normpath(path).split(os.sep)[0] == "..":
        raise ValueError(f"{value!r} leaves the repository: give a path inside it")
    return value


def _inside_or_url(value: str) -> str:
    """A location that is an fsspec URL (an explicit scheme: s3://, hf://, file:///mnt/...) or a path
    inside the repository (`_inside`)."""
    return value if SCHEME.match(value) else _inside(value)


RepoPath = Annotated[str, AfterValidator(_inside)]  # paths.*: inside the repository
Location = Annotated[str, AfterValidator(_inside_or_url)]  # sources, stores: a URL or a repository path
PUBLISHED_PROMPT = "published"  # score.prompt: the fetched release's materials/judge_prompt.jsonl


def _judge_prompt(value: str) -> str:
    if value != PUBLISHED_PROMPT and not PROMPT_NAME.fullmatch(value):
        raise ValueError(
            f"the judge prompt is {PUBLISHED_PROMPT!r} (the release's materials/judge_prompt.jsonl) or "
            "names a file of stages/prompts/ (without .txt), not a path"
        )
    return value


# score.prompt: `published` (the judge prompt the release ships, stages/core/rows/prompts.py), or a
# template name as PromptName
JudgePromptName = Annotated[str, AfterValidator(_judge_prompt)]
COMMIT = r"[0-9a-f]{40}"
RELEASE_PROFILE = "production"  # its sources must be pinned to commits


class ParamsError(PipelineError, ValueError):
    """params.yaml is missing, malformed, or holds a value of the wrong type or an unknown key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Strict):
    source: RepoPath  # fetched LMSYS-Chat-1M files, laid out as on the Hub
    released: RepoPath  # fetched encrypted instruction files
    manifest: RepoPath  # every fetched file with its uri, revision, size and sha256
    first_turn: RepoPath  # filtered first-turn table (Parquet)
    metrics: RepoPath  # directory: fetch.json, package-<variant>.json (DVC metrics)
    # decrypted Japanese instructions, <instructions>-<subset>.parquet (plaintext: private remote only)
    instructions: RepoPath
    # one row per conversation with its Japanese instruction, <translated>-<subset>.parquet (private)
    translated: RepoPath
    generated: RepoPath  # directory: <variant>.parquet
    scored: RepoPath  # directory: <variant>.parquet
    release: RepoPath  # directory: <variant>/
    sft: RepoPath  # directory: <variant>/<option set>.jsonl.gz (LMSYS-derived text: private)
    # directory: <variant>.jsonl.gz, the release with its Japanese instructions and LMSYS-Chat-1M's
    # columns, as the published merge scripts make it (stages/merge.py; LMSYS text: private)
    merged: RepoPath
    checkpoints: RepoPath  # shard checkpoints and intermediate files of long stages (not a DVC out)
    # shard checkpoints elsewhere (null: checkpoints): an fsspec URL (s3://, file:///shared/...) or a path
    checkpoint_store: Location | None = None
    response_cache: (
        RepoPath  # the response cache, a SQLite file (stages/core/storage/cache.py; not a DVC out)
    )
    published: RepoPath  # fetched published release files (release/published.py; not a DVC out)
    # fetch's files whose bytes params fix (a sha256 pin, a Hub commit), kept once so a re-run of fetch
    # downloads nothing it has (stages/core/storage/source.py; not a DVC out)
    fetched: RepoPath

    @property
    def shards(self) -> str:
        """Where finished shards are checkpointed."""
        return self.checkpoint_store or self.checkpoints

    def instructions_of(self, subset: str) -> str:
        """decrypt@<subset>'s out: the released Japanese instructions of that subset."""
        return f"{self.instructions}-{subset}.parquet"

    def translated_of(self, subset: str) -> str:
        """translate@<subset>'s out: that subset's conversations with their Japanese instructions."""
        return f"{self.translated}-{subset}.parquet"

    def generated_of(self, variant: str) -> str:
        """generate@<variant>'s out: its responses and their statuses."""
        return f"{self.generated}/{variant}.parquet"

    def scored_of(self, variant: str) -> str:
        """score@<variant>'s out: its judgements, best responses and second turns."""
        return f"{self.scored}/{variant}.parquet"

    def release_of(self, variant: str) -> str:
        """package@<variant>'s out: the release directory."""
        return f"{self.release}/{variant}"

    def not_released_of(self, subset: str) -> str:
        """translate@<subset>'s list of the conversation_ids its filter keeps that the release lacks."""
        return f"{self.translated}-{subset}.not-released.txt"

    def metrics_of(self, stage: str) -> str:
        """A stage instance's metrics file (`fetch`, `generate@gemma3`, ...): <metrics>/<stage>-<key>.json."""
        return f"{self.metrics}/{stage.replace('@', '-')}.json"

    def plots_of(self, variant: str) -> str:
        """The plot tables of package@<variant> and compare@<variant> (`dvc plots diff`)."""
        return f"{self.metrics}/plots/{variant}"

    def report_of(self, stage: str) -> str:
        """A stage instance's Markdown report (compare@<variant>): <metrics>/<stage>-<key>.md."""
        return f"{self.metrics}/{stage.replace('@', '-')}.md"

    def stage_out(self, stage: str) -> str:
        """The intermediate out of a stage's sharded pass (e.g. translate@ja's translator answers)."""
        return f"{self.checkpoints}/{stage}.parquet"


class SourceSpec(Strict):
    uri: Location  # a path inside the repository, or a URL: s3://, hf://datasets/<repo>, file:///...
    revision: str | None = None  # Hub revision: a 40-hex commit in release configs
    include: list[str] = Field(min_length=1)  # globs relative to uri
    sha256: Pins = {}  # expected checksums by relative path
    # fsspec options that are not secrets, e.g. {endpoint_url: ...} for S3, {endpoint: ...} for a Hub mirror
    storage_options: dict[str, str | int | float | bool] = {}


class FilterSpec(Strict):
    """fetch's rules. Moderation-flagged conversations are always kept, with their `flagged` flag:
    translate@ja leaves them out, translate@ja+unsafe keeps them (one fetch serves both subsets)."""

    languages: list[str] = Field(min_length=1)
    redacted: Literal["drop", "keep"]
    # first user turns longer than this many characters are kept and flagged long_first_turn
    long_first_turn_chars: int = Field(ge=1)


class FetchParams(Strict):
    source: SourceSpec
    released: SourceSpec
    filter: FilterSpec


class KeySpec(Strict):
    """How the passphrase of the released .gpg files is obtained (see conf/decrypt/lmsys.yaml).

    method hash: a digest over the files that `file` matches under the source root, in sorted path
    order: over their bytes, or, when `column` is set, over that Parquet column's values in row
    order, each as UTF-8 text followed by a newline (independent of how the Parquet file is encoded).

    method script: the released repository's key script (`script`, a path under the released root,
    fetched with it) runs only when its bytes hash to `sha256`, under bash in an empty temporary
    working directory where the source root appears as the directory `layout`, with `args` ({source}
    becomes `layout`), an environment of PATH, HOME and TMPDIR (HOME and TMPDIR: that directory) and
    `timeout` seconds; its stdout, trimmed, is the passphrase. `sandbox` says whether it must run
    isolated (stages/core/storage/crypto.py: no network, no other process, no HOME, writes only to its
    directory, nothing left running).
    """

    method: Literal["hash", "script"] = "hash"
    file: str | None = None  # hash: glob relative to the source root
    column: str | None = None  # hash: hash this column's values instead of the file bytes
    hash: Literal["sha256", "sha512", "md5", "sha1"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    script: str | None = None  # script: path relative to the released root (list it in fetch.released)
    layout: str = "lmsys-chat-1m"  # script: the source root's name in the script's working directory
    args: list[str] = []  # script: its arguments; {source} is replaced by `layout`
    timeout: float = Field(600.0, gt=0, json_schema_extra=RUNTIME)  # script: seconds before it is killed
    # script: its limits, each killing it (or failing its allocation) when broken: memory (address
    # space), processes at once, bytes on stdout (a passphrase is one short line), size of a file written
    max_memory_mb: int = Field(1024, ge=16, json_schema_extra=RUNTIME)
    max_processes: int = Field(32, ge=1, json_schema_extra=RUNTIME)
    max_output_bytes: int = Field(4096, ge=1, json_schema_extra=RUNTIME)
    max_file_mb: int = Field(64, ge=1, json_schema_extra=RUNTIME)
    # script: the hex sha256 of the bytes it may run, checked on the bytes that run (required)
    sha256: str | None = Field(None, pattern=f"^{SHA256}$")
    # script: required (refuse to run it where this machine has no sandbox), best-effort (then run it
    # unisolated, with a warning) or off (never isolate it)
    sandbox: Literal["required", "best-effort", "off"] = Field("required", json_schema_extra=RUNTIME)

    @field_validator("script", "layout")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        path = PurePosixPath(value or ".")
        if value is not None and (path.is_absolute() or not path.parts or ".." in path.parts):
            raise ValueError(f"{value!r} must be a relative path without '..'")
        return value

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> KeySpec:
        if self.method == "hash" and self.file is None:
            raise ValueError("method hash needs `file` (a glob under the source root)")
        if self.method == "script":
            if self.script is None:
                raise ValueError("method script needs `script` (its path under the released root)")
            if self.sha256 is None:
                raise ValueError(
                    "method script needs `sha256`, the hex sha256 of the script it may run: read the "
                    "fetched script, then pin the sha256 that data/raw/manifest.json lists for it"
                )
            ignored = [key for key in ("file", "column") if getattr(self, key) is not None]
            if ignored:
                raise ValueError(f"method script does not use {ignored}: set them to null or use method hash")
        return self


Subset = Literal["ja", "ja+unsafe"]  # ja: moderation-clean conversations; ja+unsafe: all of them


class DecryptParams(Strict):
    # the released subsets that decrypt@S and translate@S run for: exactly those the variants use
    subsets: list[Subset] = Field(min_length=1)
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
    """How tokens are drawn. top_k and the penalties are off at their defaults, and then left out of
    the resume and cache keys (OMIT_DEFAULT): a config that does not set them keeps its keys."""

    temperature: float = Field(ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(ge=1)
    top_k: int | None = Field(None, ge=1, json_schema_extra=OMIT_DEFAULT)  # null (or -1): off
    # OpenAI's: each token's logit minus frequency_penalty x its count in the completion so far
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, json_schema_extra=OMIT_DEFAULT)
    # HF's and vLLM's: a token already in the prompt or completion has its logit divided by it
    # (multiplied where negative); 1.0: off
    repetition_penalty: float = Field(1.0, gt=0.0, json_schema_extra=OMIT_DEFAULT)

    @field_validator("top_k", mode="before")
    @classmethod
    def _minus_one_is_off(cls, value: object) -> object:
        return None if value == -1 else value  # vLLM's spelling of off

    def options(self) -> dict[str, Any]:
        """top_k and the penalties that are set away from their defaults (off), by name."""
        return {
            name: getattr(self, name)
            for name in ("top_k", "frequency_penalty", "repetition_penalty")
            if getattr(self, name) != type(self).model_fields[name].default
        }


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
    # the engine is taken as down, and the stage stops, after this many requests in a row failed
    max_consecutive_failures: int = Field(32, ge=1, json_schema_extra=RUNTIME)
    # ray: restarts of a replica whose process died, and retries of its shard, before the stage fails
    ray_max_retries: int = Field(3, ge=0, json_schema_extra=RUNTIME)

    @property
    def base_urls(self) -> list[str | None]:
        return self.base_url if isinstance(self.base_url, list) else [self.base_url]

    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, json_schema_extra=RUNTIME)  # vllm


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


class GenerateParams(Strict):
    llm: LLMSpec
    n_ja: int = Field(ge=1)
    n_en: int = Field(ge=0)
    system_prompt: str | None = None
    sampling: Sampling  # of the Japanese requests
    # of the English requests (null: `sampling`); the key holds it only where set
    sampling_en: Sampling | None = Field(None, json_schema_extra=OMIT_DEFAULT)
    shard_size: int = Field(ge=1, json_schema_extra=RUNTIME)
    # true: an instruction of a conversation LMSYS redacted (PII replaced by NAME_1...) is not asked,
    # its status skipped_redacted, as the public derivative of the published generator does. false: the
    # cards name only empty and duplicate instructions as not asked, and the published SFT converter's
    # --exclude_pii implies redacted ones carry responses (an inference)
    skip_redacted: bool = False
    # engine: ask llm for the responses; published: take them from the variant's published file
    # (`published`), loading no model: a team can re-judge or re-package the published responses
    source: Literal["engine", "published"] = "engine"
    # stop (exit non-zero, finished shards kept) when more than this share of its requests did not
    # finish (failed, partial, mode ignored); they are asked again on the next run
    max_failure_rate: float = Field(0.01, ge=0.0, le=1.0, json_schema_extra=RUNTIME)


class ScoreParams(Strict):
    llm: LLMSpec
    prompt: JudgePromptName
    sampling: Sampling
    # a response of more than this many tokens is flagged as repetitive (the public derivative's > 2000 [D])
    repetition_threshold: int = Field(2000, ge=0)
    shard_size: int = Field(ge=1, json_schema_extra=RUNTIME)
    # how a judgement becomes its score (stages/core/rows/judge.py): parse the text (default), structured
    # output (a JSON schema forces the rating; vllm and openai backends), or logprob (the expected
    # rating over the rating tokens' top_logprobs after "[[")
    mode: Literal["parse", "structured", "logprob"] = "parse"
    top_logprobs: int = Field(20, ge=1, le=20)  # logprob mode: alternatives per token (OpenAI allows 20)
    # stop (exit non-zero, finished shards kept) when more than this share of its requests did not
    # finish (failed, partial, mode ignored); they are asked again on the next run
    max_failure_rate: float = Field(0.01, ge=0.0, le=1.0, json_schema_extra=RUNTIME)
    # with generate.source published: false keeps the published scoring annotations (and best response,
    # and for variants with a second turn the published multi-turn conversation), loading no model;
    # true asks the judge (and the second turn) again. With source engine it is ignored. The key holds
    # it only where set
    rejudge: bool = Field(False, json_schema_extra=OMIT_DEFAULT)


class SecondTurnParams(Strict):
    prompt: PromptName  # asks the generator for the user's follow-up
    sampling: Sampling
    # the share of conversations with a best response that get a second turn, chosen by a hash of the
    # conversation_id (stages/core/rows/second_turn.py); the others stay single-turn (published: 134,014 of
    # 451,450, 0.297; which ones is not public)
    share: float = Field(0.297, ge=0.0, le=1.0)
    # stop (exit non-zero, finished shards kept) when more than this share of its requests did not
    # finish (failed, partial, mode ignored); they are asked again on the next run
    max_failure_rate: float = Field(0.01, ge=0.0, le=1.0, json_schema_extra=RUNTIME)


FILE_NAME = r"^[A-Za-z0-9{][A-Za-z0-9._+{}-]*$"  # a name that becomes one path component, never ../ or /


class VariantParams(Strict):
    release_name: str = Field(pattern=FILE_NAME)  # names the release's files and directory
    subset: Subset  # the released instruction subset it answers (published Gemma-3: ja+unsafe)
    generate: GenerateParams
    score: ScoreParams
    second_turn: SecondTurnParams | None = None
    # compare@M against the variant's published file; false (a variant with no published file): the
    # stage only writes a metrics file saying "not compared", fetching nothing
    compare: bool = False


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
    sft: dict[str, SftOption] = {}  # SFT option sets by name (stages/sft.py)
    published: PublishedParams  # the published release files (compare, generate.source=published)

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
        used = {variant.subset for variant in self.models.values()}
        listed = self.decrypt.subsets
        if len(set(listed)) != len(listed) or set(listed) != used:
            uses = ", ".join(f"models.{name}.subset={v.subset}" for name, v in self.models.items())
            raise ValueError(
                f"decrypt.subsets={listed} must list each subset the variants use once ({uses}): "
                f"use {sorted(used)}"
            )
        return self

    @model_validator(mode="after")
    def _key_script_pins_agree(self) -> Params:
        key, fetched = self.decrypt.key, self.fetch.released.sha256
        # decrypt.key.sha256 is the pin that decrypt checks; fetch.released.sha256 may pin the script
        # too (fetch then refuses other bytes), but never to other bytes
        if key.method == "script" and key.script in fetched and fetched[key.script] != key.sha256:
            raise ValueError(
                f"fetch.released.sha256[{key.script!r}]={fetched[key.script]} differs from "
                f"decrypt.key.sha256={key.sha256}: pin the script's bytes in decrypt.key.sha256 only"
            )
        return self

    @model_validator(mode="after")
    def _sft_fits_its_variants(self) -> Params:
        for name, option in self.sft.items():
            if not re.match(SFT_NAME, name):
                raise ValueError(f"sft.{name}: an option set's name must match {SFT_NAME}")
            unknown = sorted(set(option.variants or []) - set(self.models))
            if unknown:
                raise ValueError(f"sft.{name}.variants: unknown {unknown}; models: {list(self.models)}")
            for variant in option.variants or list(self.models):
                spec = self.models[variant]
                if option.turns == 2 and spec.second_turn is None:
                    raise ValueError(
                        f"sft.{name}.turns=2: variant {variant} has no second turn (models.{variant}."
                        f"second_turn is null); set sft.{name}.variants to variants that have one"
                    )
                if option.language == "en" and spec.generate.n_en == 0:
                    raise ValueError(
                        f"sft.{name}.language=en: variant {variant} has no English responses (models."
                        f"{variant}.generate.n_en is 0); set sft.{name}.variants to variants that have them"
                    )
        return self

    @model_validator(mode="after")
    def _published_pinned(self) -> Params:
        spec = self.published
        hub = self.profile == RELEASE_PROFILE and spec.uri.startswith("hf://")
        if hub and not re.fullmatch(COMMIT, spec.revision or ""):
            raise ValueError(
                f"published.revision={spec.revision!r}: a release config must pin a 40-hex commit, "
                "not a branch or tag"
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

    def release_stem(self, name: str) -> str:
        """The stem of a variant's public release files: release.file with its release_name."""
        return self.release.file.format(name=self.variant(name).release_name)


SECRET_KEY = re.compile(r"(?i)(token|key|password|passphrase|secret)")  # a key named like a secret


def _describe(err: ValidationError, source: Path) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"])
        got = (
            "" if item["type"] == "missing" or not item["loc"] else f" (got {_shown(key, item.get('input'))})"
        )
        lines.append(f"  {key or '<params>'}: {item['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


def _shown(key: str, value: object) -> str:
    """A bad value as an error may show it: withheld where the key is named like a secret, or where the
    value is that of an environment variable (it may have come from one)."""
    text = str(value)
    from_env = len(text) >= 8 and any(text == v or (len(v) >= 8 and v in text) for v in os.environ.values())
    if SECRET_KEY.search(key.rsplit(".", 1)[-1]) or from_env:
        return "a value withheld: the key is named like a secret or the value is an environment variable's"
    return repr(value)


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
