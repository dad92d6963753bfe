"""The engine contract: chat requests in, n completions with token counts out."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from stages.core.params import EngineParams, LLMSpec, Sampling

PIP_EXTRA = "pip install 'lmsys-chat-1m-synth[{extra}]'"


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    n: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Engine(abc.ABC):
    """One model behind one backend. `load()` imports the heavy library and loads the model; it
    runs on the first `chat()` that has requests, so a resumed stage whose shards are all done
    never loads a model. `chat()` is batched; subclasses implement `_chat()`."""

    llm: LLMSpec
    options: EngineParams
    _loaded: bool = field(default=False, init=False, repr=False)

    @property
    def model_name(self) -> str:
        return self.llm.model

    @abc.abstractmethod
    def load(self) -> None: ...

    def unload(self) -> None:  # noqa: B027 - engines without resources need no clean-up
        """Free the model (GPU memory, sessions)."""

    def chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        """Return, for each request, its `n` completions in order."""
        if not requests:
            return []
        if not self._loaded:
            self.load()
            self._loaded = True
        return self._chat(requests, sampling)

    @abc.abstractmethod
    def _chat(self, requests: list[ChatRequest], sampling: Sampling) -> list[list[Completion]]: ...

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loaded:
            self.unload()
            self._loaded = False


def apply_chat_rules(messages: list[dict[str, str]], llm: LLMSpec) -> list[dict[str, str]]:
    """Adapt messages to the model: without a system role, the system text opens the first user turn."""
    if llm.system_role or not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def missing_extra(library: str, extra: str) -> ImportError:
    return ImportError(f"the {library} engine needs {library}: {PIP_EXTRA.format(extra=extra)}")
