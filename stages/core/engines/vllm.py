"""vLLM offline engine (`LLM.chat`) for GPU hosts; needs the `vllm` extra and a CUDA GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from stages.core.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    Reply,
    RequestError,
    apply_chat_rules,
    missing_extra,
)
from stages.core.params import Sampling


@dataclass
class VLLMEngine(Engine):
    LIBRARIES: ClassVar[tuple[str, ...]] = ("vllm",)
    _llm: Any = field(default=None, init=False, repr=False)

    def load(self) -> None:
        try:
            from vllm import LLM
        except ImportError as err:
            raise missing_extra("vllm", "vllm") from err
        self._llm = LLM(
            model=self.llm.model,
            revision=self.llm.revision,
            tensor_parallel_size=self.llm.tensor_parallel_size,
            max_model_len=self.llm.max_model_len,
            dtype=self.llm.dtype,
            gpu_memory_utilization=self.options.gpu_memory_utilization,
        )
        self._tokenizer = self._llm.get_tokenizer()

    def unload(self) -> None:
        self._llm = self._tokenizer = None

    def context_length(self) -> int | None:
        return self._llm.llm_engine.model_config.max_model_len

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=r.n,
                seed=r.seed,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
            )
            for r in requests
        ]
        try:  # vLLM validates every prompt before generating and rejects the whole call for one
            outputs = self._llm.chat(
                [apply_chat_rules(r.messages, self.llm) for r in requests],
                sampling_params=params,
                use_tqdm=True,
            )
        except ValueError as err:
            raise RequestError(str(err)) from err
        return [
            Reply(
                [
                    Completion(
                        text=o.text,
                        finish_reason="length" if o.finish_reason == "length" else "stop",
                        prompt_tokens=len(out.prompt_token_ids or []),
                        completion_tokens=len(o.token_ids),
                    )
                    for o in out.outputs
                ]
            )
            for out in outputs
        ]
