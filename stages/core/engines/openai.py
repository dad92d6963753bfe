"""Engine for any OpenAI-compatible server (`vllm serve`, hosted APIs), with bounded concurrency."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from stages.core.engines.base import ChatRequest, Completion, Engine, apply_chat_rules, missing_extra
from stages.core.params import Sampling

MAX_RETRIES = 5  # the client retries connection errors, 429 and 5xx with exponential backoff


@dataclass
class OpenAIEngine(Engine):
    _client: Any = field(default=None, init=False, repr=False)

    def load(self) -> None:
        try:
            import openai
        except ImportError as err:
            raise missing_extra("openai", "openai") from err
        key = os.environ.get(self.options.api_key_env)
        if not key:
            raise ValueError(
                f"the openai engine needs an API key in ${self.options.api_key_env} "
                "(engine.api_key_env names the variable)"
            )
        self._client = openai.OpenAI(base_url=self.options.base_url, api_key=key, max_retries=MAX_RETRIES)

    def unload(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        with ThreadPoolExecutor(max_workers=self.options.max_concurrency) as pool:
            return list(pool.map(lambda r: self._one(r, sampling), requests))

    def _one(self, request: ChatRequest, sampling: Sampling) -> list[Completion]:
        response = self._client.chat.completions.create(
            model=self.llm.model,
            messages=apply_chat_rules(request.messages, self.llm),
            n=request.n,
            seed=request.seed,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
        )
        usage = response.usage
        per_choice = (usage.completion_tokens // max(1, len(response.choices))) if usage else 0
        return [
            Completion(
                text=choice.message.content or "",
                finish_reason="length" if choice.finish_reason == "length" else "stop",
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=per_choice,
            )
            for choice in response.choices
        ]
