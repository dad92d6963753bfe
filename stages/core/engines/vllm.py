"""vLLM offline engine (`LLM.chat`) for GPU hosts; needs the `vllm` extra and a CUDA GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.core.engines.base import ChatRequest, Completion, Engine, apply_chat_rules, missing_extra
from stages.core.params import Sampling


@dataclass
class VLLMEngine(Engine):
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

    def unload(self) -> None:
        self._llm = None

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
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
        outputs = self._llm.chat(
            [apply_chat_rules(r.messages, self.llm) for r in requests], sampling_params=params, use_tqdm=True
        )
        return [
            [
                Completion(
                    text=o.text,
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(o.token_ids),
                )
                for o in out.outputs
            ]
            for out in outputs
        ]
