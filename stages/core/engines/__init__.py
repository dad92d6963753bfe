"""Engines behind one interface; `make_engine` picks the backend named in params."""

from __future__ import annotations

from stages.core.config.engine_params import EngineParams, LLMSpec
from stages.core.config.errors import PipelineError
from stages.core.engines.base import Engine, EngineDown, Interrupted, RequestError, apply_chat_rules
from stages.core.rows.requests import (
    FAILED,
    MODE_IGNORED,
    OK,
    PARTIAL,
    REFUSED,
    TOO_LONG,
    ChatRequest,
    Completion,
    Reply,
    unfinished,
)

__all__ = [
    "FAILED",
    "MODE_IGNORED",
    "OK",
    "PARTIAL",
    "REFUSED",
    "STRUCTURED_OUTPUT",
    "TOO_LONG",
    "ChatRequest",
    "Completion",
    "Engine",
    "EngineDown",
    "Interrupted",
    "Reply",
    "RequestError",
    "apply_chat_rules",
    "make_engine",
    "unfinished",
]
STRUCTURED_OUTPUT = ("vllm", "openai")  # backends that take ChatRequest.json_schema (all take top_logprobs)


def make_engine(llm: LLMSpec, options: EngineParams) -> Engine:
    """Return an (unloaded) engine for `llm` on the backend `options.backend`."""
    if options.backend == "transformers":
        from stages.core.engines.transformers import TransformersEngine as cls
    elif options.backend == "vllm":
        from stages.core.engines.vllm import VLLMEngine as cls
    elif options.backend == "openai":
        from stages.core.engines.openai import OpenAIEngine as cls
    else:
        raise PipelineError(f"engine.backend={options.backend!r}: allowed are transformers, vllm, openai")
    return cls(llm=llm, options=options)
