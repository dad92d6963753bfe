"""Hugging Face transformers engine: batched sampling on the CPU or one GPU; logprobs from the raw
logits where a request asks for them, no structured output (a request with a JSON schema is refused)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, ClassVar

from stages.core.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    Reply,
    apply_chat_rules,
    by_text,
    missing_extra,
    token_logprobs,
)
from stages.core.errors import PipelineError
from stages.core.params import Sampling


@dataclass
class TransformersEngine(Engine):
    LIBRARIES: ClassVar[tuple[str, ...]] = ("transformers", "torch")
    _model: Any = field(default=None, init=False, repr=False)

    def load(self) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise missing_extra("transformers", "cpu") from err
        dtype = "auto" if self.llm.dtype == "auto" else getattr(torch, self.llm.dtype)
        self._tokenizer = AutoTokenizer.from_pretrained(self.llm.model, revision=self.llm.revision)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = AutoModelForCausalLM.from_pretrained(
            self.llm.model, revision=self.llm.revision, dtype=dtype
        ).eval()

    def unload(self) -> None:
        self._model = self._tokenizer = None

    def context_length(self) -> int | None:
        return self.llm.max_model_len or getattr(self._model.config, "max_position_embeddings", None)

    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[Reply]:
        if any(r.json_schema is not None for r in requests):
            raise PipelineError(
                f"{self.model_name}: the transformers engine has no structured output (a JSON schema); "
                "use engine.backend vllm or openai"
            )
        results: list[Reply] = []
        # Requests with the same n share a batch; batch_size counts sequences, not requests.
        for n, group in groupby(requests, key=lambda r: r.n):
            group = list(group)
            step = max(1, self.options.batch_size // n)
            for start in range(0, len(group), step):
                results.extend(self._generate(group[start : start + step], n, sampling))
        return results

    def _generate(self, batch: list[ChatRequest], n: int, sampling: Sampling) -> list[Reply]:
        import torch

        texts = [
            self._tokenizer.apply_chat_template(
                apply_chat_rules(r.messages, self.llm), tokenize=False, add_generation_prompt=True
            )
            for r in batch
        ]
        enc = self._tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(batch[0].seed)  # one seed per batch: transformers samples a batch jointly
        with torch.inference_mode():
            out = self._model.generate(
                **enc,
                do_sample=sampling.temperature > 0,
                temperature=sampling.temperature if sampling.temperature > 0 else None,
                top_p=sampling.top_p if sampling.temperature > 0 else None,
                max_new_tokens=sampling.max_tokens,
                num_return_sequences=n,
                pad_token_id=self._tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_logits=any(r.top_logprobs for r in batch),  # raw, before temperature and top_p
            )
        new_tokens = out.sequences[:, enc["input_ids"].shape[1] :].tolist()
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        return [
            Reply(
                [
                    self._completion(new_tokens[i * n + j], prompt_lens[i], r, out.logits, i * n + j)
                    for j in range(n)
                ]
            )
            for i, r in enumerate(batch)
        ]

    def _completion(
        self, tokens: list[int], prompt_tokens: int, request: ChatRequest, logits: Any, row: int
    ) -> Completion:
        eos = self._model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        end = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
        kept = tokens if end is None else tokens[:end]
        return Completion(
            text=self._tokenizer.decode(kept, skip_special_tokens=True),
            finish_reason="length" if end is None else "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(kept) + (end is not None),
            logprobs=self._logprobs(kept, request, logits, row) if request.top_logprobs else None,
        )

    def _logprobs(self, kept: list[int], request: ChatRequest, logits: Any, row: int) -> list[list]:
        """`Completion.logprobs` of the kept tokens of batch row `row`, from generate's raw logits."""
        import torch

        def alternatives(k: int) -> dict[str, float]:
            logprobs = torch.log_softmax(logits[k][row].float(), dim=-1)
            top = torch.topk(logprobs, min(request.top_logprobs, logprobs.numel())).indices.tolist()
            ids = dict.fromkeys([*top, kept[k]])  # the token itself, in the top or not
            return by_text((self._tokenizer.decode([i]), float(logprobs[i])) for i in ids)

        return token_logprobs([self._tokenizer.decode([t]) for t in kept], alternatives, request)
