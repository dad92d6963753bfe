"""DeepL for the first turns the release lacks (translate.missing=deepl): the official `deepl` client,
requests within DeepL's limits, each translation kept in the response cache under its text and
settings, in resumable shards.

A text is sent once: a re-run, a resumed run or another variant finds it in the response cache
(stages/core/storage/cache.py), keyed by sha256 over ("deepl", the settings that change a translation, the
text). The client retries 429 and 5xx itself; an exhausted quota (456), a rejected key (403) or any
other DeepL error stops the stage with a PipelineError, keeping every finished shard and every
cached translation, so the re-run sends only what is still untranslated."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from importlib import metadata
from pathlib import Path

import orjson
import pyarrow as pa

from stages.core.config.errors import PipelineError
from stages.core.config.params import Params
from stages.core.config.translate_params import DeepLParams
from stages.core.engines.base import missing_extra
from stages.core.rows.requests import FAILED, OK, TOO_LONG
from stages.core.runtime.shards import run_checkpointed, slices
from stages.core.runtime.translator import TRANSLATED, read_answers, split_empty
from stages.core.storage.cache import ResponseCache
from stages.core.storage.parquet import ENGINE_METADATA, value_counts
from stages.core.storage.resume import code_digest, digest, recipe

LOG = logging.getLogger(__name__)
BACKEND = "deepl"


def auth_key(spec: DeepLParams) -> str:
    """The DeepL key from the environment; a missing one stops the stage before any work."""
    key = os.environ.get(spec.auth_key_env, "")
    if not key:
        raise PipelineError(
            f"translate.missing=deepl needs a DeepL API key in ${spec.auth_key_env} "
            "(translate.deepl.auth_key_env names the variable)"
        )
    return key


def text_key(settings: dict, text: str) -> bytes:
    """The response-cache key of one DeepL translation."""
    return hashlib.sha256(orjson.dumps([BACKEND, settings, text], option=orjson.OPT_SORT_KEYS)).digest()


def request_body(settings: dict) -> dict:
    """The JSON body the client sends for these settings, without its texts."""
    body = {k: v for k, v in settings.items() if v is not None}
    return {**body, "text": [], "show_billed_characters": True}


def batches(
    texts: list[str], base_bytes: int, max_texts: int, max_bytes: int
) -> tuple[list[list[int]], list[int]]:
    """The indices of `texts` in requests of at most `max_texts` texts and `max_bytes` of JSON body
    (`base_bytes`: the body without texts), in order; and those too long for any request."""
    requests, too_long, current, size = [], [], [], base_bytes
    for i, text in enumerate(texts):
        cost = len(json.dumps(text)) + 2  # as requests encodes it (ASCII, \\u escapes), with ", "
        if base_bytes + cost > max_bytes:
            too_long.append(i)
            continue
        if current and (len(current) == max_texts or size + cost > max_bytes):
            requests.append(current)
            current, size = [], base_bytes
        current.append(i)
        size += cost
    return [*requests, current] if current else requests, too_long


class DeepL:
    """The client, the response cache and this run's counts (`billed_characters`, texts sent and
    texts answered from the cache)."""

    def __init__(self, spec: DeepLParams, cache: ResponseCache) -> None:
        try:
            import deepl
        except ImportError as err:
            raise missing_extra("deepl", "deepl") from err
        deepl.http_client.max_network_retries = spec.max_retries  # the library's own setting
        self.deepl, self.spec, self.cache = deepl, spec, cache
        self.settings = recipe(spec)  # target and source language, formality, glossary, model type
        self.client = deepl.Translator(auth_key(spec), server_url=spec.server_url, send_platform_info=False)
        self.counts: Counter = Counter()

    def identity(self) -> dict:
        return {"backend": BACKEND, "libraries": {"deepl": metadata.version("deepl")}, **self.settings}

    def translate(self, texts: list[str]) -> list[tuple[str | None, str]]:
        """Each text's translation (None when DeepL answered nothing or it was too long) and status."""
        keys = [text_key(self.settings, t) for t in texts]
        found = self.cache.get_many(keys)
        self.counts["deepl_cached_texts"] += sum(k in found for k in keys)
        todo = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in found))
        base = len(json.dumps(request_body(self.settings)))
        groups, too_long = batches(todo, base, self.spec.batch_texts, self.spec.batch_bytes)
        for group in groups:
            found.update(self._send([todo[i] for i in group]))
        skipped = {text_key(self.settings, todo[i]) for i in too_long}
        self.counts["deepl_skipped_too_long"] += len(too_long)
        return [_answer(found.get(k), k in skipped) for k in keys]

    def _send(self, texts: list[str]) -> dict[bytes, list]:
        """One request; its answers, also stored in the response cache at once."""
        try:
            results = self.client.translate_text(
                texts,
                target_lang=self.spec.target_lang,
                source_lang=self.spec.source_lang,
                formality=self.spec.formality,
                glossary=self.spec.glossary_id,
                model_type=self.spec.model_type,
            )
        except self.deepl.DeepLException as err:
            raise self._stop(err) from err
        answers = {
            text_key(self.settings, t): [r.text, r.billed_characters]
            for t, r in zip(texts, results, strict=True)
            if r.text.strip()
        }
        self.cache.put_many(answers.items())
        self.counts.update(
            deepl_requests=1,
            deepl_sent_texts=len(texts),
            deepl_billed_characters=sum(r.billed_characters for r in results),
        )
        return answers

    def _stop(self, err: Exception) -> PipelineError:
        """The error that stops the stage: what happened, the characters billed, what is kept."""
        billed = f"{self.counts['deepl_billed_characters']:,} characters billed in this run"
        kept = (
            "finished shards are checkpointed and every translation is in the response cache, so a "
            "re-run sends only the untranslated texts"
        )
        if isinstance(err, self.deepl.QuotaExceededException):
            return PipelineError(
                f"translate: DeepL quota exhausted (HTTP 456) after {billed}{self._usage()}; {kept}: "
                "re-run translate when the quota resets or after raising the account's limit"
            )
        if isinstance(err, self.deepl.AuthorizationException):
            return PipelineError(
                f"translate: DeepL rejected the key in ${self.spec.auth_key_env} (HTTP 403) after "
                f"{billed}: check the key and its server (translate.deepl.server_url); {kept}"
            )
        server = self.spec.server_url or "the DeepL API"
        return PipelineError(f"translate: a DeepL request to {server} failed after {billed} ({err}); {kept}")

    def _usage(self) -> str:
        """The account's character usage this period, when the server still answers."""
        try:
            usage = self.client.get_usage()
        except self.deepl.DeepLException as err:
            LOG.warning("DeepL usage is not available: %s", err)
            return ""
        return f" (account: {usage.character} characters used this period)" if usage.character.valid else ""

    def close(self) -> None:
        self.client.close()


