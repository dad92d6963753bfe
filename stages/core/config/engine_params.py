"""The params of the models and their engine: a model and its placement (LLMSpec), how tokens are
drawn (Sampling) and the backend with its runtime knobs (EngineParams)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from stages.core.config.schema import OMIT_DEFAULT, RUNTIME, Strict


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
