"""Hugging Face transformers engine: batched sampling on the CPU or one GPU; logprobs from the raw
logits where a request asks for them, no structured output (a request with a JSON schema is refused).

Sampling is the params' own (`logits_steps`: none that the model's generation_config may carry) and
each request draws from its own generator seeded by its seed, not from torch's global one: the answer
to a request does not depend on the other threads, and several shards may be generated at once."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, ClassVar

from stages.core.config.engine_params import Sampling
from stages.core.config.errors import PipelineError
from stages.core.engines.base import Engine, apply_chat_rules, by_text, missing_extra, token_logprobs
from stages.core.rows.requests import ChatRequest, Completion, Reply


class SeededSampler:
    """A transformers LogitsProcessor that makes greedy decoding draw a sample: for each request
    (its n rows), Exp(1) noise from the request's own generator, and scores - log(noise), whose
    argmax is a draw from softmax(scores) (the Gumbel-max trick; vLLM's sampler does the same).
    It runs after the temperature, top-k and top-p warpers, so the draw follows them."""

    def __init__(self, seeds: list[int], n: int) -> None:
        self.seeds, self.n = seeds, n
        self.generators: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if not self.generators:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        vocab = scores.shape[1]
        noise = torch.cat(
            [
                torch.empty((self.n, vocab), device=scores.device, dtype=torch.float32).exponential_(
                    generator=g
                )
                for g in self.generators
            ]
        )
        # an exact 0 would put log(0) = -inf under a token (+inf after the minus, NaN on a -inf score)
        return scores.float() - noise.clamp_(min=torch.finfo(torch.float32).tiny).log()


class FrequencyPenalty:
    """OpenAI's frequency_penalty as a LogitsProcessor: each token's score minus penalty x its count in
    the completion so far (the tokens of `input_ids` from column `start`, where the prompt ends)."""

    def __init__(self, penalty: float, start: int) -> None:
        self.penalty, self.start = penalty, start

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.start :]
        ones = torch.ones_like(generated, dtype=scores.dtype)
        return scores - self.penalty * torch.zeros_like(scores).scatter_add_(1, generated, ones)


def logits_steps(sampling: Sampling, seeds: list[int], n: int, pads: Any, start: int) -> Any:
    """The logits processors of a batch of requests (n rows each), in vLLM's order: the penalties
    (greedy decoding too), then, when sampling, temperature, top-k, top-p and the seeded draw.
    `pads`: each row's left padding, which the repetition penalty leaves out (vLLM pads nothing);
    `start`: the padded prompt length."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    steps = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        steps.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty, prompt_ignore_length=pads))
    if sampling.frequency_penalty:
        steps.append(FrequencyPenalty(sampling.frequency_penalty, start))
    if sampling.temperature > 0:  # greedy decoding over seeded Gumbel noise is sampling
        steps.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k is not None:
            steps.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            steps.append(TopPLogitsWarper(sampling.top_p))
        steps.append(SeededSampler(seeds, n))
    return steps


@dataclass
class TransformersEngine(Engine):
    LIBRARIES: ClassVar[tuple[str, ...]] = ("transformers", "torch")
    VERSION: ClassVar[int] = 2  # 2: per-request seeded sampling (Gumbel-max after temperature and top-p)
    CONCURRENT: ClassVar[bool] = True  # no global RNG: each thread's batches draw from their own seeds
    _model: Any = field(default=None, init=False, repr=False)
    # a fast tokenizer keeps its padding settings in the Rust backend and changes them per call:
    # a count (no padding) beside a batch encode (padding) in another thread gets ragged rows
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

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

    def _stopping_criterion(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        """A transformers StoppingCriteria: every row is done once `stop()` was called."""
        import torch

        stopped = self._stopping.is_set()
        return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)

    def context_length(self) -> int | None:
        return self.llm.max_model_len or getattr(self._model.config, "max_position_embeddings", None)

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        with self._tokenizer_lock:
            return super().count_tokens(messages)

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
                batch = group[start : start + step]
                self._stop_check()
                for request, reply in zip(batch, self._generate(batch, n, sampling), strict=True):
                    self.arrived(request, reply)
                    results.append(reply)
        return results

    def _generate(self, batch: list[ChatRequest], n: int, sampling: Sampling) -> list[Reply]:
        import torch

        with self._tokenizer_lock:
            texts = [
                self._tokenizer.apply_chat_template(
                    apply_chat_rules(r.messages, self.llm), tokenize=False, add_generation_prompt=True
                )
                for r in batch
            ]
            enc = self._tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        # each prompt n times in a row (greedy decoding returns one sequence per input row)
        rows = {k: v.repeat_interleave(n, dim=0) for k, v in enc.items()}
        start = enc["input_ids"].shape[1]
        pads = start - rows["attention_mask"].sum(dim=1)
        processors = logits_steps(sampling, [r.seed for r in batch], n, pads, start)
        with torch.inference_mode():
            out = self._model.generate(
                **rows,
                do_sample=False,
                temperature=None,  # the model's generation_config must add no warper of its own
                top_p=None,
                top_k=None,
                repetition_penalty=None,
                logits_processor=processors,
                max_new_tokens=sampling.max_tokens,
                pad_token_id=self._tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_logits=any(r.top_logprobs for r in batch),  # raw, before temperature and top_p
                stopping_criteria=[self._stopping_criterion],  # stop(): the batch ends at the next token
            )
        self._stop_check()  # a batch cut short by stop() is not an answer
        new_tokens = out.sequences[:, enc["input_ids"].shape[1] :].tolist()
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        with self._tokenizer_lock:  # decoding borrows the backend too
            return self._replies(batch, n, new_tokens, prompt_lens, out.logits)

    def _replies(
        self, batch: list[ChatRequest], n: int, new_tokens: list, prompt_lens: list, logits: Any
    ) -> list[Reply]:
        return [
            Reply(
                [
                    self._completion(new_tokens[i * n + j], prompt_lens[i], r, logits, i * n + j)
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