def _answer(found: list | None, too_long: bool) -> tuple[str | None, str]:
    if found is not None:
        return found[0], OK
    return None, TOO_LONG if too_long else FAILED  # DeepL answered nothing: asked again next run


def translate_table(client: DeepL, rows: pa.Table) -> pa.Table:
    """One shard: each row's translation and its status."""
    answers = client.translate(rows["instruction"].to_pylist())
    texts, statuses = zip(*answers, strict=True) if answers else ((), ())
    return pa.table([rows["conversation_id"], list(texts), list(statuses)], schema=TRANSLATED)


def translate_with_deepl(
    table: pa.Table, params: Params, counts: Counter, stage: str = "translate"
) -> dict[str, tuple[str | None, str]]:
    """conversation_id -> (Japanese text or None, status) for each row of `table`, like
    translator.translate_missing, from DeepL; `counts` gets this run's DeepL counts; `stage` names
    the checkpoints."""
    spec = params.translate.deepl
    result, table = split_empty(table)
    if table.num_rows == 0:
        return result
    out = Path(params.paths.stage_out(stage))
    client = DeepL(spec, ResponseCache(params.paths.response_cache, params.engine.cache))
    try:
        run_checkpointed(
            slices(table.select(["conversation_id", "instruction"]), params.translate.shard_size),
            lambda shard, _: translate_table(client, shard),
            out=out,
            schema=TRANSLATED,
            checkpoints=params.paths.shards,
            stage=stage,
            key=digest("translate", BACKEND, client.settings, code_digest(__name__)),
            statuses=("translation_status",),  # an empty answer (FAILED) is asked again next run
            metadata={f"{ENGINE_METADATA}translate".encode(): orjson.dumps(client.identity())},
            total=-(-table.num_rows // params.translate.shard_size),
        )
    finally:
        counts.update(client.counts)
        client.cache.close()
        client.close()
    LOG.info(
        "DeepL on %d first turns: %s; %s",
        table.num_rows,
        value_counts(out, ["translation_status"]),
        dict(client.counts),
    )
    result.update(read_answers(out))
    return result
