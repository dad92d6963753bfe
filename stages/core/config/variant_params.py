"""A variant's params (models.<name>): its generator, its judge and its second turn."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from stages.core.config.engine_params import LLMSpec, Sampling
from stages.core.config.schema import FILE_NAME, OMIT_DEFAULT, PROMPT_NAME, RUNTIME, PromptName, Strict
from stages.core.config.source_params import Subset

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
    # 451,450, 0.297). With annotations published, a row of the published file is two-turn exactly when
    # its published conversation is; the hash decides only the rows the file lacks
    share: float = Field(0.297, ge=0.0, le=1.0)
    # stop (exit non-zero, finished shards kept) when more than this share of its requests did not
    # finish (failed, partial, mode ignored); they are asked again on the next run
    max_failure_rate: float = Field(0.01, ge=0.0, le=1.0, json_schema_extra=RUNTIME)


class VariantParams(Strict):
    release_name: str = Field(pattern=FILE_NAME)  # names the release's files and directory
    subset: Subset  # the released instruction subset it answers (published Gemma-3: ja+unsafe)
    generate: GenerateParams
    score: ScoreParams
    second_turn: SecondTurnParams | None = None
    # compare@M against the variant's published file; false (a variant with no published file): the
    # stage only writes a metrics file saying "not compared", fetching nothing
    compare: bool = False
    # whose is_template_instruction, duplicate and empty flags (and, with a second turn, which
    # conversations are two-turn) the release carries (stages/core/release/flags.py): published,
    # the variant's published file's wherever it has the row (ours for the rows it lacks); ours, those
    # translate computes (and the second_turn.share hash) for every row. A variant of your own: ours
    annotations: Literal["published", "ours"] = "ours"
